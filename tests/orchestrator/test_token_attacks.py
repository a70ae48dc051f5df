"""Forged, confused and raced credentials against the orchestrator's real AuthService, store and token
verifier (docs/security.md, "Sites" and "Operators"): what test_stale_credential_attacks.py and the e2e
identity tests do not already try.

- Algorithm confusion: a token with ``alg: none``, HS256 keyed with the orchestrator's public key, another
  algorithm name, or an EdDSA token that brings its own key (``jwk``, ``jku``, ``kid``) is refused.
- Issuer and audience: a token signed by the real key for another issuer is refused.
- Time: tokens are judged by the orchestrator's clock with its 5 s leeway, also for ``iat``; a token from an
  orchestrator process whose clock runs 3 s ahead is accepted, one starting beyond the leeway is refused,
  and a token whose times are not numbers is an invalid token, not a server error.
- Races: one enrollment token spent by two concurrent enrollments enrolls exactly one key; one challenge
  signed twice concurrently yields one access token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from fedhealth.core import CryptoError, ManualClock, canonical_json
from fedhealth.crypto import Audience, IdentityKey, TokenIssuer, TokenVerifier
from fedhealth.orchestrator import AuthService, Store, make_engine, sqlite_url, upgrade_database
from fedhealth.orchestrator._auth import Unauthenticated, key_thumbprint
from fedhealth.protocol import agent_login_message

SITE = "site-a"
ISSUER = AuthService.ISSUER


@pytest.fixture
def auth(tmp_path):
    engine = make_engine(sqlite_url(tmp_path / "o.sqlite"))
    upgrade_database(engine)
    signing = IdentityKey.generate()
    # the wall clock: PyJWT's own checks, if any were left on, would use it too
    service = AuthService(Store(engine), signing, ManualClock(datetime.now(UTC).replace(microsecond=0)))
    yield service, signing
    engine.dispose()


def _enroll(auth: AuthService, site: str = SITE) -> IdentityKey:
    key = IdentityKey.generate()
    auth.store.create_site(site, auth.clock.now())
    issued = auth.enrollment_token(site)
    auth.enroll(site=site, token=issued.token, public_key_hex=key.public().raw.hex())
    return key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(auth: AuthService, key: IdentityKey, **override: object) -> dict[str, object]:
    now = int(auth.clock.now().timestamp())
    claims: dict[str, object] = {
        "iss": ISSUER,
        "sub": SITE,
        "role": "site",
        "aud": Audience.AGENT.value,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "j" * 24,
        "cnf": {"jkt": key_thumbprint(key.public().raw.hex())},
    }
    claims.update(override)
    return claims


def _unsigned(header: dict[str, object], claims: dict[str, object]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


# --- algorithm confusion and keys brought along


def _alg_none(auth: AuthService, signing: IdentityKey, claims: dict[str, object]) -> str:
    return _unsigned({"alg": "none", "typ": "JWT"}, claims) + "."


def _hs256_with_public_key(auth: AuthService, signing: IdentityKey, claims: dict[str, object]) -> str:
    # the classic confusion: the verifier's public key used as an HMAC secret (raw and PEM forms)
    head = _unsigned({"alg": "HS256", "typ": "JWT"}, claims)
    secret = signing.public().raw
    return f"{head}.{_b64(hmac.new(secret, head.encode(), hashlib.sha256).digest())}"


def _hs256_with_public_pem(auth: AuthService, signing: IdentityKey, claims: dict[str, object]) -> str:
    from cryptography.hazmat.primitives import serialization

    pem = (
        signing.public()
        .crypto_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    head = _unsigned({"alg": "HS256", "typ": "JWT"}, claims)
    return f"{head}.{_b64(hmac.new(pem, head.encode(), hashlib.sha256).digest())}"


def _own_key_in_header(auth: AuthService, signing: IdentityKey, claims: dict[str, object]) -> str:
    attacker = IdentityKey.generate()
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64(attacker.public().raw)}
    headers = {"jwk": jwk, "kid": "../../signing.key", "jku": "https://attacker.example/jwks.json"}
    return jwt.encode(claims, attacker.crypto_key(), algorithm="EdDSA", headers=headers)


def _lower_case_alg(auth: AuthService, signing: IdentityKey, claims: dict[str, object]) -> str:
    token = jwt.encode(claims, signing.crypto_key(), algorithm="EdDSA")
    _, payload, signature = token.split(".")
    return f"{_b64(json.dumps({'alg': 'eddsa', 'typ': 'JWT'}).encode())}.{payload}.{signature}"


FORGERIES: dict[str, Callable[[AuthService, IdentityKey, dict[str, object]], str]] = {
    "alg-none": _alg_none,
    "hs256-keyed-with-the-raw-public-key": _hs256_with_public_key,
    "hs256-keyed-with-the-public-pem": _hs256_with_public_pem,
    "eddsa-with-its-own-jwk-kid-jku": _own_key_in_header,
    "alg-renamed-under-a-genuine-signature": _lower_case_alg,
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_a_token_that_is_not_an_eddsa_signature_by_the_orchestrators_key_is_refused(auth, forgery):
    service, signing = auth
    key = _enroll(service)
    token = FORGERIES[forgery](service, signing, _claims(service, key))
    with pytest.raises(Unauthenticated, match="invalid token"):
        service.authenticate(f"Bearer {token}", Audience.AGENT)


def test_the_control_the_same_claims_signed_by_the_orchestrators_key_are_accepted(auth):
    service, signing = auth
    key = _enroll(service)
    token = jwt.encode(_claims(service, key), signing.crypto_key(), algorithm="EdDSA")
    assert service.authenticate(f"Bearer {token}", Audience.AGENT).name == SITE


def test_a_token_signed_by_the_orchestrators_key_for_another_issuer_is_refused(auth):
    service, signing = auth
    key = _enroll(service)
    token = jwt.encode(_claims(service, key, iss="another-orchestrator"), signing.crypto_key(), "EdDSA")
    with pytest.raises(Unauthenticated, match="invalid token"):
        service.authenticate(f"Bearer {token}", Audience.AGENT)


# --- time


def test_a_token_from_an_orchestrator_process_whose_clock_runs_three_seconds_ahead_is_accepted():
    # two orchestrator processes on one database: the one that issued the token runs 3 s ahead, within the
    # documented 5 s leeway; refusing it would stop the site (a 401 after a fresh login is final)
    signing = IdentityKey.generate()
    now = datetime.now(UTC).replace(microsecond=0)
    ahead = TokenIssuer(signing, ISSUER, ManualClock(now + timedelta(seconds=3)))
    token, _ = ahead.issue(subject=SITE, role="site", audience=Audience.AGENT, ttl=timedelta(minutes=10))
    verifier = TokenVerifier(signing.public(), ISSUER, ManualClock(now))
    assert verifier.verify(token, Audience.AGENT).subject == SITE


def test_tokens_are_judged_by_the_orchestrators_clock_not_the_hosts():
    signing = IdentityKey.generate()
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0) + timedelta(days=1))
    token, _ = TokenIssuer(signing, ISSUER, clock).issue(
        subject=SITE, role="site", audience=Audience.AGENT, ttl=timedelta(minutes=10)
    )
    assert TokenVerifier(signing.public(), ISSUER, clock).verify(token, Audience.AGENT).subject == SITE


@pytest.mark.parametrize(
    "start",
    [{"iat": 3600, "nbf": 3600}, {"iat": 3600, "nbf": 0}, {"iat": 0, "nbf": 3600}, {"iat": 3600}],
    ids=["both-ahead", "iat-ahead-nbf-now", "nbf-ahead-iat-now", "iat-ahead-no-nbf"],
)
def test_a_token_starting_an_hour_ahead_is_refused_even_under_the_orchestrators_signature(auth, start):
    service, signing = auth
    key = _enroll(service)
    now = int(service.clock.now().timestamp())
    claims = _claims(service, key, exp=now + 7200, **{name: now + shift for name, shift in start.items()})
    if "nbf" not in start:
        del claims["nbf"]
    token = jwt.encode(claims, signing.crypto_key(), algorithm="EdDSA")
    with pytest.raises(Unauthenticated):
        service.authenticate(f"Bearer {token}", Audience.AGENT)


@pytest.mark.parametrize(
    ("claim", "value"),
    [("exp", "9999999999"), ("exp", True), ("nbf", "0"), ("iat", [0]), ("exp", 1e300)],
    ids=["exp-string", "exp-bool", "nbf-string", "iat-list", "exp-1e300"],
)
def test_a_token_whose_times_are_not_numbers_is_an_invalid_token_not_a_server_error(claim, value):
    signing = IdentityKey.generate()
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    now = int(clock.now().timestamp())
    claims = {
        "iss": ISSUER,
        "sub": SITE,
        "role": "site",
        "aud": Audience.AGENT.value,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "j" * 24,
        claim: value,
    }
    token = jwt.encode(claims, signing.crypto_key(), algorithm="EdDSA")
    with pytest.raises(CryptoError):
        TokenVerifier(signing.public(), ISSUER, clock).verify(token, Audience.AGENT)


# --- races


def _race(calls: list[Callable[[], object]]) -> list[object | BaseException]:
    """Run ``calls`` at once (a barrier before each); what each returned or raised."""
    barrier = threading.Barrier(len(calls))
    outcomes: list[object | BaseException] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = calls[i]()
        except BaseException as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes


def test_one_enrollment_token_spent_by_concurrent_enrollments_enrolls_exactly_one_key(auth):
    service, _ = auth
    service.store.create_site(SITE, service.clock.now())
    token = service.enrollment_token(SITE).token
    keys = [IdentityKey.generate() for _ in range(6)]
    outcomes = _race(
        [
            lambda k=k: service.enroll(site=SITE, token=token, public_key_hex=k.public().raw.hex())
            for k in keys
        ]
    )
    winners = [k for k, o in zip(keys, outcomes, strict=True) if isinstance(o, datetime)]
    assert len(winners) == 1, outcomes
    assert all(isinstance(o, datetime | Exception) for o in outcomes)
    row = service.store.get_site_or_none(SITE)
    assert row is not None
    assert row.public_key == winners[0].public().raw.hex()


def test_one_challenge_signed_twice_at_once_yields_one_access_token(auth):
    service, _ = auth
    key = _enroll(service)
    challenge, _ = service.challenge(SITE)
    signature = key.sign(canonical_json(agent_login_message(SITE, challenge))).hex()
    outcomes = _race(
        [lambda: service.agent_token(site=SITE, challenge=challenge, signature_hex=signature)] * 6
    )
    tokens = [o for o in outcomes if isinstance(o, tuple)]
    assert len(tokens) == 1, outcomes
    assert all(isinstance(o, Unauthenticated) for o in outcomes if not isinstance(o, tuple))
