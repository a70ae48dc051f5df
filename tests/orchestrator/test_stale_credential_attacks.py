"""An attacker holding a stale or stolen credential, against the orchestrator's real AuthService and store
(docs/security.md, "Sites", "Enrollment-token lifecycle", "Operators"; docs/governance.md, "Spec
signatures"): what the e2e tests (test_identity, test_takeover, test_enrollment_tokens, test_auth_cache) do
not already try.

- an operator token issued before ``user new-key`` (a leaked key replaced) or before the user was revoked,
  still inside its 15 minutes, is refused at its next request; the old API key no longer logs in;
- an operator token expires after 15 minutes even though its signature was verified (and cached) before;
- a role taken away counts at the next request, not when the token expires;
- a login challenge lives 2 minutes, is bound to the site it was issued to, and one fetched before a
  rotation does not log in the key enrolled after it;
- enrollment is no oracle: an unknown, pending, enrolled or revoked site answers a wrong token the same way,
  and a revoked site never enrolls again, even with a token that is valid in the database;
- a study signed with an owner's spec-signing key that an admin has since replaced is refused.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from fedhealth.core import ConflictError, ManualClock, canonical_json
from fedhealth.crypto import Audience, IdentityKey
from fedhealth.governance import SignedSpec
from fedhealth.orchestrator import (
    AuthService,
    OrchestratorSettings,
    Store,
    default_extensions,
    make_engine,
    sqlite_url,
    start_service,
    upgrade_database,
)
from fedhealth.orchestrator._auth import Forbidden, Unauthenticated
from fedhealth.orchestrator._db import enrollment_tokens, users
from fedhealth.orchestrator._governance import (
    GovernanceExtension,
    OwnerKeyBody,
    SignedStudyBody,
    register_signing_key,
    set_owner_key,
    submit_signed_study,
)
from fedhealth.orchestrator._home import secret_hash
from fedhealth.orchestrator._http import ApiError
from fedhealth.orchestrator._routes_admin import register_site
from fedhealth.orchestrator._routes_auth import enroll_site
from fedhealth.protocol import EnrollRequest, Role, SiteCreate, StudySpec, agent_login_message
from support import operator_principal, synthetic_recipe

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
BAD_TOKEN = "enrollment token is invalid, superseded, already used, or expired"


@pytest.fixture
def service(tmp_path):
    engine = make_engine(sqlite_url(tmp_path / "o.sqlite"))
    upgrade_database(engine)
    clock = ManualClock(T0)
    yield AuthService(Store(engine), IdentityKey.generate(), clock), clock
    engine.dispose()


def _enroll(auth: AuthService, site: str, key: IdentityKey | None = None) -> IdentityKey:
    key = key or IdentityKey.generate()
    auth.store.create_site(site, auth.clock.now())
    issued = auth.enrollment_token(site)
    auth.enroll(site=site, token=issued.token, public_key_hex=key.public().raw.hex())
    return key


def _sign(key: IdentityKey, site: str, challenge: str) -> str:
    return key.sign(canonical_json(agent_login_message(site, challenge))).hex()


def _agent_bearer(auth: AuthService, site: str, key: IdentityKey) -> str:
    challenge, _ = auth.challenge(site)
    token, _ = auth.agent_token(site=site, challenge=challenge, signature_hex=_sign(key, site, challenge))
    return f"Bearer {token}"


def _operator_bearer(auth: AuthService, user: str, api_key: str) -> str:
    token, _ = auth.operator_token(user=user, api_key=api_key)
    return f"Bearer {token}"


# --- operators: API keys, revocation, expiry, roles ------------------------------------------------------


def test_an_operator_token_issued_before_a_new_api_key_is_refused_at_its_next_request(service):
    auth, _ = service
    leaked = auth.new_user("rita", Role.RESEARCHER)
    stolen = _operator_bearer(auth, "rita", leaked)  # what the thief traded the leaked key for
    assert auth.authenticate(stolen, Audience.OPERATOR).name == "rita"  # verified (and cached) once
    fresh = auth.new_api_key("rita")  # `fedhealth user new-key rita`
    with pytest.raises(Unauthenticated, match="replaced API key"):
        auth.authenticate(stolen, Audience.OPERATOR)  # minutes before it would expire
    with pytest.raises(Unauthenticated):
        auth.operator_token(user="rita", api_key=leaked)  # the leaked key trades for nothing any more
    assert auth.authenticate(_operator_bearer(auth, "rita", fresh), Audience.OPERATOR).name == "rita"
    with pytest.raises(Unauthenticated):
        auth.authenticate(stolen, Audience.OPERATOR)  # and stays refused


def test_a_revoked_users_unexpired_operator_token_is_refused_at_its_next_request(service):
    auth, _ = service
    api_key = auth.new_user("audrey", Role.AUDITOR)
    bearer = _operator_bearer(auth, "audrey", api_key)
    for _ in range(2):
        assert auth.authenticate(bearer, Audience.OPERATOR).name == "audrey"
    assert auth.store.revoke_user("audrey", T0)
    with pytest.raises(Forbidden, match="revoked"):
        auth.authenticate(bearer, Audience.OPERATOR)
    with pytest.raises(Forbidden, match="revoked"):
        auth.operator_token(user="audrey", api_key=api_key)


def test_an_operator_token_expires_after_fifteen_minutes_though_it_was_verified_before(service):
    auth, clock = service
    api_key = auth.new_user("admin2", Role.ADMIN)
    bearer = _operator_bearer(auth, "admin2", api_key)
    assert auth.authenticate(bearer, Audience.OPERATOR).role is Role.ADMIN
    clock.advance(timedelta(minutes=14, seconds=50).total_seconds())
    assert auth.authenticate(bearer, Audience.OPERATOR).role is Role.ADMIN
    clock.advance(20)  # 15 minutes and 10 seconds after it was issued
    with pytest.raises(Unauthenticated, match="expired"):
        auth.authenticate(bearer, Audience.OPERATOR)


def test_a_role_taken_away_counts_at_the_next_request_not_when_the_token_expires(service):
    auth, _ = service
    api_key = auth.new_user("ann", Role.ADMIN)
    bearer = _operator_bearer(auth, "ann", api_key)
    assert auth.authenticate(bearer, Audience.OPERATOR).role is Role.ADMIN
    with auth.store.engine.begin() as c:  # demoted (no API for it yet: straight in the database)
        c.execute(sa.update(users).where(users.c.name == "ann").values(role=Role.AUDITOR.value))
    assert auth.authenticate(bearer, Audience.OPERATOR).role is Role.AUDITOR


# --- agent logins: challenges ------------------------------------------------------------------------------


def test_a_login_challenge_expires_after_two_minutes(service):
    auth, clock = service
    key = _enroll(auth, "alpha")
    challenge, expires = auth.challenge("alpha")
    assert expires - T0 == timedelta(minutes=2)
    clock.advance(121)
    with pytest.raises(Unauthenticated, match="unknown, already used, or expired"):
        auth.agent_token(site="alpha", challenge=challenge, signature_hex=_sign(key, "alpha", challenge))
    fresh, _ = auth.challenge("alpha")  # a fresh one works: the refusal was the expiry
    auth.agent_token(site="alpha", challenge=fresh, signature_hex=_sign(key, "alpha", fresh))


def test_a_challenge_issued_to_one_site_does_not_log_in_another(service):
    auth, _ = service
    _enroll(auth, "alpha")
    beta = _enroll(auth, "beta")
    alphas, _ = auth.challenge("alpha")  # seen on the wire, or fetched by beta in alpha's name
    with pytest.raises(Unauthenticated, match="challenge"):
        auth.agent_token(site="beta", challenge=alphas, signature_hex=_sign(beta, "beta", alphas))


def test_a_challenge_fetched_before_a_rotation_does_not_log_in_the_new_key(service):
    auth, _ = service
    _enroll(auth, "gamma")
    early, _ = auth.challenge("gamma")  # fetched while the old key was current
    token, _, _ = auth.rotate("gamma")
    new_key = IdentityKey.generate()
    auth.enroll(site="gamma", token=token, public_key_hex=new_key.public().raw.hex())
    with pytest.raises(Unauthenticated, match="challenge"):
        auth.agent_token(site="gamma", challenge=early, signature_hex=_sign(new_key, "gamma", early))
    _agent_bearer(auth, "gamma", new_key)  # a challenge fetched now works


def test_an_agent_token_of_a_rotated_key_is_refused_even_before_the_site_enrolls_again(service):
    auth, _ = service
    old = _enroll(auth, "delta")
    bearer = _agent_bearer(auth, "delta", old)
    auth.rotate("delta")  # pending, no key at all
    with pytest.raises(Unauthenticated):
        auth.authenticate(bearer, Audience.AGENT)
    with pytest.raises(Unauthenticated):
        auth.challenge("delta")  # the old key cannot even start a login


# --- enrollment: no oracle, revoked sites -------------------------------------------------------------------


def test_a_wrong_enrollment_token_gets_the_same_answer_whatever_the_site_state(service):
    auth, clock = service
    auth.store.create_site("pending", T0)
    auth.enrollment_token("pending")
    _enroll(auth, "active")
    auth.store.create_site("revoked", T0)
    auth.store.revoke_site("revoked", T0)
    answers = {}
    for site in ("nobody", "pending", "active", "revoked"):
        with pytest.raises((Unauthenticated, Forbidden, ConflictError)) as refused:
            auth.enroll(
                site=site, token="fhe_" + "w" * 43, public_key_hex=IdentityKey.generate().public().raw.hex()
            )
        answers[site] = (type(refused.value), str(refused.value))
    assert set(answers.values()) == {(Unauthenticated, BAD_TOKEN)}, answers
    # a spent token and an expired one answer the same too
    spent = auth.enrollment_token("pending").token
    auth.enroll(site="pending", token=spent, public_key_hex=IdentityKey.generate().public().raw.hex())
    with pytest.raises(Unauthenticated, match="invalid, superseded"):
        auth.enroll(site="pending", token=spent, public_key_hex=IdentityKey.generate().public().raw.hex())
    auth.store.create_site("late", T0)
    expiring = auth.enrollment_token("late").token
    clock.advance(timedelta(hours=24, seconds=1).total_seconds())
    with pytest.raises(Unauthenticated, match="invalid, superseded"):
        auth.enroll(site="late", token=expiring, public_key_hex=IdentityKey.generate().public().raw.hex())
    assert auth.store.get_site("late").public_key is None


def test_a_revoked_site_never_enrolls_again_even_with_a_token_valid_in_the_database(service):
    auth, _ = service
    _enroll(auth, "gone")
    auth.store.revoke_site("gone", T0)
    token = "fhe_" + "r" * 43  # valid, unspent, unexpired: written by an old version or by hand
    with auth.store.engine.begin() as c:
        c.execute(
            sa.insert(enrollment_tokens).values(
                token_hash=secret_hash(token),
                site="gone",
                created_at=T0,
                expires_at=T0 + timedelta(hours=1),
                used_at=None,
            )
        )
    attacker = IdentityKey.generate()
    with pytest.raises((Forbidden, Unauthenticated)):
        auth.enroll(site="gone", token=token, public_key_hex=attacker.public().raw.hex())
    site = auth.store.get_site("gone")
    assert site.status.value == "revoked"
    assert site.public_key != attacker.public().raw.hex()
    with pytest.raises(Forbidden):
        auth.challenge("gone")


# --- spec signatures: a replaced owner key -----------------------------------------------------------------


def _spec(owner: str) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "signed-study",
            "dataset": "synthetic",
            "recipe": synthetic_recipe(4).model_dump(mode="json"),
            "owner": owner,
            "rounds": 1,
            "train_sites": ["site-a"],
            "min_sites": 1,
            "round_deadline_s": 600.0,
        }
    )


def test_a_study_signed_with_an_owner_key_an_admin_replaced_is_refused(tmp_path: Path) -> None:
    governance = GovernanceExtension()
    old, new = IdentityKey.generate(), IdentityKey.generate()
    alice, admin = (
        operator_principal("alice", Role.RESEARCHER, token_id="t"),
        operator_principal("admin", Role.ADMIN, token_id="t"),
    )
    spec = _spec("alice")
    by_old = SignedSpec.sign(spec.model_dump(mode="json"), owner="alice", key=old)
    by_new = SignedSpec.sign(spec.model_dump(mode="json"), owner="alice", key=new)

    async def main() -> None:
        settings = OrchestratorSettings(state_dir=tmp_path / "state", signing_key=IdentityKey.generate())
        svc = await start_service(settings, [*default_extensions(), governance])
        try:
            created = register_site(svc, admin, SiteCreate(name="site-a"))
            public = IdentityKey.generate().public().raw.hex()
            enroll_site(svc, EnrollRequest(site="site-a", token=created.enrollment_token, public_key=public))
            svc.store.create_user("alice", Role.RESEARCHER.value, "a" * 64, datetime.now(UTC))
            observer = governance.observer
            register_signing_key(observer, alice, OwnerKeyBody(public_key=old.public().raw.hex()))
            # the old key leaked: an admin replaces it
            set_owner_key(svc, observer, admin, "alice", OwnerKeyBody(public_key=new.public().raw.hex()))
            with pytest.raises(ApiError) as refused:
                await submit_signed_study(
                    svc, observer, alice, SignedStudyBody(spec=spec, signature=by_old.signature.hex())
                )
            assert (refused.value.status, refused.value.error) == (422, "invalid study signature")
            assert svc.store.list_studies(None) == []
            # nor can the thief put the old key back as the researcher (only an admin may replace it)
            with pytest.raises(ApiError) as again:
                register_signing_key(observer, alice, OwnerKeyBody(public_key=old.public().raw.hex()))
            assert again.value.status == 409
            info = await submit_signed_study(
                svc, observer, alice, SignedStudyBody(spec=spec, signature=by_new.signature.hex())
            )
            assert info.study_id
        finally:
            await svc.close()

    asyncio.run(main())
