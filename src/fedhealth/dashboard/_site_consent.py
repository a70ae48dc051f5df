"""The site dashboard's consent-withdrawal flags: which studies trained on data of patients who later withdrew
their consent, as counts, so the steward sees what to act on (ask the study's owner to retrain or retire the
model versions, as the orchestrator's flags on them say).

Read from the site's own signed audit log alone, so it holds whether or not the orchestrator was told yet:

- ``update.sent``: each training update the site sent, with the consent snapshot (the patients it used);
- ``consent.withdrawn``: each withdrawal, with the snapshots that included the patient;
- ``task.received``: the study's dataset and spec hash (its name comes from the approvals registry).

A study is flagged when one of its updates used a snapshot a withdrawal names. Every model version of that
study from the first such round on carries the withdrawn data (the orchestrator flags them, and the versions
derived from them, when the site reports the withdrawal: ``fedhealth site consent sync``).

The log only grows, so the entries are folded in once, incrementally: a page load reads only the entries
appended since the last one. Patient ids are held in memory to count distinct patients and are never shown.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine, select

from fedhealth.governance import GOVERNANCE_METADATA, AuditEventType, list_study_approvals

_ENTRIES = GOVERNANCE_METADATA.tables["gov_audit_entries"]
_TYPES = (
    AuditEventType.TASK_RECEIVED.value,
    AuditEventType.UPDATE_SENT.value,
    AuditEventType.CONSENT_WITHDRAWN.value,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyFlag:
    """One study that trained on data of patients who withdrew later (counts only)."""

    study_id: str
    study: str  # the approved spec's name ("" if the site never registered the spec)
    dataset: str
    withdrawals: int  # withdrawal notices naming a snapshot the study trained on
    patients: int  # distinct patients behind them
    updates: int  # training updates sent with such a snapshot
    rounds: tuple[int, ...]  # the rounds of those updates
    first_withdrawn_at: str
    last_withdrawn_at: str

    @property
    def first_round(self) -> int:
        return self.rounds[0]


@dataclass(slots=True)
class _Notice:
    patient: str
    withdrawn_at: str
    snapshots: tuple[str, ...]


@dataclass(slots=True)
class _Folded:
    seq: int = 0
    studies: dict[str, tuple[str, str]] = field(default_factory=dict)  # study id -> (spec hash, dataset)
    updates: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # snapshot -> (study, round)
    notices: list[_Notice] = field(default_factory=list)


class WithdrawalFlags:
    """The flags of one site's log (module docstring); one instance per dashboard process."""

    def __init__(self) -> None:
        self._folded = _Folded()
        self._log_id: str | None = None
        self._lock = threading.Lock()
        self._affected: dict[str, _Affected] | None = None  # computed at the folded seq; None: stale

    def _fold_new_entries(self, engine: Engine, log_id: str) -> None:
        if log_id != self._log_id:  # another log (never, for one site): start over
            self._folded, self._log_id, self._affected = _Folded(), log_id, None
        c = _ENTRIES.c
        with engine.connect() as conn:
            rows = conn.execute(
                select(c.seq, c.type, c.payload)
                .where((c.log_id == log_id) & (c.seq > self._folded.seq) & c.type.in_(_TYPES))
                .order_by(c.seq)
            ).all()
        folded = self._folded
        for seq, kind, text in rows:
            payload = json.loads(text)
            if kind == AuditEventType.TASK_RECEIVED.value:
                study = (str(payload.get("spec_hash", "")), str(payload.get("dataset", "")))
                folded.studies.setdefault(str(payload.get("study_id")), study)
            elif kind == AuditEventType.UPDATE_SENT.value:
                snapshot = payload.get("consent_snapshot")
                if snapshot:
                    folded.updates.setdefault(str(snapshot), []).append(
                        (str(payload.get("study_id")), int(payload.get("round") or 0))
                    )
            elif "notice_id" in payload:  # consent.withdrawn
                folded.notices.append(
                    _Notice(
                        patient=str(payload.get("patient_id")),
                        withdrawn_at=str(payload.get("withdrawn_at", "")),
                        snapshots=tuple(str(s) for s in payload.get("affected_snapshots") or ()),
                    )
                )
            folded.seq = max(folded.seq, int(seq))
        if rows:
            self._affected = None

    def _per_study(self) -> dict[str, _Affected]:
        """Which studies each withdrawal touches (recomputed only after new entries were folded in)."""
        if self._affected is None:
            folded = self._folded
            per_study: dict[str, _Affected] = {}
            for number, notice in enumerate(folded.notices):
                for snapshot in notice.snapshots:
                    for study_id, round_ in folded.updates.get(snapshot, ()):
                        seen = per_study.setdefault(study_id, _Affected())
                        seen.notices.add(number)
                        seen.patients.add(notice.patient)
                        seen.updates.add((snapshot, round_))
                        seen.times.add(notice.withdrawn_at)
            self._affected = per_study
        return self._affected

    def flags(self, engine: Engine, log_id: str) -> tuple[list[StudyFlag], int]:
        """(the flagged studies, most recent withdrawal first; the number of withdrawals logged) of the log
        ``log_id`` in the site database ``engine``."""
        with self._lock:
            self._fold_new_entries(engine, log_id)
            per_study = self._per_study()
            withdrawals = len(self._folded.notices)
            studies = {s: self._folded.studies.get(s, ("", "")) for s in per_study}
        names = {a.spec_hash: a.study for a in list_study_approvals(engine)} if per_study else {}
        out = []
        for study_id, seen in per_study.items():
            spec_hash, dataset = studies[study_id]
            times = sorted(seen.times)
            out.append(
                StudyFlag(
                    study_id=study_id,
                    study=names.get(spec_hash) or "",
                    dataset=dataset,
                    withdrawals=len(seen.notices),
                    patients=len(seen.patients),
                    updates=len(seen.updates),
                    rounds=tuple(sorted({r for _, r in seen.updates})),
                    first_withdrawn_at=times[0],
                    last_withdrawn_at=times[-1],
                )
            )
        out.sort(key=lambda f: (f.last_withdrawn_at, f.study_id), reverse=True)
        return out, withdrawals


@dataclass(slots=True)
class _Affected:
    notices: set[int] = field(default_factory=set)
    patients: set[str] = field(default_factory=set)
    updates: set[tuple[str, int]] = field(default_factory=set)
    times: set[str] = field(default_factory=set)
