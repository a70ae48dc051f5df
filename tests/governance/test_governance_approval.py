"""Study approval: the steward approves an exact spec hash; anything else is refused, with the reason."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedhealth.core import CryptoError, InputError, NotFoundError
from fedhealth.crypto import IdentityKey
from fedhealth.governance import (
    ApprovalRegistry,
    ApprovalStatus,
    AuditEventType,
    Rule,
    SignedSpec,
    spec_hash,
)
from fedhealth.protocol._models import StudySpec
from support import logreg_recipe


def study_spec(**changes: Any) -> dict[str, Any]:
    base = {
        "name": "sepsis-risk",
        "owner": "alice",
        "dataset": "icu-2024",
        "recipe": logreg_recipe(12),
        "rounds": 5,
        "train_sites": ["hospital-a", "hospital-b"],
    }
    return StudySpec(**{**base, **changes}).model_dump(mode="json")


def test_spec_hash_is_sha256_of_sorted_compact_utf8_json():
    spec = study_spec()
    expected = hashlib.sha256(
        json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    ).hexdigest()
    assert spec_hash(spec) == expected


@given(st.permutations(list(study_spec().items())))
def test_spec_hash_does_not_depend_on_key_order(items):
    assert spec_hash(dict(items)) == spec_hash(study_spec())


@given(st.integers(min_value=1, max_value=100_000).filter(lambda r: r != 5))
def test_any_change_to_a_parameter_changes_the_spec_hash(rounds):
    assert spec_hash(study_spec(rounds=rounds)) != spec_hash(study_spec())


def test_a_spec_that_is_not_json_data_has_no_hash():
    with pytest.raises(InputError):
        spec_hash({"name": "x", "rounds": float("inf")})


def test_a_signed_spec_verifies_and_round_trips_through_json():
    owner_key = IdentityKey.generate()
    signed = SignedSpec.sign(study_spec(), owner="alice", key=owner_key)
    signed.verify({"alice": owner_key.public()})
    again = SignedSpec.from_json(json.loads(json.dumps(signed.to_json())))
    again.verify({"alice": owner_key.public()})
    assert again.spec_hash == spec_hash(study_spec())


def test_a_signed_spec_whose_spec_was_changed_fails_verification():
    signed = SignedSpec.sign(study_spec(), owner="alice", key=IdentityKey.generate())
    changed = SignedSpec(
        spec=study_spec(rounds=50), owner=signed.owner, signature=signed.signature, owner_key=signed.owner_key
    )
    with pytest.raises(CryptoError):
        changed.verify()


def test_a_signed_spec_from_a_key_not_trusted_for_its_owner_fails_verification():
    signed = SignedSpec.sign(study_spec(), owner="alice", key=IdentityKey.generate())
    with pytest.raises(CryptoError, match="not trusted"):
        signed.verify({"alice": IdentityKey.generate().public()})


def test_a_spec_signed_as_someone_other_than_its_owner_fails_verification():
    signed = SignedSpec.sign(study_spec(), owner="mallory", key=IdentityKey.generate())
    with pytest.raises(CryptoError, match="owner"):
        signed.verify()


@pytest.mark.parametrize(
    "value",
    [[], {"spec": {}}, {"spec": {}, "owner": "a", "signature": "zz", "owner_key": "00"}],
    ids=["not-object", "missing-fields", "bad-hex"],
)
def test_a_malformed_signed_spec_is_refused(value):
    with pytest.raises(InputError):
        SignedSpec.from_json(value)


class ApprovalContract:
    backend: str

    @pytest.fixture
    def registry(self, engine, site_log) -> ApprovalRegistry:
        return ApprovalRegistry(engine, site_log)

    def test_an_approved_spec_is_allowed(self, registry):
        submitted = registry.submit(study_spec())
        assert submitted.status is ApprovalStatus.PENDING
        registry.approve(submitted.spec_hash, reason="IRB 2026-114 approved", steward="dana")
        decision = registry.check(study_spec())
        assert decision.allowed
        assert decision.rule is Rule.STUDY_APPROVAL
        assert "IRB 2026-114" in decision.reason

    def test_a_spec_changed_after_approval_is_refused_as_changed_after_approval(self, registry):
        approved = registry.submit(study_spec())
        registry.approve(approved.spec_hash, reason="ok", steward="dana")
        decision = registry.check(study_spec(rounds=500))
        assert not decision.allowed
        assert decision.rule is Rule.STUDY_APPROVAL
        assert "changed after approval" in decision.reason
        assert approved.spec_hash[:12] in decision.reason

    def test_a_changed_spec_is_still_refused_after_it_was_submitted_but_not_approved(self, registry):
        registry.approve(registry.submit(study_spec()).spec_hash, reason="ok", steward="dana")
        registry.submit(study_spec(rounds=500))
        assert "changed after approval" in registry.check(study_spec(rounds=500)).reason

    def test_a_spec_never_submitted_is_refused_as_not_approved(self, registry):
        decision = registry.check(study_spec())
        assert not decision.allowed
        assert "not approved" in decision.reason

    def test_a_pending_spec_is_refused_as_pending(self, registry):
        registry.submit(study_spec())
        decision = registry.check(study_spec())
        assert not decision.allowed
        assert "pending" in decision.reason

    def test_a_rejected_spec_is_refused_with_the_stewards_reason(self, registry):
        digest = registry.submit(study_spec()).spec_hash
        registry.reject(digest, reason="no IRB approval on file", steward="dana")
        decision = registry.check(study_spec())
        assert not decision.allowed
        assert "no IRB approval on file" in decision.reason

    def test_rejecting_an_approved_spec_revokes_it(self, registry):
        digest = registry.submit(study_spec()).spec_hash
        registry.approve(digest, reason="ok", steward="dana")
        registry.reject(digest, reason="consent scope too narrow", steward="erin")
        assert not registry.check(study_spec()).allowed
        assert registry.get(digest).decided_by == "erin"

    def test_every_steward_action_is_in_the_site_audit_log_with_its_reason(self, registry, site_log):
        digest = registry.submit(study_spec()).spec_hash
        registry.approve(digest, reason="IRB ok", steward="dana")
        registry.reject(digest, reason="revoked", steward="dana")
        entries = site_log.entries()
        assert [e.type for e in entries] == [
            AuditEventType.STUDY_SUBMITTED,
            AuditEventType.STUDY_APPROVED,
            AuditEventType.STUDY_REJECTED,
        ]
        assert [e.payload.get("reason") for e in entries[1:]] == ["IRB ok", "revoked"]
        assert all(e.payload["spec_hash"] == digest for e in entries)
        assert entries[1].actor == "steward:dana"
        assert site_log.verify().ok

    def test_an_approval_whose_audit_entry_cannot_be_written_is_not_applied(
        self, registry, site_log, monkeypatch
    ):
        digest = registry.submit(study_spec()).spec_hash

        def broken(*args, **kwargs):
            raise RuntimeError("disk full")

        monkeypatch.setattr(site_log, "_append_on", broken)
        with pytest.raises(RuntimeError, match="disk full"):
            registry.approve(digest, reason="IRB ok", steward="dana")
        monkeypatch.undo()
        assert registry.get(digest).status is ApprovalStatus.PENDING
        assert not registry.check(study_spec()).allowed
        assert site_log.head().seq == 1

    def test_submitting_the_same_spec_twice_is_one_submission(self, registry, site_log):
        registry.submit(study_spec())
        registry.submit(study_spec())
        assert len(registry.list()) == 1
        assert site_log.head().seq == 1

    def test_a_signed_spec_is_verified_before_it_is_registered(self, registry):
        owner_key = IdentityKey.generate()
        signed = SignedSpec.sign(study_spec(), owner="alice", key=owner_key)
        assert registry.submit(signed, trusted_owner_keys={"alice": owner_key.public()}).signed
        forged = SignedSpec(
            spec=study_spec(rounds=9), owner="alice", signature=signed.signature, owner_key=owner_key.public()
        )
        with pytest.raises(CryptoError):
            registry.submit(forged)
        assert len(registry.list()) == 1

    def test_approving_a_hash_that_was_never_submitted_is_not_found(self, registry):
        with pytest.raises(NotFoundError):
            registry.approve(spec_hash(study_spec()), reason="ok", steward="dana")

    def test_a_hash_prefix_resolves_to_the_one_submitted_spec(self, registry):
        digest = registry.submit(study_spec()).spec_hash
        assert registry.resolve(digest[:10]) == digest
        with pytest.raises(InputError):
            registry.resolve(digest[:4])
        with pytest.raises(NotFoundError):
            registry.resolve("f" * 12 if not digest.startswith("f" * 12) else "0" * 12)

    def test_listing_filters_by_study_and_status(self, registry):
        a = registry.submit(study_spec()).spec_hash
        registry.submit(study_spec(name="other-study"))
        registry.approve(a, reason="ok", steward="dana")
        assert [x.spec_hash for x in registry.list(status=ApprovalStatus.APPROVED)] == [a]
        assert [x.study for x in registry.list(study="other-study")] == ["other-study"]


class TestApprovalOnSqlite(ApprovalContract):
    backend = "sqlite"


@pytest.mark.postgres
class TestApprovalOnPostgres(ApprovalContract):
    backend = "postgres"


@pytest.fixture
def registry(engine, site_log) -> ApprovalRegistry:
    return ApprovalRegistry(engine, site_log)


@pytest.mark.parametrize(
    ("digest", "reason", "steward"),
    [("abc", "ok", "dana"), (None, "  ", "dana"), (None, "ok", "")],
    ids=["bad-hash", "blank-reason", "no-steward"],
)
def test_a_steward_decision_without_hash_reason_or_name_is_refused(registry, digest, reason, steward):
    real = registry.submit(study_spec()).spec_hash
    with pytest.raises(InputError):
        registry.approve(digest or real, reason=reason, steward=steward)
    assert registry.get(real).status is ApprovalStatus.PENDING
