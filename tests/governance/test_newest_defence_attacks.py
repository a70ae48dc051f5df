"""Attacks on the newest governance defences (docs/governance.md): the owner keys a site pins (table
``gov_owner_keys``, ``owner_key.pinned`` entries, ``fedhealth site approvals trust-key``) and the writer's
signature on the log heads a peer anchors (``LogHead.signature``, ``audit verify --peer``).

Played by a malicious orchestrator (it delivers every spec and its key, and holds every head a site attests),
by a steward's slip that an attacker could count on, and by a peer replaying heads it was given.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_audit_and_approval_attacks import SITE, T0, federation, party, problem, sql

from fedhealth.cli._governance import HomeKind
from fedhealth.core import CryptoError, InputError, ManualClock
from fedhealth.crypto import IdentityKey
from fedhealth.governance import (
    ApprovalRegistry,
    AuditEventType,
    AuditLog,
    AuditProblem,
    LogHead,
    SignedSpec,
    commit_round,
)
from fedhealth.governance._audit import _signing_message  # what an audit head's signature covers

__all__ = ["federation"]  # the two-log federation of test_audit_and_approval_attacks, used here too


@pytest.fixture
def site(tmp_path: Path, sqlite_template: Path) -> tuple[ApprovalRegistry, AuditLog]:
    p = party(tmp_path, sqlite_template, HomeKind.SITE, SITE, ManualClock(T0))
    return ApprovalRegistry(p.engine, p.log), p.log


def signed_spec(key: IdentityKey, *, owner: str = "alice", rounds: int = 3) -> SignedSpec:
    body = {"name": "sepsis-risk", "owner": owner, "dataset": "icu-2024", "rounds": rounds}
    return SignedSpec.sign(body, owner=owner, key=key)


def pins(log: AuditLog) -> list[dict[str, object]]:
    """The ``owner_key.pinned`` payloads, without the salt a site's log adds to each."""
    entries = [e for e in log.entries() if e.type == AuditEventType.OWNER_KEY_PINNED]
    return [{k: v for k, v in e.payload.items() if k != "salt"} for e in entries]


# --- owner-key pinning --------------------------------------------------------------------------------------


@pytest.mark.parametrize("typed", ["Alice", "alice ", " alice", "alice\x00", "ａlice", "alice\n"])
def test_a_steward_cannot_pin_a_key_under_an_owner_name_no_spec_can_carry(site, typed):
    """A pin under "Alice" (or with a space, a NUL, a full-width letter) protects no spec: every spec names a
    lowercase owner, so the real "alice" would still be pinned on first use to whatever key the orchestrator
    sends. The steward is told, rather than left believing alice's key is pinned."""
    registry, log = site
    honest = IdentityKey.generate()
    with pytest.raises(InputError, match="owner"):
        registry.trust_key(typed, honest.public(), steward="dora", reason="read out by phone")
    assert pins(log) == []
    # the orchestrator's own key is then pinned on first use, as documented: nothing was pinned for alice
    forged = signed_spec(IdentityKey.generate())
    assert registry.submit(forged).owner_key_fingerprint == forged.owner_key.fingerprint


def test_a_first_use_pin_racing_the_stewards_pin_never_replaces_it(site, monkeypatch):
    """The steward pins alice's key while the agent registers a spec the orchestrator signed with its own
    key: the agent read "no pin yet" just before the steward's pin committed. First use pins only where
    nothing is pinned; it never overwrites the steward's key."""
    registry, log = site
    honest, forged = IdentityKey.generate(), IdentityKey.generate()
    registry.trust_key("alice", honest.public(), steward="dora", reason="read out by phone")
    read = ApprovalRegistry.owner_key
    stale = iter([None])  # the agent's first read came before the steward's pin
    monkeypatch.setattr(ApprovalRegistry, "owner_key", lambda self, owner: next(stale, read(self, owner)))
    with pytest.raises(CryptoError, match="this site trusts key"):
        registry.submit(signed_spec(forged))
    monkeypatch.undo()
    assert registry.owner_key("alice") == honest.public()
    assert [p["by"] for p in pins(log)] == ["steward:dora"]


