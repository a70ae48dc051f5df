"""Cross-anchoring: the orchestrator and the sites hold each other's log heads.

At the end of a round the orchestrator appends a ``round.committed`` entry holding each participating site's
log head (as the site reported it with its update); that entry's own head is the *round commitment*,
which each site appends to its log as an ``anchor.recorded`` entry. Afterwards neither side can rewrite
history before those points unnoticed, even with its own key:
``verify_anchor(site_entries, site_anchors(orchestrator_entries, site))`` and
``verify_anchor(orchestrator_entries, orchestrator_anchors(site_entries))`` name the entry that no longer
matches, and :func:`verify_round_anchors` names an old head given to a site as a new round's commitment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fedhealth.core import InputError
from fedhealth.crypto import PublicIdentity
from fedhealth.governance._audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditEventType,
    AuditLog,
    AuditProblem,
    BadEntry,
    LogHead,
    VerificationReport,
)


def round_commitment_payload(
    *, study_id: str, round: int, model_digest: str | None, site_heads: Mapping[str, LogHead]
) -> dict[str, Any]:
    """The payload of the orchestrator's ``round.committed`` entry."""
    return {
        "study_id": study_id,
        "round": round,
        "model_digest": model_digest,
        "site_heads": {site: head.to_json() for site, head in sorted(site_heads.items())},
    }


def commit_round(
    orchestrator_log: AuditLog,
    *,
    study_id: str,
    round: int,
    model_digest: str | None,
    site_heads: Mapping[str, LogHead],
) -> AuditEntry:
    """Append the round commitment at the orchestrator; send ``entry.head`` to the sites to anchor."""
    payload = round_commitment_payload(
        study_id=study_id, round=round, model_digest=model_digest, site_heads=site_heads
    )
    return orchestrator_log.append(AuditEventType.ROUND_COMMITTED, payload)


def record_anchor(
    site_log: AuditLog,
    *,
    study_id: str,
    round: int,
    orchestrator_head: LogHead,
    own_head: LogHead | None = None,
) -> AuditEntry:
    """Append the orchestrator's round commitment to a site's log (with the site's own head it included)."""
    payload: dict[str, Any] = {
        "study_id": study_id,
        "round": round,
        "orchestrator_head": orchestrator_head.to_json(),
    }
    if own_head is not None:
        payload["own_head"] = own_head.to_json()
    return site_log.append(AuditEventType.ANCHOR_RECORDED, payload)


def site_anchors(orchestrator_entries: Iterable[AuditEntry], site: str) -> list[LogHead]:
    """The heads of ``site``'s log that the orchestrator's round commitments hold."""
    heads: list[LogHead] = []
    for entry in orchestrator_entries:
        if entry.type == AuditEventType.ROUND_COMMITTED:
            raw = entry.payload.get("site_heads", {})
            if isinstance(raw, Mapping) and site in raw:
                heads.append(_head(raw[site], entry))
    return heads


def orchestrator_anchors(site_entries: Iterable[AuditEntry]) -> list[LogHead]:
    """The heads of the orchestrator's log that a site recorded."""
    return [
        _head(entry.payload.get("orchestrator_head"), entry)
        for entry in site_entries
        if entry.type == AuditEventType.ANCHOR_RECORDED
    ]


def verify_round_anchors(
    orchestrator_entries: Iterable[AuditEntry],
    site_logs: Mapping[str, Iterable[AuditEntry]],
    orchestrator_key: PublicIdentity,
) -> VerificationReport:
    """Check that every round commitment a site anchored is the entry that commits that round, with the site
    in it; name the lowest orchestrator entry that is not.

    :func:`verify_anchor` proves an anchored entry is still there, unchanged; it cannot tell that the
    orchestrator gave a site an *old* signed head (another round's, another site's round, or any other
    entry) as a new round's commitment, which leaves the history after that head unanchored at the site.
    Each ``anchor.recorded`` entry names the study and round it was given for, so this is checked here. Only
    heads ``orchestrator_key`` signed count (anything else is the site's word), and the round the site
    names is the site's word too: a failure reads "replayed to the site, or the site's log misstates it".
    ``site_logs`` maps each site's name to its log's entries.
    """
    entries = list(orchestrator_entries)
    by_hash = {e.entry_hash: e for e in entries}
    disputes: list[BadEntry] = []
    for site, site_entries in sorted(site_logs.items()):
        for anchor in site_entries:
            if anchor.type != AuditEventType.ANCHOR_RECORDED:
                continue
            try:
                head = _head(anchor.payload.get("orchestrator_head"), anchor)
            except InputError:
                continue  # a malformed head binds nothing (the site's chain check names its entry)
            committed = by_hash.get(head.entry_hash)
            if committed is None or not head.signed_by(orchestrator_key):
                continue  # missing or rewritten: verify_anchor names it; unsigned: not the orchestrator's
            claimed = (anchor.payload.get("study_id"), anchor.payload.get("round"))
            wrong = _not_the_commitment(committed, claimed, site)
            if wrong is not None:
                disputes.append(
                    BadEntry(
                        seq=committed.seq,
                        problem=AuditProblem.ANCHOR_DISPUTED,
                        detail=(
                            f"{site} anchored it (its entry {anchor.seq}) as the commitment of study "
                            f"{claimed[0]} round {claimed[1]}, but {wrong}: an old head replayed to {site}, "
                            f"or {site}'s log misstates it"
                        ),
                    )
                )
    head = entries[-1].head if entries else LogHead(seq=0, entry_hash=GENESIS_HASH)
    first = min(disputes, key=lambda bad: bad.seq, default=None)
    return VerificationReport(checked=len(entries), head=head, first_bad=first)


def _not_the_commitment(entry: AuditEntry, claimed: tuple[Any, Any], site: str) -> str | None:
    """Why ``entry`` is not the commitment of ``claimed`` (study, round) naming ``site``; None if it is."""
    if entry.type != AuditEventType.ROUND_COMMITTED:
        return f"it is a {entry.type} entry, not a round commitment"
    study, number = entry.payload.get("study_id"), entry.payload.get("round")
    if (study, number) != claimed:
        return f"it commits study {study} round {number}"
    heads = entry.payload.get("site_heads")
    if not isinstance(heads, Mapping) or site not in heads:
        return f"that round's commitment holds no head of {site}"
    return None


def _head(value: Any, entry: AuditEntry) -> LogHead:
    try:
        return LogHead.from_json(value)
    except InputError as exc:
        raise InputError(f"entry {entry.seq} holds a malformed log head: {exc}") from exc
