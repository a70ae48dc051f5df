"""Cross-anchoring: the orchestrator and the sites hold each other's log heads.

At the end of a round the orchestrator appends a ``round.committed`` entry holding each participating site's
log head (as the site reported it with its update); that entry's own head is the *round commitment*,
which each site appends to its log as an ``anchor.recorded`` entry. Afterwards neither side can rewrite
history before those points unnoticed, even with its own key:
``verify_anchor(site_entries, site_anchors(orchestrator_entries, site))`` and
``verify_anchor(orchestrator_entries, orchestrator_anchors(site_entries))`` name the entry that no longer
matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fedhealth.core import InputError
from fedhealth.governance._audit import AuditEntry, AuditEventType, AuditLog, LogHead


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


def _head(value: Any, entry: AuditEntry) -> LogHead:
    try:
        return LogHead.from_json(value)
    except InputError as exc:
        raise InputError(f"entry {entry.seq} holds a malformed log head: {exc}") from exc
