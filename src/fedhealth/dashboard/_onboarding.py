"""The onboarding kit of a site: three Markdown documents rendered from the federation's actual settings, for
the hospital's ethics board, its data protection officer and its IT team.

- ``irb-consultation.md``: what the site's data is used for, the data flows, what leaves the site, the secure
  aggregation threshold and the differential-privacy parameters of the studies that name the site, the
  privacy budgets the site attested, retention and audit;
- ``dpa-annex-toms.md``: the technical and organisational measures, as an annex to a data processing
  agreement;
- ``site-readiness-checklist.md``: what the site does before its first study, with its current state.

The facts come from the orchestrator's store and its audit log (studies, sites, budget attestations, the log's
verification); the documents name no file path, URL, key or credential (tests check it). Templates are
Jinja2, packaged under ``templates/onboarding``.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlalchemy import select

import fedhealth
from fedhealth.core import InputError, NotFoundError, write_private_file
from fedhealth.governance import GOVERNANCE_METADATA, AuditEventType, AuditLog
from fedhealth.orchestrator import Store
from fedhealth.protocol import PROTOCOL_VERSION, StudySpec
from fedhealth.secagg import min_threshold

PACK_FILES = ("irb-consultation.md", "dpa-annex-toms.md", "site-readiness-checklist.md")
_ENTRIES = GOVERNANCE_METADATA.tables["gov_audit_entries"]
_templates = Environment(
    loader=FileSystemLoader(str(Path(__file__).parent / "templates" / "onboarding")),
    autoescape=False,  # noqa: S701 - Markdown documents, not HTML; every value is a setting or a name
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def _secure_aggregation(spec: StudySpec) -> dict[str, Any] | None:
    sa = spec.secure_aggregation
    if sa is None:
        return None
    n = len(spec.train_sites)
    collusion = sa.collusion if sa.collusion is not None else n // 3
    threshold = sa.threshold if sa.threshold is not None else max(min_threshold(n, collusion), spec.min_sites)
    return {
        "sites": n,
        "threshold": threshold,
        "threshold_set": sa.threshold is not None,
        "collusion": collusion,
    }


def _privacy(spec: StudySpec) -> dict[str, Any] | None:
    if spec.privacy is not None:
        p = spec.privacy
        return {
            "kind": f"DP-SGD ({p.mode.value}-level)",
            "target_epsilon": p.target_epsilon,
            "delta": p.delta,
            "noise_multiplier": p.noise_multiplier,
            "max_grad_norm": p.max_grad_norm,
            "accountant": p.accountant.value,
        }
    params = spec.recipe.params or {}
    # a collective session that declares its own noise (e.g. federated statistics) says so in its params
    noise = {k: params[k] for k in ("noise_multiplier", "target_epsilon", "delta") if k in params}
    if noise:
        return {
            "kind": "Gaussian noise on the released figures",
            "target_epsilon": noise.get("target_epsilon"),
            "delta": noise.get("delta"),
            "noise_multiplier": noise.get("noise_multiplier"),
            "max_grad_norm": None,
            "accountant": "pld",
        }
    return None


def _budgets(store: Store, audit: AuditLog, site: str) -> list[dict[str, Any]]:
    """The latest budget attestation of each of the site's datasets (from the orchestrator's audit log)."""
    c = _ENTRIES.c
    latest: dict[str, dict[str, Any]] = {}
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(c.payload)
            .where((c.log_id == audit.log_id) & (c.type == AuditEventType.BUDGET_SPENT.value))
            .order_by(c.seq)
        ).all()
    for (text,) in rows:
        payload = json.loads(text)
        if payload.get("site") == site:
            latest[str(payload.get("dataset", "?"))] = {
                "dataset": str(payload.get("dataset", "?")),
                "budget_epsilon": payload.get("budget_epsilon"),
                "spent_epsilon": payload.get("total_epsilon"),
                "delta": payload.get("delta"),
            }
    return [latest[k] for k in sorted(latest)]


def onboarding_facts(
    store: Store, audit: AuditLog, site: str, *, approval_wait_s: float | None = None
) -> dict[str, Any]:
    """What the documents state about ``site`` and its federation. Raises :class:`NotFoundError` for a site
    the orchestrator does not know."""
    sites = store.list_sites()
    me = next((s for s in sites if s.name == site), None)
    if me is None:
        known = ", ".join(sorted(s.name for s in sites)) or "none yet"
        raise NotFoundError(f"unknown site {site!r} (sites of this federation: {known})")
    studies = []
    for study in sorted(store.list_studies(), key=lambda s: s.created_at):
        if site not in study.named_sites:
            continue
        spec = study.spec
        params = spec.recipe.params or {}
        studies.append(
            {
                "name": study.name,
                "status": study.status.value,
                "dataset": spec.dataset,
                "recipe": f"{spec.recipe.name} v{spec.recipe.version}",
                "rounds": spec.rounds,
                "sites": len(study.named_sites),
                "secure_aggregation": _secure_aggregation(spec),
                "privacy": _privacy(spec),
                "min_cell_count": params.get("min_cell_count"),
            }
        )
    report = audit.verify()
    return {
        "site": {
            "name": me.name,
            "status": me.status.value,
            "enrolled_at": me.enrolled_at.strftime("%Y-%m-%d") if me.enrolled_at else "not yet enrolled",
        },
        "federation": {
            "sites": len([s for s in sites if s.status.value == "active"]),
            "software_version": fedhealth.__version__,
            "protocol_version": PROTOCOL_VERSION,
            "approval_wait_days": None if approval_wait_s is None else round(approval_wait_s / 86400, 1),
        },
        "studies": studies,
        "secure_studies": [s for s in studies if s["secure_aggregation"]],
        "private_studies": [s for s in studies if s["privacy"]],
        "budgets": _budgets(store, audit, site),
        "audit": {"ok": report.ok, "entries": report.checked, "summary": report.summary()},
    }


def render_pack(facts: Mapping[str, Any]) -> dict[str, str]:
    """File name -> Markdown text of each document of the kit."""
    return {name: _templates.get_template(f"{name}.j2").render(**facts) for name in PACK_FILES}


def onboarding_pack(
    store: Store, audit: AuditLog, site: str, *, approval_wait_s: float | None = None
) -> dict[str, str]:
    """The kit of ``site`` (file name -> Markdown); :class:`NotFoundError` for an unknown site."""
    return render_pack(onboarding_facts(store, audit, site, approval_wait_s=approval_wait_s))


def write_pack(pack: Mapping[str, str], out: Path) -> list[Path]:
    """Write the kit's files into ``out`` (created if missing); refuses to overwrite an existing file."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    # lexists: a link there, even one that points nowhere, is a clash (a plain open would create its target)
    clashes = [name for name in pack if os.path.lexists(out / name)]
    if clashes:
        raise InputError(f"{out} already holds {', '.join(clashes)}; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in pack.items():
        path = out / name
        try:  # created beside it and linked into place: never through a link planted since the check
            write_private_file(path, text.encode("utf-8"), overwrite=False)
        except FileExistsError:
            raise InputError(f"{out} already holds {name}; choose an empty folder") from None
        written.append(path)
    return written


def pack_zip(pack: Mapping[str, str], folder: str) -> bytes:
    """The kit as a zip archive (for the dashboard's download), its files under ``folder/``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in pack.items():
            archive.writestr(f"{folder}/{name}", text)
    return buffer.getvalue()
