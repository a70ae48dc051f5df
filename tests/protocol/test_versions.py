"""Versions on the wire: two sides speak the newest protocol both know, a side outside the other's range gets
one sentence saying what to upgrade, and a field added by a newer protocol is negotiated, not refused."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from fedhealth.protocol import (
    PROTOCOL_VERSION,
    PeerVersion,
    ProtocolMismatch,
    StudyInfo,
    TaskPoll,
    for_peer,
    from_peer,
    negotiate,
    version_headers,
)
from fedhealth.protocol import _versions as versions
from support import breast_spec

NOW = datetime(2026, 12, 6, tzinfo=UTC)


def v(protocol: int, oldest: int | None = None) -> PeerVersion:
    return PeerVersion(
        protocol=protocol, min_protocol=oldest if oldest is not None else protocol, software="x"
    )


def test_overlapping_ranges_speak_the_newest_protocol_both_know():
    assert negotiate(v(3, 1), v(2, 1), where="at this site") == 2
    assert negotiate(v(2, 1), v(4, 2), where="at this site") == 2
    assert negotiate(v(1), v(1), where="at this site") == 1


def test_an_agent_too_old_is_told_to_upgrade_at_its_site():
    with pytest.raises(ProtocolMismatch) as refused:
        negotiate(v(3), v(2), where="at this site")
    assert (
        str(refused.value) == "orchestrator speaks protocol 3, this agent 2: upgrade fedhealth at this site"
    )


def test_an_agent_too_new_is_told_to_upgrade_the_orchestrator():
    with pytest.raises(ProtocolMismatch) as refused:
        negotiate(v(1), v(3, 2), where="at this site")
    assert str(refused.value) == (
        "orchestrator speaks protocol 1, this agent 3 (oldest 2): "
        "upgrade the orchestrator, or run an older fedhealth at this site"
    )


def test_versions_round_trip_through_headers_and_a_peer_without_them_is_none():
    headers = version_headers("9.9.9", protocol=4, min_protocol=2)
    assert PeerVersion.from_headers(headers) == PeerVersion(protocol=4, min_protocol=2, software="9.9.9")
    assert PeerVersion.from_headers({"x-fedhealth-protocol": "3"}) == PeerVersion(protocol=3, min_protocol=3)
    assert PeerVersion.from_headers({}) is None
    with pytest.raises(ProtocolMismatch, match="not a number"):
        PeerVersion.from_headers({"X-Fedhealth-Protocol": "three"})


def _task_poll_json(extra: dict[str, object]) -> str:
    spec = breast_spec(["a"], rounds=1)
    task = {
        "task_id": "tk_1",
        "study_id": "st_1",
        "round": 1,
        "kind": "train",
        "dataset": spec.dataset,
        "recipe": spec.recipe.model_dump(mode="json"),
        "model_digest": "0" * 64,
        "seed": spec.seed,
        "deadline": NOW.isoformat(),
        "spec": spec.model_dump(mode="json"),
        **extra,
    }
    return json.dumps({"task": task})


def test_a_field_from_a_newer_protocol_is_dropped_not_refused():
    text = _task_poll_json({"priority": "high"})  # what a protocol-(N+1) orchestrator might add
    poll = from_peer(TaskPoll, text, PROTOCOL_VERSION + 1)
    assert poll.task is not None
    assert poll.task.task_id == "tk_1"
    assert "priority" not in poll.task.model_dump()


def test_an_unknown_field_from_a_peer_of_the_same_protocol_is_still_an_error():
    text = _task_poll_json({"priorty": "high"})  # a typo, not a newer protocol
    with pytest.raises(ValidationError, match="priorty"):
        from_peer(TaskPoll, text, PROTOCOL_VERSION)
    with pytest.raises(ValidationError):
        from_peer(TaskPoll, text, None)


def test_unknown_fields_are_dropped_inside_nested_messages_too():
    info = StudyInfo(
        study_id="st_1",
        spec=breast_spec(["a"], rounds=1),
        status="running",
        reason=None,
        created_at=NOW,
        ended_at=None,
        completed_rounds=0,
        current_round=1,
        model_digest=None,
        rounds=[],
    ).model_dump(mode="json")
    info["rounds"] = [
        {
            "number": 1,
            "kind": "train",
            "status": "open",
            "started_at": NOW.isoformat(),
            "ended_at": None,
            "reason": None,
            "model_digest": None,
            "tasks": [{"task_id": "t", "site": "a", "kind": "train", "status": "pending", "new_in_v9": 1}],
        }
    ]
    info["new_top_level"] = True
    parsed = from_peer(StudyInfo, info, PROTOCOL_VERSION + 1)
    assert parsed.rounds[0].tasks[0].site == "a"


def test_a_sender_leaves_out_the_fields_its_peer_does_not_have_yet(monkeypatch):
    monkeypatch.setitem(versions.FIELDS_SINCE, "StudyInfo", {"approvals": 2, "approval_deadline": 2})
    info = StudyInfo(
        study_id="st_1",
        spec=breast_spec(["a"], rounds=1),
        status="awaiting_approval",
        reason=None,
        created_at=NOW,
        ended_at=None,
        completed_rounds=0,
        current_round=None,
        model_digest=None,
        approvals={"a": "pending"},
    )
    old = for_peer(info, 1)
    assert "approvals" not in old
    assert "approval_deadline" not in old
    assert old["spec"] == info.spec.model_dump(mode="json")  # the spec is whole: it is approved by its hash
    assert for_peer(info, 2)["approvals"] == {"a": "pending"}