def test_a_changed_owner_key_is_refused_until_the_steward_trusts_it_and_every_pin_is_logged(site):
    registry, log = site
    first, second = IdentityKey.generate(), IdentityKey.generate()
    registry.submit(signed_spec(first))
    with pytest.raises(CryptoError, match=first.public().fingerprint[:16]):
        registry.submit(signed_spec(second, rounds=4))
    assert registry.owner_key("alice") == first.public()
    registry.trust_key("alice", second.public(), steward="dora", reason="new laptop, key read out by phone")
    record = registry.submit(signed_spec(second, rounds=4))
    # what `approvals show` prints is the key that signed the spec, which is the key now pinned
    assert (
        record.owner_key_fingerprint == second.public().fingerprint == registry.owner_key("alice").fingerprint
    )
    assert pins(log) == [
        {"owner": "alice", "fingerprint": first.public().fingerprint, "by": "first use"},
        {
            "owner": "alice",
            "fingerprint": second.public().fingerprint,
            "by": "steward:dora",
            "previous_fingerprint": first.public().fingerprint,
            "reason": "new laptop, key read out by phone",
        },
    ]
    assert log.verify().ok
    with pytest.raises(CryptoError):  # the old key no longer signs alice's specs
        registry.submit(signed_spec(first, rounds=5))


def test_a_spec_signed_for_one_owner_cannot_be_pinned_or_recorded_under_another(site):
    registry, log = site
    key = IdentityKey.generate()
    body = {"name": "sepsis-risk", "owner": "alice", "dataset": "icu-2024", "rounds": 3}
    relabelled = SignedSpec.sign(body, owner="mallory", key=key)
    with pytest.raises(CryptoError, match="names owner 'alice'"):
        registry.submit(relabelled)
    assert pins(log) == []


# --- signed log heads ---------------------------------------------------------------------------------------


def test_a_peer_renumbering_a_head_the_site_signed_cannot_frame_its_log_as_rewritten(federation):
    """The signature covers the entry's hash; the seq beside it is the peer's word. The orchestrator holds
    heads the site really signed and commits one of them under another number: the site's log holds that
    signed entry, unchanged, at its own number, so nothing was rewritten."""
    fed = federation
    real = fed.site.log.head()
    relabelled = LogHead(seq=real.seq - 2, entry_hash=real.entry_hash, signature=real.signature)
    assert relabelled.signed_by(fed.site.key.public())
    commit_round(
        fed.orchestrator.log, study_id="st-1", round=4, model_digest=None, site_heads={SITE: relabelled}
    )
    assert fed.site.log.verify().ok
    assert problem(fed.verify_site()) is None
    # a head numbered past the end is no proof of truncation either
    beyond = LogHead(seq=real.seq + 50, entry_hash=real.entry_hash, signature=real.signature)
    commit_round(fed.orchestrator.log, study_id="st-1", round=5, model_digest=None, site_heads={SITE: beyond})
    assert problem(fed.verify_site()) is None


def test_a_head_signed_by_another_sites_key_is_not_the_sites_word(federation):
    fed = federation
    other = IdentityKey.generate()
    real = fed.site.log.head()
    fake_hash = "0f" * 32
    stranger = LogHead(
        seq=real.seq - 1, entry_hash=fake_hash, signature=other.sign(_signing_message(fake_hash))
    )
    assert not stranger.signed_by(fed.site.key.public())
    commit_round(
        fed.orchestrator.log, study_id="st-1", round=4, model_digest=None, site_heads={SITE: stranger}
    )
    assert problem(fed.verify_site()) is None


def test_a_site_truncating_its_log_and_presenting_an_older_head_is_caught_by_the_head_it_signed(federation):
    """Replaying an old, genuinely signed head does not hide a truncation: the orchestrator holds the later
    heads the site signed, and those are missing now."""
    fed = federation
    end = fed.site.log.head().seq
    sql(fed.site.engine, "DELETE FROM gov_audit_entries WHERE seq > :s", s=end - 3)
    report = fed.verify_site()
    assert problem(report) is not None
    assert problem(report)[1] is AuditProblem.ANCHOR_MISSING


def test_a_signature_stripped_from_a_head_makes_it_no_evidence_either_way(federation):
    fed = federation
    real = fed.site.log.head()
    stripped = LogHead(seq=real.seq - 1, entry_hash="0f" * 32)
    assert LogHead.from_json(stripped.to_json()).signature is None
    assert not stripped.signed_by(fed.site.key.public())
    commit_round(
        fed.orchestrator.log, study_id="st-1", round=4, model_digest=None, site_heads={SITE: stripped}
    )
    assert problem(fed.verify_site()) is None
