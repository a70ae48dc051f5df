"""Read models of the dashboard's pages: plain data (dicts and lists) from the orchestrator's store and report
functions, ready for the templates and for Plotly.

Each page reads with a bounded number of SQL statements, whatever the number of sites, studies, rounds or
entries (``tests/dashboard/test_dashboard_views.py`` counts them): a list is one query, never one per row.
"""

from __future__ import annotations

import json
import math
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select

from fedhealth.dashboard._drift import DriftPolicy
from fedhealth.governance import (
    GOVERNANCE_METADATA,
    AuditEventType,
    ProvenanceStore,
    model_card_markdown,
)
from fedhealth.orchestrator import Services, build_report, study_info
from fedhealth.protocol import ApprovalState, CheckStatus, SiteReadiness, TaskKind, TaskStatus

_ENTRIES = GOVERNANCE_METADATA.tables["gov_audit_entries"]
_MODELS = GOVERNANCE_METADATA.tables["gov_model_versions"]
_FLAGS = GOVERNANCE_METADATA.tables["gov_model_flags"]
_METRICS = GOVERNANCE_METADATA.tables["gov_model_metrics"]

# round metrics that are counts or times, not model quality: not drawn on the metrics chart
_NOT_QUALITY = frozenset({"sites", "num_samples", "num_eval_samples", "duration_s", "contributors"})
AUDIT_PAGE_SIZE = 200
# points drawn on the burn-down chart, shared by its series (each gets at least MIN_SERIES_POINTS, evenly
# spaced, its first and latest always among them): 20,000 attestations would otherwise make a page of
# megabytes that the browser draws no better
CHART_POINTS = 2000
MIN_SERIES_POINTS = 25
MODELS_PAGE_SIZE = 500
DEFAULT_INTENDED_USE = "Research within the study named above. Not validated for clinical decisions."


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else ""


def _figure(
    traces: list[dict[str, Any]], *, title: str, x_title: str, y_title: str, **layout: Any
) -> dict[str, Any]:
    return {
        "data": traces,
        "layout": {
            "title": {"text": title},
            "xaxis": {"title": {"text": x_title}},
            "yaxis": {"title": {"text": y_title}},
            "margin": {"l": 60, "r": 20, "t": 40, "b": 50},
            "legend": {"orientation": "h"},
            **layout,
        },
    }


# --- federation -------------------------------------------------------------------------------------------


def federation_view(svc: Services) -> dict[str, Any]:
    """Every site: status, last seen, software, readiness (from ``fedhealth site check``); two queries."""
    readiness = svc.store.readiness()
    rows = []
    counts = {"active": 0, "pending": 0, "revoked": 0}
    for site in svc.store.list_sites():
        counts[site.status.value] = counts.get(site.status.value, 0) + 1
        seen = max((t for t in (site.last_seen_at, svc.last_seen.get(site.name)) if t), default=None)
        text = readiness.get(site.name)
        ready: SiteReadiness | None = SiteReadiness.model_validate_json(text) if text else None
        rows.append(
            {
                "name": site.name,
                "status": site.status.value,
                "last_seen": _when(seen),
                "software_version": site.software_version or "",
                "protocol_version": site.protocol_version,
                "enrolled_at": _when(site.enrolled_at),
                "revoked_at": _when(site.revoked_at),
                "ready": None if ready is None else ready.ready,
                "readiness_checked": _when(ready.checked_at) if ready is not None else "",
                "failing_checks": [c.name for c in ready.checks if c.status is not CheckStatus.OK]
                if ready is not None
                else [],
            }
        )
    return {"sites": rows, "counts": counts}


# --- studies ----------------------------------------------------------------------------------------------


