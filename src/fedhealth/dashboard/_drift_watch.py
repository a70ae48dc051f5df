"""Drift monitoring at the orchestrator: when a study that released federated statistics finishes, its report
is compared with the reference of its dataset and the comparison is a ``drift.checked`` entry in the
orchestrator's signed audit log (level ``ok``, ``warn`` or ``alert``, each feature's PSI per site). The
dashboard's drift page reads those entries; nothing else is stored (no table, no migration).

The reference of a dataset: the study an operator designated last (a ``drift.reference`` entry, written by
the dashboard's admin form), else the dataset's earliest completed statistics study that shares a feature on
the same bins. Reports are read from the studies' stored results (the last round's released report).

Each comparison is rated with its dataset's thresholds (:class:`~fedhealth.dashboard._drift.DriftPolicy`), and
the entry records the thresholds used, so a later change of settings does not re-rate earlier entries.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import select

from fedhealth.core import FedHealthError
from fedhealth.dashboard._drift import (
    DriftInputError,
    DriftPolicy,
    DriftThresholds,
    comparable,
    compare_reports,
    is_stats_report,
)
from fedhealth.governance import GOVERNANCE_METADATA, AuditEventType, AuditLog
from fedhealth.orchestrator import NullObserver, OrchestratorSettings, Store, StudyRow
from fedhealth.protocol import StudyStatus

log = logging.getLogger("fedhealth.dashboard.drift")
ACTOR = "orchestrator"
_ENTRIES = GOVERNANCE_METADATA.tables["gov_audit_entries"]


def stats_report_of(store: Store, study_id: str) -> dict[str, Any] | None:
    """The statistics report a finished study released (its last round's result), or None."""
    rounds = store.rounds_of(study_id)
    metrics = rounds[-1].metrics if rounds else None
    if not is_stats_report(metrics):
        return None
    assert metrics is not None
    return {k: v for k, v in metrics.items() if k != "session"}


def designated_reference(store: Store, log_id: str, dataset: str) -> str | None:
    """The study id last designated as the drift reference of ``dataset``, or None."""
    c = _ENTRIES.c
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(c.payload)
            .where((c.log_id == log_id) & (c.type == AuditEventType.DRIFT_REFERENCE.value))
            .order_by(c.seq.desc())
        ).all()
    for (text,) in rows:
        payload = json.loads(text)
        if payload.get("dataset") == dataset:
            return str(payload["study_id"])
    return None


def find_reference(
    store: Store,
    log_id: str,
    study: StudyRow,
    report: Mapping[str, Any],
    reports: Callable[[str], dict[str, Any] | None] | None = None,
) -> tuple[StudyRow, dict[str, Any]] | None:
    """The reference study and report for ``study`` (module docstring), or None if it has none.
    ``reports(study_id)`` reads a completed study's report (default: :func:`stats_report_of`)."""
    read = reports or (lambda study_id: stats_report_of(store, study_id))
    designated = designated_reference(store, log_id, study.spec.dataset)
    if designated is not None and designated != study.id:
        ref_report = read(designated)
        if ref_report is not None and comparable(ref_report, report):
            return store.get_study(designated), ref_report
    earlier = sorted(
        (
            s
            for s in store.list_studies(StudyStatus.COMPLETED)
            if s.spec.dataset == study.spec.dataset and s.id != study.id and s.created_at <= study.created_at
        ),
        key=lambda s: s.created_at,
    )
    for candidate in earlier:
        ref_report = read(candidate.id)
        if ref_report is not None and comparable(ref_report, report):
            return candidate, ref_report
    return None


class DriftObserver(NullObserver):
    """Compares each finished statistics study with its dataset's reference (module docstring)."""

    def __init__(
        self, store: Store, settings: OrchestratorSettings, thresholds: DriftThresholds | DriftPolicy
    ) -> None:
        self.store = store
        # one set of thresholds for every dataset, or each dataset's own (DriftPolicy)
        self.policy = thresholds if isinstance(thresholds, DriftPolicy) else DriftPolicy(default=thresholds)
        self.audit = AuditLog(store.engine, settings.signing_key, ACTOR, settings.clock)
        # a completed study's result never changes: each is read once (None: not a statistics report)
        self._reports: dict[str, dict[str, Any] | None] = {}

    def _report(self, study_id: str) -> dict[str, Any] | None:
        if study_id not in self._reports:
            self._reports[study_id] = stats_report_of(self.store, study_id)
        return self._reports[study_id]

    def study_finished(self, study: StudyRow) -> None:
        if study.status is not StudyStatus.COMPLETED:
            return
        report = self._report(study.id)
        if report is None:
            return
        found = find_reference(self.store, self.audit.log_id, study, report, self._report)
        if found is None:
            log.info("study %s: no drift reference for dataset %s yet", study.id, study.spec.dataset)
            return
        reference, ref_report = found
        try:
            result = compare_reports(ref_report, report, self.policy.for_dataset(study.spec.dataset))
        except (DriftInputError, FedHealthError) as exc:
            log.warning("study %s: drift not assessed (%s)", study.id, exc)
            return
        self.audit.append(
            AuditEventType.DRIFT_CHECKED,
            {
                "study_id": study.id,
                "study": study.name,
                "dataset": study.spec.dataset,
                "reference_study_id": reference.id,
                "reference": reference.name,
                **result,
            },
            actor=ACTOR,
        )
        if result["level"] != "ok":
            worst = [f for f in result["findings"] if f["level"] == result["level"]]
            log.warning(
                "drift %s for study %s against %s: %s",
                result["level"],
                study.id,
                reference.id,
                ", ".join(f"{f['feature']} at {f['site'] or 'all sites'} (PSI {f['psi']})" for f in worst),
            )
