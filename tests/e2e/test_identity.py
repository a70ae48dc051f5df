"""Enrollment, tokens, roles, revocation and TLS pinning, against a real HTTPS orchestrator."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from fedhealth.agent import OrchestratorClient, OrchestratorRefused, TlsVerificationError, enroll_site
from fedhealth.client import ClientError, OperatorClient
from fedhealth.core import ManualClock, canonical_json
from fedhealth.crypto import (
    Audience,
    IdentityKey,
    TokenIssuer,
    create_ca,
    issue_client_certificate,
    pinned_tls_context,
)
from fedhealth.orchestrator import AuthService, Store, make_engine
from fedhealth.orchestrator._home import secret_hash
from fedhealth.protocol import agent_login_message
from fedhealth.sim import LocalFederation
from support import RogueSite

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("identity")) as fed:
        fed.start_orchestrator()
        for site in ("alpha", "beta", "gamma"):
            fed.add_site(site)
        yield fed


def _next(fed, headers):
    return fed.http.get("/api/v1/agent/tasks/next", params={"wait": 0}, headers=headers)


def _login_parts(fed, site, key):
    challenge = fed.http.post("/api/v1/agent/challenge", json={"site": site}).json()["challenge"]
    signature = key.sign(canonical_json(agent_login_message(site, challenge))).hex()
    return {"site": site, "challenge": challenge, "signature": signature}


def test_an_enrolled_site_logs_in_with_a_signed_challenge_and_gets_a_ten_minute_token(fed):
    key = fed.site_home("alpha").identity()
    response = fed.http.post("/api/v1/agent/token", json=_login_parts(fed, "alpha", key))
    assert response.status_code == 200
    body = response.json()
    expires = datetime.fromisoformat(body["expires_at"])
    assert timedelta(minutes=9) < expires - datetime.now(UTC) <= timedelta(minutes=10, seconds=5)
    assert _next(fed, {"Authorization": f"Bearer {body['access_token']}"}).status_code == 200


def test_a_replayed_challenge_is_refused(fed):
    parts = _login_parts(fed, "alpha", fed.site_home("alpha").identity())
    assert fed.http.post("/api/v1/agent/token", json=parts).status_code == 200
    replay = fed.http.post("/api/v1/agent/token", json=parts)
    assert replay.status_code == 401
    assert "already used" in replay.json()["error"]


def test_a_signature_by_an_unknown_key_is_refused_and_spends_the_challenge(fed):
    parts = _login_parts(fed, "alpha", IdentityKey.generate())
    response = fed.http.post("/api/v1/agent/token", json=parts)
    assert response.status_code == 401
    assert "does not match the site's enrolled key" in response.json()["error"]
    # the challenge cannot be retried with the right key either
    right = (
        fed.site_home("alpha")
        .identity()
        .sign(canonical_json(agent_login_message("alpha", parts["challenge"])))
    )
    again = fed.http.post("/api/v1/agent/token", json={**parts, "signature": right.hex()})
    assert again.status_code == 401


def test_an_unknown_site_gets_no_challenge(fed):
    response = fed.http.post("/api/v1/agent/challenge", json={"site": "nobody"})
    assert response.status_code == 401


def test_expired_and_foreign_tokens_are_refused_with_401(fed):
    past = ManualClock(datetime.now(UTC) - timedelta(hours=1))
    real_key = fed.home.signing_key()
    expired, _ = TokenIssuer(real_key, AuthService.ISSUER, past).issue(
        subject="alpha", role="site", audience=Audience.AGENT, ttl=timedelta(minutes=10)
    )
    response = _next(fed, {"Authorization": f"Bearer {expired}"})
    assert response.status_code == 401
    assert response.json()["error"] == "token expired"
    assert response.headers["www-authenticate"] == "Bearer"
    forged, _ = TokenIssuer(IdentityKey.generate(), AuthService.ISSUER).issue(
        subject="alpha", role="site", audience=Audience.AGENT, ttl=timedelta(minutes=10)
    )
    response = _next(fed, {"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401
    assert response.json()["error"] == "invalid token"


def test_agent_and_operator_tokens_cannot_cross_over(fed):
    rogue = RogueSite(fed, "beta")
    site_headers = rogue.client.auth_headers()
    rogue.close()
    on_operator = fed.http.get("/api/v1/studies", headers=site_headers)
    assert on_operator.status_code == 403
    assert "agent credentials cannot call this endpoint" in on_operator.json()["error"]
    on_agent = _next(fed, fed.admin_headers())
    assert on_agent.status_code == 403
    assert "operator credentials cannot call this endpoint" in on_agent.json()["error"]


def test_enrollment_tokens_are_single_use_and_expire(fed, tmp_path):
    token = fed.operator.add_site("delta").enrollment_token
    enroll_site(
        tmp_path / "d1", name="delta", orchestrator=fed.url, token=token, ca_pem=fed.home.ca_cert.read_bytes()
    )
    with pytest.raises(OrchestratorRefused) as reuse:
        enroll_site(
            tmp_path / "d2",
            name="delta",
            orchestrator=fed.url,
            token=token,
            ca_pem=fed.home.ca_cert.read_bytes(),
        )
    assert reuse.value.status == 401
    assert not (tmp_path / "d2" / "identity.key").exists()  # a refused enrollment leaves no key behind
    # a token for another site does not enroll this one
    other = fed.operator.add_site("epsilon").enrollment_token
    with pytest.raises(OrchestratorRefused):
        enroll_site(
            tmp_path / "d3",
            name="delta",
            orchestrator=fed.url,
            token=other,
            ca_pem=fed.home.ca_cert.read_bytes(),
        )
    # an expired token: written straight into the orchestrator's database with an expiry in the past
    stale = "fhe_" + "x" * 40
    store = Store(make_engine(fed.home.database_url()))
    now = datetime.now(UTC)
    store.add_enrollment_token(
        "epsilon", secret_hash(stale), now - timedelta(days=2), now - timedelta(days=1)
    )
    store.engine.dispose()
    with pytest.raises(OrchestratorRefused) as expired:
        enroll_site(
            tmp_path / "d4",
            name="epsilon",
            orchestrator=fed.url,
            token=stale,
            ca_pem=fed.home.ca_cert.read_bytes(),
        )
    assert expired.value.status == 401
    assert "invalid, superseded, already used, or expired" in expired.value.error


def test_a_revoked_site_is_refused_at_its_next_request_and_its_agent_stops(fed):
    fed.start_agent("gamma", {})
    fed.wait_for_sites(["gamma"])
    rogue = RogueSite(fed, "gamma")
    headers = rogue.client.auth_headers()  # a token issued before the revocation
    rogue.close()
    assert _next(fed, headers).status_code == 200
    assert fed.operator.revoke_site("gamma").status == "revoked"
    refused = _next(fed, headers)
    assert refused.status_code == 403
    assert refused.json()["error"] == "this site has been revoked"
    challenge = fed.http.post("/api/v1/agent/challenge", json={"site": "gamma"})
    assert challenge.status_code == 403
    proc = fed.agents["gamma"]
    # the revocation woke the agent's waiting long poll (its wait is 25 s), which was refused then
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.returncode == 3, "the agent's waiting poll was not refused at the revocation"
    assert "revoked" in (fed.logs / "agent-gamma.log").read_text()


def test_an_agent_given_the_wrong_ca_refuses_to_connect_with_a_clear_error(fed, tmp_path):
    token = fed.operator.add_site("zeta").enrollment_token
    wrong_ca = create_ca("somebody else").cert_pem
    with pytest.raises(TlsVerificationError, match="not trusted by the pinned federation CA"):
        enroll_site(tmp_path / "z", name="zeta", orchestrator=fed.url, token=token, ca_pem=wrong_ca)
    # an enrolled agent whose pinned CA is wrong fails the same way instead of retrying forever
    client = OrchestratorClient(fed.url, "alpha", fed.site_home("alpha").identity(), ca_pem=wrong_ca)
    with pytest.raises(TlsVerificationError):
        client.next_task(0)
    client.close()


def test_roles_limit_what_each_operator_may_do(fed, tmp_path):
    researcher_key = fed.operator.add_user("rita", "researcher").api_key
    auditor_key = fed.operator.add_user("audrey", "auditor").api_key
    ca = fed.home.ca_cert.read_text()
    rita = OperatorClient(fed.url, user="rita", api_key=researcher_key, ca_pem=ca)
    audrey = OperatorClient(fed.url, user="audrey", api_key=auditor_key, ca_pem=ca)
    assert isinstance(rita.studies(), list)  # researchers read studies
    with pytest.raises(ClientError) as no_sites:
        rita.add_site("rita-site")
    assert no_sites.value.status == 403
    assert "needs one of: admin" in no_sites.value.error
    assert isinstance(audrey.sites(), list)
    with pytest.raises(ClientError) as read_only:
        audrey.request("POST", "/api/v1/studies", json={})
    assert read_only.value.status == 403
    wrong = OperatorClient(fed.url, user="rita", api_key="fhk_" + "0" * 40, ca_pem=ca)
    with pytest.raises(ClientError) as bad_key:
        wrong.sites()
    assert bad_key.value.status == 401
    fed.operator.request("POST", "/api/v1/users/rita/revoke")
    again = OperatorClient(fed.url, user="rita", api_key=researcher_key, ca_pem=ca)
    with pytest.raises(ClientError) as revoked:
        again.sites()
    assert revoked.value.status == 403
    again.close()
    for client in (rita, audrey, wrong):
        client.close()


def test_plain_http_to_the_https_port_does_not_get_an_answer(fed):
    plain = fed.url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):  # no HTTP answer at all, not even an error status
        httpx.get(f"{plain}/healthz", timeout=5)


def test_requests_over_the_rate_limit_get_429_with_retry_after(tmp_path):
    with LocalFederation(tmp_path, orchestrator_args=["--rate-limit", "2"]) as fed:
        fed.start_orchestrator()
        fed.add_site("busy")
        rogue = RogueSite(fed, "busy")
        headers = rogue.client.auth_headers()
        answers = [_next(fed, headers) for _ in range(12)]
        limited = [r for r in answers if r.status_code == 429]
        assert limited, [r.status_code for r in answers]
        assert all(r.status_code in (200, 429) for r in answers)
        assert int(limited[0].headers["retry-after"]) >= 1
        # the agent client waits it out instead of failing
        assert rogue.client.next_task(0) is None
        rogue.close()


def test_mutual_tls_admits_only_clients_with_a_federation_certificate(tmp_path):
    with LocalFederation(tmp_path, mtls=True) as fed:
        fed.start_orchestrator()
        fed.add_site("m-site")  # enrolls over the enrollment listener, which issues its client certificate
        assert fed.site_home("m-site").client_cert() is not None
        fed.start_agent("m-site", {})
        fed.wait_for_sites(["m-site"])  # the agent reached the main port with its certificate
        ca = fed.home.ca_cert.read_bytes()
        with pytest.raises(httpx.HTTPError):  # no certificate: the TLS handshake is refused
            httpx.get(f"{fed.url}/healthz", verify=pinned_tls_context(ca), timeout=10)
        foreign = issue_client_certificate(create_ca("elsewhere"), "intruder")
        with pytest.raises(httpx.HTTPError):  # a certificate from another CA: refused too
            httpx.get(
                f"{fed.url}/healthz",
                verify=pinned_tls_context(ca, client_cert=(foreign.cert_pem, foreign.key_pem)),
                timeout=10,
            )
        only_enrollment = httpx.get(
            f"{fed.enroll_url}/api/v1/sites", verify=pinned_tls_context(ca), timeout=10
        )
        assert only_enrollment.status_code == 403
        assert only_enrollment.json()["error"] == "only enrollment is served on this port"
        # both listeners run on the loop uvicorn picks for one (uvloop, installed with uvicorn[standard])
        assert fed.orchestrator is not None
        maps = Path(f"/proc/{fed.orchestrator.pid}/maps").read_text()
        assert "uvloop/loop." in maps