def studies_view(svc: Services) -> list[dict[str, Any]]:
    """Every study with its progress; one query."""
    return [
        {
            "id": s.id,
            "name": s.name,
            "owner": s.spec.owner,
            "status": s.status.value,
            "completed_rounds": s.completed_rounds,
            "rounds": s.spec.rounds,
            "progress": min(100, round(100 * s.completed_rounds / s.spec.rounds)),
            "created_at": _when(s.created_at),
            "ended_at": _when(s.ended_at),
            "recipe": s.spec.recipe.name,
            "dataset": s.spec.dataset,
            "secure": s.spec.secure_aggregation is not None,
            "dp": s.spec.privacy is not None,
        }
        for s in sorted(svc.store.list_studies(), key=lambda s: s.created_at, reverse=True)
    ]


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def study_view(svc: Services, study_id: str) -> dict[str, Any]:
    """One study: progress, per-round metrics and participation as charts, its secure aggregation and DP
    settings, each site's privacy figures, approvals outstanding. Raises NotFoundError for an unknown id."""
    info = study_info(svc.store, study_id)
    report = build_report(svc.store, study_id)
    train = [r for r in info.rounds if r.kind is TaskKind.TRAIN]
    quality: dict[str, list[tuple[int, float]]] = {}
    for r in train:
        for key, value in (r.metrics or {}).items():
            number = _finite(value)
            if number is not None and key not in _NOT_QUALITY:
                quality.setdefault(key, []).append((r.number, number))
    metrics_figure = _figure(
        [
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": key,
                "x": [p[0] for p in points],
                "y": [p[1] for p in points],
            }
            for key, points in sorted(quality.items())
        ],
        title="Per-round metrics (from the aggregated results)",
        x_title="round",
        y_title="value",
    )
    completed = [sum(t.status is TaskStatus.COMPLETED for t in r.tasks) for r in info.rounds]
    dropped = [
        sum(t.status is not TaskStatus.COMPLETED and not _open(t.status) for t in r.tasks)
        for r in info.rounds
    ]
    labels = [f"{r.number} ({r.kind.value})" for r in info.rounds]
    participation_figure = _figure(
        [
            {
                "type": "bar",
                "name": "contributed",
                "x": labels,
                "y": completed,
                "marker": {"color": "#116329"},
            },
            {
                "type": "bar",
                "name": "dropped or refused",
                "x": labels,
                "y": dropped,
                "marker": {"color": "#a40e26"},
            },
        ],
        title="Participation per round",
        x_title="round",
        y_title="sites",
        barmode="stack",
    )
    dropouts = [
        {"round": r.number, "site": t.site, "status": t.status.value, "reason": t.reason or ""}
        for r in info.rounds
        for t in r.tasks
        if t.status is not TaskStatus.COMPLETED and not _open(t.status)
    ]
    spec = info.spec
    outstanding = sorted(
        site for site, state in info.approvals.items() if state is not ApprovalState.APPROVED
    )
    evaluation = report.get("evaluation") or {}
    session, importance_figure = _collective_view(report.get("collective"))
    return {
        "id": info.study_id,
        "name": spec.name,
        "owner": spec.owner,
        "status": info.status.value,
        "reason": info.reason or "",
        "created_at": _when(info.created_at),
        "ended_at": _when(info.ended_at),
        "completed_rounds": info.completed_rounds,
        "rounds": spec.rounds,
        "progress": min(100, round(100 * info.completed_rounds / spec.rounds)),
        "current_round": info.current_round,
        "dataset": spec.dataset,
        "recipe": spec.recipe.name,
        "strategy": spec.strategy.name,
        "train_sites": spec.train_sites,
        "min_sites": spec.min_sites,
        "model_digest": info.model_digest,
        "spec_hash": info.spec_hash or "",
        "secure_aggregation": (
            spec.secure_aggregation.model_dump(mode="json", exclude={"site_keys"})
            if spec.secure_aggregation is not None
            else None
        ),
        "privacy_settings": spec.privacy.model_dump(mode="json") if spec.privacy is not None else None,
        "privacy": report.get("privacy"),
        "approvals": {site: state.value for site, state in sorted(info.approvals.items())},
        "outstanding": outstanding,
        "evaluation": {k: v for k, v in evaluation.items() if k != "per_site" and _finite(v) is not None},
        "per_site_evaluation": evaluation.get("per_site") or {},
        "metrics_figure": metrics_figure if quality else None,
        "participation_figure": participation_figure if info.rounds else None,
        "dropouts": dropouts,
        "session": session,
        "importance_figure": importance_figure,
    }


_TOP_FEATURES = 20


_View = dict[str, Any] | None


