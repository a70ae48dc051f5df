"""docs/security.md against an attacker, in process (the whole ASGI app with its request gate; starlette's
TestClient or the ASGI callable itself, no sockets): what the tests the document cites do not already try.

- "Limits and retries": a site's bandwidth probe (``POST /api/v1/agent/probe``, at most 32 MiB) that declares
  more is refused from its headers, and one streamed past the bound is cut off there, never held whole in the
  orchestrator's memory (the gate admits the probe in the upload class, up to ``--max-body-mb``).
- "Mutual TLS": on every login route (challenge, agent token, operator token) the client certificate must
  name the principal logging in: one site's certificate neither fetches nor spends another site's challenge,
  and neither a site's nor another user's certificate trades a user's API key for a token.
- "Limits and retries": login routes are limited per client address: a login flood from one address is
  throttled without throttling another address or the site's own authenticated requests, and a
  forwarding header does not buy the flooding address a fresh bucket.
- "Security actions in the audit log": no entry holds a secret or a hash of one (API keys, enrollment
  tokens, what the database keeps of them, what tokens are bound to), and a refused identity action writes
  nothing (the enrollment-token table's 409 and 404 rows, a user's own revocation, the one namespace of site
  and user names).
- "Blobs: who may read what": a blob is named by its sha256 and nothing else; a digest with a trailing
  newline (which ``$`` lets through) names no blob, and a file planted under such a name is no blob.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from fedhealth.core import InputError, canonical_json
from fedhealth.crypto import IdentityKey, PemPair, create_ca, create_client_csr, issue_client_certificate
from fedhealth.orchestrator import OrchestratorSettings, create_app, default_extensions
from fedhealth.orchestrator._auth import api_key_thumbprint
from fedhealth.orchestrator._blobs import BlobKind, BlobStore
from fedhealth.orchestrator._home import secret_hash
from fedhealth.orchestrator._routes_sites import PROBE_MAX_BYTES
from fedhealth.orchestrator._serve import _with_client_certificate
from fedhealth.protocol import Role, agent_login_message
from support import AsgiAnswer, TestClient, agent_bearer, operator_bearer, send_asgi

MIB = 1 << 20


# --- one request straight into the ASGI app ---------------------------------------------------------------


# --- the federation --------------------------------------------------------------------------------------


@dataclass
class World:
    app: FastAPI
    client: TestClient
    svc: Any


@contextmanager
def _world(tmp: Path, **settings: Any) -> Iterator[World]:
    app = create_app(
        OrchestratorSettings(state_dir=tmp / "state", signing_key=IdentityKey.generate(), **settings),
        extensions=default_extensions(),
    )
    with TestClient(app, base_url="https://testserver") as client:
        client.get("/healthz")  # builds the middleware stack
        yield World(app=app, client=client, svc=app.state.services)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with _world(tmp_path, rate_per_s=0) as w:
        yield w


# --- the bandwidth probe's bound ---------------------------------------------------------------------------


def test_a_bandwidth_probe_declaring_more_than_its_bound_is_refused_before_its_body_is_read(world):
    _, site = agent_bearer(world.svc, "probing-site")
    declared = PROBE_MAX_BYTES + 1
    answer = send_asgi(
        world.client,
        world.app,
        "POST",
        "/api/v1/agent/probe",
        {**site, "content-length": str(declared)},
        chunks=iter([b"\0" * MIB] * (declared // MIB + 1)),
    )
    assert answer.status == 413, answer.body
    assert answer.pulled == 0
    assert set(json.loads(answer.body)) == {"error", "detail"}
    # the control: a probe within its bound is received whole
    control = send_asgi(
        world.client,
        world.app,
        "POST",
        "/api/v1/agent/probe",
        {**site, "content-length": str(2 * MIB)},
        chunks=iter([b"\0" * MIB] * 2),
    )
    assert control.status == 200, control.body
    assert json.loads(control.body)["received_bytes"] == 2 * MIB


def test_a_bandwidth_probe_streamed_past_its_bound_is_cut_off_there_not_held_whole(world):
    # chunked, no Content-Length: 96 MiB offered, a malicious site could offer --max-body-mb (512 MiB) on
    # several connections at once; the route may read at most its bound and one chunk more
    _, site = agent_bearer(world.svc, "probing-site")
    offered = 3 * PROBE_MAX_BYTES
    answer = send_asgi(
        world.client,
        world.app,
        "POST",
        "/api/v1/agent/probe",
        {**site, "transfer-encoding": "chunked"},
        chunks=iter([b"\0" * MIB] * (offered // MIB)),
    )
    assert answer.status == 413, answer.body
    assert answer.pulled <= PROBE_MAX_BYTES + MIB, f"the route read {answer.pulled} bytes of {offered}"
    assert set(json.loads(answer.body)) == {"error", "detail"}


# --- mutual TLS: the certificate names the principal logging in -------------------------------------------


@pytest.fixture(scope="module")
def ca() -> PemPair:
    return create_ca("test federation")


def test_under_mtls_no_login_route_lets_one_principals_certificate_log_in_another(tmp_path, ca):
    with _world(tmp_path, ca=ca, rate_per_s=0) as w:
        svc = w.svc
        root_key, admin = operator_bearer(svc, "root", Role.ADMIN)
        rx_key, _ = operator_bearer(svc, "rx", Role.RESEARCHER)
        keys, certs = {}, {}
        for site in ("site-a", "site-b"):
            made = w.client.post("/api/v1/sites", json={"name": site}, headers=admin)
            assert made.status_code == 201, made.text
            keys[site] = IdentityKey.generate()
            enrolled = w.client.post(
                "/api/v1/enroll",
                json={
                    "site": site,
                    "token": made.json()["enrollment_token"],
                    "public_key": keys[site].public().raw.hex(),
                    "tls_csr": create_client_csr(site)[1].decode(),
                },
            )
            assert enrolled.status_code == 200, enrolled.text
            certs[site] = enrolled.json()["tls_certificate"]
        certs["rx"] = issue_client_certificate(ca, "rx").cert_pem.decode()
        over = {name: TestClient(_with_client_certificate(w.app, pem)) for name, pem in certs.items()}
        base = "https://testserver"

        # site-a's connection asks for site-b's challenge
        stolen = over["site-a"].post(f"{base}/api/v1/agent/challenge", json={"site": "site-b"})
        assert stolen.status_code == 403, stolen.text
        assert "challenge" not in stolen.json()
        # site-b's own challenge, signed by site-b (a signature site-a intercepted or replays): site-a's
        # connection cannot spend it, so site-b still can
        own = over["site-b"].post(f"{base}/api/v1/agent/challenge", json={"site": "site-b"})
        assert own.status_code == 200, own.text
        challenge = own.json()["challenge"]
        signed = {
            "site": "site-b",
            "challenge": challenge,
            "signature": keys["site-b"].sign(canonical_json(agent_login_message("site-b", challenge))).hex(),
        }
        replayed = over["site-a"].post(f"{base}/api/v1/agent/token", json=signed)
        assert replayed.status_code == 403, replayed.text
        assert "access_token" not in replayed.json()
        logged_in = over["site-b"].post(f"{base}/api/v1/agent/token", json=signed)
        assert logged_in.status_code == 200, logged_in.text

        # an operator's API key carried on a site's connection, or on another user's
        for carrier in ("site-a", "rx"):
            taken = over[carrier].post(
                f"{base}/api/v1/auth/token", json={"user": "root", "api_key": root_key}
            )
            assert taken.status_code == 403, (carrier, taken.text)
            assert "access_token" not in taken.json()
        # the control: rx's own certificate trades rx's own key
        mine = over["rx"].post(f"{base}/api/v1/auth/token", json={"user": "rx", "api_key": rx_key})
        assert mine.status_code == 200, mine.text
        for client in over.values():
            client.close()


# --- login routes are limited per client address ----------------------------------------------------------


def test_a_login_flood_from_one_address_throttles_neither_another_address_nor_the_sites_own_requests(
    tmp_path,
):
    with _world(tmp_path, rate_per_s=0.001, rate_burst=3) as w:
        _, site = agent_bearer(w.svc, "flooded-site")
        body = json.dumps({"site": "flooded-site"}).encode()

        def challenge(address: str, **headers: str) -> AsgiAnswer:
            return send_asgi(
                w.client,
                w.app,
                "POST",
                "/api/v1/agent/challenge",
                {"content-type": "application/json", "content-length": str(len(body)), **headers},
                chunks=iter([body]),
                address=address,
            )

        flood = [challenge("203.0.113.9") for _ in range(8)]
        statuses = [a.status for a in flood]
        assert statuses[:3] == [200, 200, 200], statuses
        assert set(statuses[3:]) == {429}, statuses
        assert all(a.pulled == 0 for a in flood[3:])  # refused from the headers
        assert int(flood[-1].headers["retry-after"]) >= 1
        # a forwarding header is no new address
        forwarded = challenge(
            "203.0.113.9", **{"x-forwarded-for": "192.0.2.44", "forwarded": "for=192.0.2.44"}
        )
        assert forwarded.status == 429
        # another address logs in as usual, and the flooded site's own requests are not throttled
        assert challenge("198.51.100.20").status == 200
        for _ in range(3):
            own = send_asgi(w.client, w.app, "GET", "/api/v1/agent/probe/time", site, address="203.0.113.9")
            assert own.status == 200, own.body


# --- the audit log: no secrets, and a refused action writes nothing ----------------------------------------


def _audit(w: World, admin: dict[str, str]) -> list[dict[str, Any]]:
    text = w.client.get("/api/v1/governance/audit", headers=admin).text
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in rows if "seq" in r and "type" in r]


def test_no_security_audit_entry_holds_a_secret_or_a_hash_of_one(world):
    w = world
    root_key, admin = operator_bearer(w.svc, "root", Role.ADMIN)
    secrets: list[str] = [root_key]
    made = w.client.post("/api/v1/sites", json={"name": "audited-site"}, headers=admin).json()
    secrets.append(made["enrollment_token"])
    again = w.client.post("/api/v1/sites/audited-site/enrollment-token", headers=admin).json()
    secrets.append(again["enrollment_token"])
    key = IdentityKey.generate()
    enrolled = w.client.post(
        "/api/v1/enroll",
        json={
            "site": "audited-site",
            "token": again["enrollment_token"],
            "public_key": key.public().raw.hex(),
        },
    )
    assert enrolled.status_code == 200, enrolled.text
    rotated = w.client.post("/api/v1/sites/audited-site/rotate", headers=admin).json()
    secrets.append(rotated["enrollment_token"])
    user = w.client.post("/api/v1/users", json={"name": "rita", "role": "researcher"}, headers=admin).json()
    secrets.append(user["api_key"])
    replaced = w.client.post("/api/v1/users/rita/api-key", headers=admin).json()
    secrets.append(replaced["api_key"])
    assert w.client.post("/api/v1/users/rita/revoke", headers=admin).status_code == 200
    assert w.client.post("/api/v1/sites/audited-site/revoke", headers=admin).status_code == 200

    entries = _audit(w, admin)
    kinds = {e["type"] for e in entries}
    assert {
        "site.created",
        "site.enrollment_token_issued",
        "enrollment",
        "site.rotated",
        "user.created",
    } <= kinds
    assert {"user.key_changed", "user.revoked", "site.revoked"} <= kinds
    text = json.dumps(entries)
    forbidden = {}
    for secret in secrets:
        forbidden[secret] = "a secret"
        forbidden[secret_hash(secret)] = "its stored hash"
        forbidden[api_key_thumbprint(secret_hash(secret))] = "the thumbprint its tokens are bound to"
    for value, what in forbidden.items():
        assert value not in text, f"an audit entry holds {what}"
    # the control: the site's public key is no secret, and the entries do name it
    assert key.public().raw.hex() in text


def test_a_refused_identity_action_writes_no_audit_entry_and_changes_nothing(world):
    w = world
    _, admin = operator_bearer(w.svc, "root", Role.ADMIN)
    operator_bearer(w.svc, "rx", Role.RESEARCHER)
    pending = w.client.post("/api/v1/sites", json={"name": "pending-site"}, headers=admin)
    assert pending.status_code == 201
    agent_bearer(w.svc, "active-site")
    agent_bearer(w.svc, "gone-site")
    assert w.client.post("/api/v1/sites/gone-site/revoke", headers=admin).status_code == 200
    assert (
        w.client.post("/api/v1/users", json={"name": "ex", "role": "auditor"}, headers=admin).status_code
        == 201
    )
    assert w.client.post("/api/v1/users/ex/revoke", headers=admin).status_code == 200
    before = _audit(w, admin)
    sites_before = {s.name: (s.status, s.public_key) for s in w.svc.store.list_sites()}

    refusals = [
        ("POST", "/api/v1/sites/pending-site/rotate", None, 409),  # pending: issue a token instead
        ("POST", "/api/v1/sites/active-site/enrollment-token", None, 409),  # re-keying is a rotation
        ("POST", "/api/v1/sites/gone-site/enrollment-token", None, 409),
        ("POST", "/api/v1/sites/gone-site/rotate", None, 409),
        ("POST", "/api/v1/sites/nobody/enrollment-token", None, 404),
        ("POST", "/api/v1/sites/nobody/rotate", None, 404),
        ("POST", "/api/v1/sites/nobody/revoke", None, 404),
        ("POST", "/api/v1/sites", {"name": "active-site"}, 409),
        ("POST", "/api/v1/sites", {"name": "rx"}, 409),  # a user's name: one namespace
        ("POST", "/api/v1/users", {"name": "active-site", "role": "admin"}, 409),  # a site's name
        ("POST", "/api/v1/users", {"name": "rx", "role": "admin"}, 409),
        ("POST", "/api/v1/users/ex/api-key", None, 409),  # revoked
        ("POST", "/api/v1/users/nobody/api-key", None, 404),
        ("POST", "/api/v1/users/nobody/revoke", None, 404),
        ("POST", "/api/v1/users/root/revoke", None, 409),  # an admin's own account
    ]
    wrong = []
    for method, path, body, status in refusals:
        answer = w.client.request(method, path, json=body, headers=admin)
        if answer.status_code != status or "enrollment_token" in answer.text or "api_key" in answer.text:
            wrong.append((method, path, body, answer.status_code, answer.text[:200]))
    assert wrong == []
    assert _audit(w, admin) == before
    assert {s.name: (s.status, s.public_key) for s in w.svc.store.list_sites()} == sites_before
    assert w.svc.store.get_user("rx").role == Role.RESEARCHER.value
    assert w.svc.store.get_user("active-site") is None


# --- blobs are named by their sha256 and nothing else ------------------------------------------------------


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\n.."])
def test_a_digest_with_a_trailing_newline_names_no_blob(tmp_path, suffix):
    # "^[0-9a-f]{64}$" also matches before a final newline: "<digest>\n" passed as a digest and named a
    # file beside the blob (another name than the one the digest's bytes are stored under)
    blobs = BlobStore(tmp_path / "blobs")
    digest = blobs.put(b"a global model")
    for kind in BlobKind:
        with pytest.raises(InputError):
            blobs.path(digest + suffix, kind)
        with pytest.raises(InputError):
            blobs.get(digest + suffix, kind=kind)
        with pytest.raises(InputError):
            blobs.exists(digest + suffix, kind=kind)
    with pytest.raises(InputError):
        blobs.put(b"a global model", digest + suffix)
    # the control: the digest itself names the blob
    assert blobs.get(digest) == b"a global model"
    # and a file planted under such a name is no blob to collect or keep
    planted = blobs.path(digest).with_name(digest + "\n")
    planted.write_bytes(b"planted")
    assert blobs.collect({digest}) == 0
    assert planted.read_bytes() == b"planted"
