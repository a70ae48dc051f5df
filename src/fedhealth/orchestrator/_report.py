"""Read models of a study: the API's StudyInfo and the study report (JSON and Markdown)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedhealth.orchestrator._privacy_plan import privacy_markdown, privacy_report
from fedhealth.orchestrator._store import Store
from fedhealth.orchestrator._text import one_line
from fedhealth.protocol import RoundInfo, RoundStatus, StudyInfo, TaskInfo, TaskKind

__all__ = ["build_report", "one_line", "report_markdown", "study_info", "write_report"]


def study_info(store: Store, study_id: str, *, with_rounds: bool = True) -> StudyInfo:
    study, rounds, tasks, approvals = store.study_view(study_id, with_rounds=with_rounds)
    tasks_by_round: dict[str, list[TaskInfo]] = {}
    if with_rounds:
        for t in tasks:
            tasks_by_round.setdefault(t.round_id, []).append(
                TaskInfo(
                    task_id=t.id,
                    site=t.site,
                    kind=t.kind,
                    status=t.status,
                    reason=t.reason,
                    metrics=t.metrics,
                )
            )
    open_round = next((r.number for r in rounds if r.status is RoundStatus.OPEN), None)
    return StudyInfo(
        spec_hash=study.spec_hash,
        approvals=approvals,
        approval_deadline=study.approval_deadline_at,
        study_id=study.id,
        spec=study.spec,
        status=study.status,
        reason=study.reason,
        created_at=study.created_at,
        ended_at=study.ended_at,
        completed_rounds=study.completed_rounds,
        current_round=open_round,
        model_digest=study.model_digest,
        rounds=[
            RoundInfo(
                number=r.number,
                kind=r.kind,
                status=r.status,
                started_at=r.started_at,
                ended_at=r.ended_at,
                reason=r.reason,
                model_digest=r.model_out_digest,
                metrics=r.metrics,
                tasks=sorted(tasks_by_round.get(r.id, []), key=lambda t: t.site),
            )
            for r in rounds
        ],
    )


def build_report(store: Store, study_id: str) -> dict[str, Any]:
    """Everything a reader needs to judge a study's outcome, as plain JSON."""
    study = store.get_study(study_id)
    rounds = store.rounds_of(study_id)
    train = [r for r in rounds if r.kind is TaskKind.TRAIN]
    evaluation = next((r for r in rounds if r.kind is TaskKind.EVALUATE and r.metrics), None)
    session = next((r for r in reversed(rounds) if r.kind is TaskKind.COLLECTIVE), None)
    wall = (study.ended_at - study.created_at).total_seconds() if study.ended_at else None
    return {
        "study_id": study.id,
        "name": study.name,
        "status": study.status.value,
        "reason": study.reason,
        "spec": study.spec.model_dump(mode="json"),
        "created_at": study.created_at.isoformat(),
        "ended_at": study.ended_at.isoformat() if study.ended_at else None,
        "wall_time_s": wall,
        "completed_rounds": study.completed_rounds,
        "final_model_digest": study.model_digest,
        "rounds": [
            {
                "number": r.number,
                "kind": r.kind.value,
                "status": r.status.value,
                "reason": r.reason,
                "duration_s": (r.ended_at - r.started_at).total_seconds() if r.ended_at else None,
                "model_digest": r.model_out_digest,
                "metrics": r.metrics,
            }
            for r in train
        ],
        "evaluation": evaluation.metrics if evaluation else None,
        "collective": _collective_result(session),
        "privacy": privacy_report(store, study_id),
    }


_BULKY = ("model", "binning")  # the released model itself: in the model package, not in the report
# round metrics key (set by the round engine): the sites that withheld their held-out figures, having fewer
# than their min_cohort_k held-out patients after consent; the report shows them as withheld, never a count
HELD_OUT_WITHHELD = "held_out_withheld"
_WITHHELD = "withheld"