def _collective_view(collective: dict[str, Any] | None) -> tuple[_View, _View]:
    """A collective study's session (the report's ``collective``): its released figures (scalars, the model
    itself left out) and, for boosting, the features by total gain as a bar chart (the top 20)."""
    if not collective:
        return None, None
    result = collective.get("result") or {}
    scalar = (int, float, str)
    figures = {k: v for k, v in sorted(result.items()) if isinstance(v, scalar) and not isinstance(v, bool)}
    session = {k: collective.get(k) for k in ("number", "status", "reason")} | {"figures": figures}
    importance = result.get("feature_importance")
    if not isinstance(importance, list) or not importance:
        return session, None
    top = importance[:_TOP_FEATURES][::-1]  # the largest at the top of a horizontal bar chart
    figure = _figure(
        [
            {
                "type": "bar",
                "orientation": "h",
                "name": "total gain",
                "x": [_finite(f.get("total_gain")) or 0.0 for f in top],
                "y": [str(f.get("feature")) for f in top],
                "customdata": [f.get("splits") for f in top],
                "hovertemplate": "%{y}: total gain %{x:.4g} over %{customdata} splits<extra></extra>",
                "marker": {"color": "#0969da"},
            }
        ],
        title="Feature importance (total gain over every split on the feature)",
        x_title="total gain",
        y_title="feature",
        height=max(260, 60 + 22 * len(top)),
        margin={"l": 140, "r": 20, "t": 40, "b": 50},
    )
    return session, figure


def _open(status: TaskStatus) -> bool:
    return status in (TaskStatus.PENDING, TaskStatus.DELIVERED)


# --- privacy ----------------------------------------------------------------------------------------------


def _entries(svc: Services, types: Iterable[str], after: int = 0) -> list[Any]:
    c = _ENTRIES.c
    with svc.store.engine.connect() as conn:
        return list(
            conn.execute(
                select(c.seq, c.time, c.actor, c.type, c.payload)
                .where((c.log_id == svc.audit.log_id) & c.type.in_(list(types)) & (c.seq > after))
                .order_by(c.seq)
            )
        )


class _BudgetSeries:
    """The budget attestations of one audit log, parsed once: each call reads only the entries appended
    since the last (one query), as the governance observer reads its log. The log is append-only; an
    entry rewritten in the database is what the audit page's verification reports."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen = 0
        self.series: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def refresh(self, svc: Services) -> dict[tuple[str, str], list[dict[str, Any]]]:
        with self.lock:
            for row in _entries(svc, [AuditEventType.BUDGET_SPENT.value], after=self.seen):
                self.seen = max(self.seen, int(row.seq))
                payload = json.loads(row.payload)
                key = (str(payload.get("site", "?")), str(payload.get("dataset", "?")))
                self.series.setdefault(key, []).append(
                    {
                        "time": row.time,
                        "study_id": payload.get("study_id"),
                        "total": _finite(payload.get("total_epsilon")),
                        "budget": _finite(payload.get("budget_epsilon")),
                        "task": _finite(payload.get("task_epsilon")),
                    }
                )
            return {k: list(v) for k, v in self.series.items()}


_BUDGETS: weakref.WeakKeyDictionary[Any, dict[str, _BudgetSeries]] = weakref.WeakKeyDictionary()
_BUDGETS_LOCK = threading.Lock()


def _budget_series(svc: Services) -> dict[tuple[str, str], list[dict[str, Any]]]:
    with _BUDGETS_LOCK:
        per_log = _BUDGETS.setdefault(svc.store.engine, {})
        cache = per_log.setdefault(svc.audit.log_id, _BudgetSeries())
    return cache.refresh(svc)


def _thin(points: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` evenly spaced points, the first and the last always among them."""
    if len(points) <= limit:
        return points
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


def privacy_view(svc: Services) -> dict[str, Any]:
    """Each site's attested epsilon spend per dataset over time against its budget, from the budget entries
    of the orchestrator's audit log (what each site's ledger attested with each task); one query, for the
    entries appended since the last view (:class:`_BudgetSeries`)."""
    series = _budget_series(svc)
    traces: list[dict[str, Any]] = []
    rows = []
    per_series = max(MIN_SERIES_POINTS, CHART_POINTS // max(1, len(series)))
    for (site, dataset), points in sorted(series.items()):
        name = f"{site} / {dataset}"
        drawn = _thin(points, per_series)
        traces.append(
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": f"{name}: spent",
                "x": [p["time"] for p in drawn],
                "y": [p["total"] for p in drawn],
            }
        )
        budget = points[-1]["budget"]
        if budget is not None:
            traces.append(
                {
                    "type": "scatter",
                    "mode": "lines",
                    "name": f"{name}: budget",
                    "line": {"dash": "dash"},
                    "x": [points[0]["time"], points[-1]["time"]],
                    "y": [budget, budget],
                }
            )
        total = points[-1]["total"]
        rows.append(
            {
                "site": site,
                "dataset": dataset,
                "spent": total,
                "budget": budget,
                "remaining": None if total is None or budget is None else max(0.0, budget - total),
                "used_pct": None if not budget or total is None else min(100.0, 100 * total / budget),
                "charges": sum(1 for p in points if p["task"]),
                "studies": len({p["study_id"] for p in points}),
                "last": points[-1]["time"],
            }
        )
    figure = _figure(
        traces,
        title="Attested epsilon spent per site and dataset",
        x_title="time",
        y_title="epsilon (total over all studies)",
    )
    return {"rows": rows, "figure": figure if traces else None}


