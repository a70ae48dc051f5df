"""The request gate's pure parts: route classes, access classes, the rate limiter's table, bound tokens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import jwt
import pytest

from fedhealth.core import CryptoError, ManualClock
from fedhealth.crypto import Audience, IdentityKey, TokenIssuer, TokenVerifier
from fedhealth.orchestrator._limits import (
    COLLECTIVE_CALL_COST,
    Access,
    BodyClass,
    BodyLimits,
    RateLimiter,
    access_of,
    body_class,
)


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/api/v1/agent/tasks/tk_1/result", BodyClass.UPLOAD),
        ("POST", "/api/v1/agent/tasks/tk_1/secagg/masked_input", BodyClass.UPLOAD),
        ("POST", "/api/v1/agent/tasks/tk_1/collective/17", BodyClass.UPLOAD),
        ("GET", "/api/v1/agent/tasks/tk_1/collective/17", BodyClass.JSON),
        ("POST", "/api/v1/agent/tasks/tk_1/collective/x", BodyClass.JSON),
        ("GET", "/api/v1/agent/tasks/tk_1/secagg/masked_input", BodyClass.JSON),
        ("POST", "/api/v1/agent/tasks/tk_1/evaluation", BodyClass.JSON),
        ("POST", "/api/v1/agent/tasks/tk_1/result/extra", BodyClass.JSON),
        ("POST", "/api/v1/studies", BodyClass.DOCUMENT),
        ("POST", "/api/v1/governance/studies", BodyClass.DOCUMENT),
        ("POST", "/api/v1/agent/governance/withdrawals", BodyClass.DOCUMENT),
        ("POST", "/api/v1/privacy/plan", BodyClass.DOCUMENT),
        ("POST", "/api/v1/agent/challenge", BodyClass.JSON),
        ("POST", "/api/v1/enroll", BodyClass.JSON),
        ("PUT", "/api/v1/governance/owner-key", BodyClass.JSON),
    ],
)
def test_each_route_has_a_body_class(method, path, expected):
    assert body_class(method, path) is expected


def test_only_uploads_get_the_large_limit():
    limits = BodyLimits(json_bytes=10, document_bytes=20, upload_bytes=30)
    assert [limits.of(c) for c in (BodyClass.JSON, BodyClass.DOCUMENT, BodyClass.UPLOAD)] == [10, 20, 30]
    assert BodyLimits().of(BodyClass.JSON) == 64 << 10


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/healthz", Access.PUBLIC),
        ("/openapi.json", Access.PUBLIC),
        ("/api/v1/enroll", Access.LOGIN),
        ("/api/v1/agent/challenge", Access.LOGIN),
        ("/api/v1/agent/token", Access.LOGIN),
        ("/api/v1/auth/token", Access.LOGIN),
        ("/api/v1/agent/tasks/next", Access.AGENT),
        ("/api/v1/agent/governance/withdrawals", Access.AGENT),
        ("/api/v1/sites", Access.OPERATOR),
        ("/api/v1/models/abc", Access.OPERATOR),
    ],
)
def test_each_path_has_an_access_class(path, expected):
    assert access_of(path) is expected


def test_a_collective_call_takes_a_fraction_of_a_token_and_the_bucket_still_bounds_it():
    now = [0.0]
    limiter = RateLimiter(10.0, 5, clock=lambda: now[0])
    allowed = 0
    while limiter.retry_after("site:a", COLLECTIVE_CALL_COST) is None:
        allowed += 1
    assert 249 <= allowed <= 250  # a burst of 5 tokens is 250 collective calls (float steps)
    assert limiter.retry_after("site:a") is not None  # and a full request waits like any other


def test_the_rate_limiter_forgets_idle_callers_instead_of_growing_without_bound():
    now = [0.0]
    limiter = RateLimiter(10.0, 5, clock=lambda: now[0], max_keys=100)
    for i in range(100):
        assert limiter.retry_after(f"ip:{i}") is None
    now[0] += 1.0  # every bucket is full again
    assert limiter.retry_after("ip:new") is None
    assert len(limiter) == 1
    # a caller over its rate is remembered (its bucket is not full)
    for _ in range(5):
        limiter.retry_after("ip:busy")
    wait = limiter.retry_after("ip:busy")
    assert wait is not None
    assert wait > 0


def _pair(clock):
    key = IdentityKey.generate()
    return TokenIssuer(key, "orch", clock), TokenVerifier(key.public(), "orch", clock), key


def test_a_token_names_the_credential_it_was_issued_against():
    clock = ManualClock(datetime(2026, 12, 1, tzinfo=UTC))
    issuer, verifier, _ = _pair(clock)
    token, claims = issuer.issue(
        subject="north",
        role="site",
        audience=Audience.AGENT,
        ttl=timedelta(minutes=10),
        confirmation="ab" * 32,
    )
    assert claims.confirmation == "ab" * 32
    assert verifier.verify(token, Audience.AGENT).confirmation == "ab" * 32
    unbound, _ = issuer.issue(subject="north", role="site", audience=Audience.AGENT, ttl=timedelta(minutes=1))
    assert verifier.verify(unbound, Audience.AGENT).confirmation is None


@pytest.mark.parametrize("cnf", ["ab", {"jkt": 5}, ["x"]])
def test_a_malformed_confirmation_claim_makes_the_token_invalid(cnf):
    clock = ManualClock(datetime(2026, 12, 1, tzinfo=UTC))
    _, verifier, key = _pair(clock)
    now = int(clock.now().timestamp())
    payload = {
        "iss": "orch",
        "sub": "north",
        "role": "site",
        "aud": Audience.AGENT.value,
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "jti": "j",
        "cnf": cnf,
    }
    token = jwt.encode(payload, key.crypto_key(), algorithm="EdDSA")
    with pytest.raises(CryptoError):
        verifier.verify(token, Audience.AGENT)