def _collective_result(r: Any) -> dict[str, Any] | None:
    """A collective study's session round and its released result, less the model itself."""
    if r is None:
        return None
    return {
        "number": r.number,
        "status": r.status.value,
        "reason": r.reason,
        "duration_s": (r.ended_at - r.started_at).total_seconds() if r.ended_at else None,
        "result": {k: v for k, v in (r.metrics or {}).items() if k not in _BULKY},
    }


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Study report: {report['name']} ({report['study_id']})",
        "",
        f"- Status: **{report['status']}**"
        + (f" — {one_line(report['reason'])}" if report["reason"] else ""),
        f"- Dataset: `{report['spec']['dataset']}`; recipe `{report['spec']['recipe']['name']}`; "
        f"strategy `{report['spec']['strategy']['name']}`",
        f"- Rounds completed: {report['completed_rounds']} of {report['spec']['rounds']}",
        f"- Wall time: {report['wall_time_s']:.2f} s"
        if report["wall_time_s"] is not None
        else "- Wall time: n/a",
        f"- Final model (sha256): `{report['final_model_digest']}`",
        "",
    ]
    evaluation = report.get("evaluation")
    withheld = (evaluation or {}).get(HELD_OUT_WITHHELD) or []
    if evaluation and (evaluation.get("per_site") or withheld):
        lines += [
            "## Final model, evaluated at each site",
            "",
            "| site | n | accuracy | AUC | loss |",
            "|---|---|---|---|---|",
        ]
        rows = (evaluation.get("per_site") or {}) | {site: None for site in withheld}
        for site, m in sorted(rows.items()):
            if not m:  # the site releases no figure of fewer than k held-out patients, not even the count
                lines.append(f"| {site} | {_WITHHELD} | {_WITHHELD} | {_WITHHELD} | {_WITHHELD} |")
                continue
            lines.append(
                f"| {site} | {m['num_eval_samples']} | {_num(m.get('accuracy'))} | {_num(m.get('auc'))} "
                f"| {_num(m.get('eval_loss'))} |"
            )
        mean = (
            f"| **mean** | | **{_num(evaluation.get('accuracy'))}** | **{_num(evaluation.get('auc'))}** | |"
        )
        lines += [mean, ""]
    lines += [
        "## Rounds",
        "",
        "| round | status | sites | train loss | local val. accuracy | s |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rounds"]:
        m = r["metrics"] or {}
        loss = f"{m['train_loss']:.4f}" if "train_loss" in m else ""
        acc = f"{m['accuracy']:.4f}" if "accuracy" in m else ""
        if m.get(HELD_OUT_WITHHELD):
            acc = f"{acc} ({_WITHHELD} at {', '.join(m[HELD_OUT_WITHHELD])})".strip()
        dur = f"{r['duration_s']:.3f}" if r["duration_s"] is not None else ""
        lines.append(f"| {r['number']} | {r['status']} | {m.get('sites', '')} | {loss} | {acc} | {dur} |")
    if report.get("collective"):
        lines += ["", *_collective_markdown(report["collective"])]
    if report.get("privacy"):
        lines += ["", *privacy_markdown(report["privacy"])]
    return "\n".join(lines) + "\n"


def write_report(store: Store, study_id: str, directory: Path) -> tuple[Path, Path]:
    report = build_report(store, study_id)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{study_id}.json"
    md_path = directory / f"{study_id}.md"
    json_path.write_text(json.dumps(report, indent=2, sort_keys=True))
    md_path.write_text(report_markdown(report))
    return json_path, md_path


_TOP_FEATURES = 20


def _collective_markdown(session: dict[str, Any]) -> list[str]:
    """The session's released figures (scalars), and a boosting model's features by total gain."""
    result = session.get("result") or {}
    lines = [f"## Collective session (round {session['number']}): {session['status']}", ""]
    if session.get("reason"):
        lines += [f"Reason: {one_line(session['reason'])}", ""]
    scalars = {k: v for k, v in sorted(result.items()) if isinstance(v, int | float | str) or v is None}
    lines += [f"- {k}: {_num(v) if isinstance(v, float) else v}" for k, v in scalars.items()]
    importance = result.get("feature_importance")
    if isinstance(importance, list) and importance:
        total = sum(float(f.get("total_gain", 0.0)) for f in importance) or 1.0
        lines += [
            "",
            "### Feature importance (total gain over every split on the feature)",
            "",
            "| feature | total gain | share | splits |",
            "|---|---|---|---|",
        ]
        for f in importance[:_TOP_FEATURES]:
            gain = float(f.get("total_gain", 0.0))
            name = str(f.get("feature")).replace("|", "\\|")
            lines.append(f"| {name} | {gain:.4g} | {gain / total:.1%} | {f.get('splits')} |")
        if len(importance) > _TOP_FEATURES:
            lines.append(f"| {len(importance) - _TOP_FEATURES} more | | | |")
    return lines