# --- models -----------------------------------------------------------------------------------------------


def models_view(svc: Services) -> list[dict[str, Any]]:
    """Model versions, newest first, with provenance and consent-withdrawal flags; three queries."""
    owners = {s.id: (s.name, s.spec.owner) for s in svc.store.list_studies()}
    with svc.store.engine.connect() as conn:
        versions = list(
            conn.execute(
                select(_MODELS.c.model_digest, _MODELS.c.body, _MODELS.c.created_at)
                .order_by(_MODELS.c.created_at.desc())
                .limit(MODELS_PAGE_SIZE)
            )
        )
        flags: dict[str, list[dict[str, Any]]] = {}
        for f in conn.execute(select(_FLAGS).order_by(_FLAGS.c.flagged_at)):
            flags.setdefault(f.model_digest, []).append(
                {"notice_id": f.notice_id, "site": f.site, "reason": f.reason}
            )
    out = []
    for v in versions:
        body = json.loads(v.body)
        study_name, owner = owners.get(body.get("study_id", ""), ("", ""))
        epsilons = [e for e in (body.get("epsilon_spent") or {}).values() if _finite(e) is not None]
        out.append(
            {
                "digest": v.model_digest,
                "parent": body.get("parent_digest") or "",
                "study_id": body.get("study_id", ""),
                "study": study_name,
                "owner": owner,
                "round": body.get("round"),
                "n_sites": body.get("n_sites"),
                "software_version": body.get("software_version", ""),
                "spec_hash": body.get("spec_hash", ""),
                "max_epsilon": max(epsilons) if epsilons else None,
                "created_at": str(body.get("created_at", "")),
                "flags": flags.get(v.model_digest, []),
            }
        )
    return out


def model_card(svc: Services, digest: str) -> tuple[str, str]:
    """(study id, Markdown model card) of one version; raises NotFoundError for an unknown one."""
    provenance = ProvenanceStore(svc.store.engine)
    full = provenance.resolve(digest)
    lineage = provenance.lineage(full)
    card = model_card_markdown(
        lineage,
        intended_use=DEFAULT_INTENDED_USE,
        site_metrics=provenance.metrics(full),
        flags=provenance.flags(full),
    )
    return lineage[0].study_id, card


# --- audit ------------------------------------------------------------------------------------------------


def audit_view(
    svc: Services,
    *,
    event_type: str | None,
    actor: str | None,
    text: str | None,
    limit: int = AUDIT_PAGE_SIZE,
) -> list[dict[str, Any]]:
    """The newest entries matching the filters; one query."""
    c = _ENTRIES.c
    q = select(c.seq, c.time, c.actor, c.type, c.payload).where(c.log_id == svc.audit.log_id)
    if event_type:
        q = q.where(c.type == event_type)
    if actor:
        q = q.where(c.actor == actor)
    if text:
        q = q.where(c.payload.contains(text, autoescape=True))
    with svc.store.engine.connect() as conn:
        rows = list(conn.execute(q.order_by(c.seq.desc()).limit(limit)))
    return [
        {"seq": r.seq, "time": r.time, "actor": r.actor, "type": r.type, "payload": r.payload} for r in rows
    ]


def audit_types() -> list[str]:
    return sorted(t.value for t in AuditEventType)


def verification_view(svc: Services) -> dict[str, Any]:
    """The orchestrator's log verified against its own key, and the heads of each site's log that its round
    commitments anchor (what each site can check its own log against)."""
    report = svc.audit.verify()
    bad = report.first_bad
    anchors: dict[str, dict[str, Any]] = {}
    for row in _entries(svc, [AuditEventType.ROUND_COMMITTED.value]):
        payload = json.loads(row.payload)
        for site, head in (payload.get("site_heads") or {}).items():
            entry = anchors.setdefault(site, {"count": 0})
            entry.update(
                count=entry["count"] + 1,
                seq=head.get("seq"),
                hash=str(head.get("hash", ""))[:16],
                study_id=payload.get("study_id"),
                round=payload.get("round"),
            )
    return {
        "ok": report.ok,
        "checked": report.checked,
        "head_seq": report.head.seq,
        "head_hash": report.head.entry_hash,
        "summary": report.summary(),
        "first_bad": None
        if bad is None
        else {"seq": bad.seq, "problem": bad.problem.value, "detail": bad.detail},
        "anchors": dict(sorted(anchors.items())),
    }


