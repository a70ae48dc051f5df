"""A verified token's claims are kept per token, and nothing revocation changes is: a revoked or re-keyed
site, and an expired token, are refused at the very next request."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fedhealth.core import ManualClock, canonical_json
from fedhealth.crypto import Audience, IdentityKey
from fedhealth.orchestrator import AuthService, Store, make_engine, sqlite_url, upgrade_database
from fedhealth.orchestrator._auth import Forbidden, Unauthenticated
from fedhealth.orchestrator._home import secret_hash
from fedhealth.protocol import agent_login_message

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def service(tmp_path):
    engine = make_engine(sqlite_url(tmp_path / "o.sqlite"))
    upgrade_database(engine)
    clock = ManualClock(T0)
    yield AuthService(Store(engine), IdentityKey.generate(), clock), clock
    engine.dispose()


def _enrolled_token(auth: AuthService, site: str) -> str:
    key = IdentityKey.generate()
    auth.store.create_site(site, T0)
    auth.store.add_enrollment_token(site, secret_hash("fhe_t"), T0, T0 + timedelta(days=1))
    auth.enroll(site=site, token="fhe_t", public_key_hex=key.public().raw.hex())
    challenge, _ = auth.challenge(site)
    signature = key.sign(canonical_json(agent_login_message(site, challenge))).hex()
    token, _ = auth.agent_token(site=site, challenge=challenge, signature_hex=signature)
    return f"Bearer {token}"


def test_a_revoked_site_is_refused_at_the_next_request_though_its_token_was_verified_before(service):
    auth, _ = service
    bearer = _enrolled_token(auth, "alpha")
    for _ in range(3):  # verified once, then taken from the cache
        assert auth.authenticate(bearer, Audience.AGENT).name == "alpha"
    auth.store.revoke_site("alpha", T0)
    with pytest.raises(Forbidden, match="revoked"):
        auth.authenticate(bearer, Audience.AGENT)


def test_a_rotated_sites_old_token_is_refused_at_the_next_request(service):
    auth, _ = service
    bearer = _enrolled_token(auth, "beta")
    auth.authenticate(bearer, Audience.AGENT)
    auth.rotate("beta")
    with pytest.raises(Unauthenticated):
        auth.authenticate(bearer, Audience.AGENT)


def test_a_cached_token_still_expires(service):
    auth, clock = service
    bearer = _enrolled_token(auth, "gamma")
    auth.authenticate(bearer, Audience.AGENT)
    clock.advance((auth.settings.agent_token_ttl + timedelta(seconds=10)).total_seconds())
    with pytest.raises(Unauthenticated, match="expired"):
        auth.authenticate(bearer, Audience.AGENT)


def test_a_cached_agent_token_does_not_open_the_operator_api(service):
    auth, _ = service
    bearer = _enrolled_token(auth, "delta")
    auth.authenticate(bearer, Audience.AGENT)
    with pytest.raises(Forbidden, match="agent credentials"):
        auth.authenticate(bearer, Audience.OPERATOR)