def visible(rows: Sequence[Mapping[str, Any]], may_see: Any) -> list[Mapping[str, Any]]:
    return [r for r in rows if may_see(r)]


# --- drift ------------------------------------------------------------------------------------------------

DRIFT_PAGE_SIZE = 100
VALIDATION_CHART_KEYS = 4  # at most this many metrics drawn across model versions


def drift_view(svc: Services, policy: DriftPolicy | None = None) -> dict[str, Any]:
    """Feature-distribution drift (the ``drift.checked`` entries, newest first: one query) with the latest
    comparison of each dataset and its alerts, the designated references (one query), each site's
    validation metrics across model versions (one query), and the thresholds configured now (``policy``:
    the default and each dataset's own)."""
    policy = policy or DriftPolicy()
    c = _ENTRIES.c
    with svc.store.engine.connect() as conn:
        checks = list(
            conn.execute(
                select(c.seq, c.time, c.payload)
                .where((c.log_id == svc.audit.log_id) & (c.type == AuditEventType.DRIFT_CHECKED.value))
                .order_by(c.seq.desc())
                .limit(DRIFT_PAGE_SIZE)
            )
        )
        designations = list(
            conn.execute(
                select(c.seq, c.time, c.payload)
                .where((c.log_id == svc.audit.log_id) & (c.type == AuditEventType.DRIFT_REFERENCE.value))
                .order_by(c.seq)
            )
        )
        site_metrics = list(
            conn.execute(
                select(_METRICS.c.model_digest, _METRICS.c.site, _METRICS.c.metrics, _MODELS.c.created_at)
                .join(_MODELS, _MODELS.c.model_digest == _METRICS.c.model_digest)
                .order_by(_MODELS.c.created_at.desc())
                .limit(MODELS_PAGE_SIZE * 8)
            )
        )
    comparisons = []
    latest: dict[str, dict[str, Any]] = {}
    for row in checks:
        payload = json.loads(row.payload)
        entry = {
            "seq": row.seq,
            "time": row.time,
            "study_id": payload.get("study_id", ""),
            "study": payload.get("study", ""),
            "dataset": payload.get("dataset", ""),
            "reference_study_id": payload.get("reference_study_id", ""),
            "reference": payload.get("reference", ""),
            "level": payload.get("level", "ok"),
            "thresholds": payload.get("thresholds") or {},
            "findings": payload.get("findings") or [],
        }
        comparisons.append(entry)
        latest.setdefault(entry["dataset"], entry)
    references = {}
    for row in designations:
        payload = json.loads(row.payload)
        references[str(payload.get("dataset", ""))] = {
            "study_id": payload.get("study_id", ""),
            "by": payload.get("by", ""),
            "time": row.time,
        }
    # per-site validation metrics across model versions, oldest version first
    per_key: dict[str, dict[str, list[tuple[str, float]]]] = {}
    versions: list[str] = []
    for row in reversed(site_metrics):
        if row.model_digest not in versions:
            versions.append(row.model_digest)
        for key, value in json.loads(row.metrics).items():
            number = _finite(value)
            if number is not None and key not in _NOT_QUALITY:
                per_key.setdefault(key, {}).setdefault(row.site, []).append((row.model_digest[:12], number))
    validation = [
        _figure(
            [
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "name": site,
                    "x": [p[0] for p in points],
                    "y": [p[1] for p in points],
                }
                for site, points in sorted(series.items())
            ],
            title=f"{key} per site across model versions",
            x_title="model version (oldest first)",
            y_title=key,
        )
        for key, series in sorted(per_key.items())[:VALIDATION_CHART_KEYS]
    ]
    return {
        "latest": [latest[d] for d in sorted(latest)],
        "comparisons": comparisons,
        "alerts": [e for e in latest.values() if e["level"] == "alert"],
        "references": references,
        "validation": validation,
        "versions": len(versions),
        "threshold_default": policy.default,
        "threshold_overrides": policy.datasets,
    }
