"""docs/dashboard.md attacked where the other dashboard tests do not reach, in process.

The orchestrator's dashboard ("Signing in, roles, CSRF"):

- under mutual TLS a copied session cookie used from another principal's machine is refused for its client
  certificate, and each such refused action is a ``ui.action`` entry (as a refused sign-in is);
- the CSRF key and a sign-out hold at every orchestrator process on one database (one at a time: a second
  is refused): a form drawn before a restart is accepted after it, and a session signed out opens nothing at
  the next process (page or REST);
- a refused sign-in names the user only when the user field holds a user name (at most 63 characters of
  ``[a-z0-9_.-]``); any other text (too long, upper case, look-alike letters, a key) is refused in the words
  of an unknown user and written nowhere: not in the audit log, not in the process's log;
- a researcher's own cancellation and a sign-out are ``ui.action`` entries, and the cancellation is logged as
  the REST API logs it (``study.cancelled``).

The site dashboard ("The site dashboard"):

- a decision's reason never leaves the site: what the dashboard asks the orchestrator to receive holds the
  decision's state and no word of the reason;
- withdrawal notices sent from the overview carry no patient id;
- the data-quality page, the overview and its verification contact nothing (no connection is opened);
- a signed sign-in link replayed with its expiry written another way (leading zeros) opens nothing.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from dashboard_support import Dashboard, add_user, csrf_of, dashboard_app, rita_under_mtls, seed, sign_in

from fedhealth.agent import SiteDatasets, SiteGovernance, SiteHome, csv_uri
from fedhealth.agent._client import OrchestratorClient
from fedhealth.core import ConfigError
from fedhealth.crypto import IdentityKey, create_ca
from fedhealth.dashboard import DashboardExtension, site_dashboard_app
from fedhealth.dashboard._routes import NOT_A_USER_NAME
from fedhealth.dashboard._session import SESSION_COOKIE
from fedhealth.dashboard._site import SITE_COOKIE, signed_sign_in_token
from fedhealth.governance import AuditEventType, ConsentDecision, ConsentRecord, spec_hash
from fedhealth.orchestrator import OrchestratorSettings, create_app, default_extensions
from fedhealth.orchestrator._db import studies
from fedhealth.protocol import Role
from support import TestClient, breast_spec

LOCAL = "http://127.0.0.1:8765"  # the site dashboard answers only a loopback Host with its own port
COOKIE = f"{SITE_COOKIE}_8765"


def _ui_actions(dash: Dashboard) -> list[dict[str, Any]]:
    return [e.payload for e in dash.svc.audit.entries() if e.type == AuditEventType.UI_ACTION]


def _running(dash: Dashboard, study: str) -> None:
    with dash.svc.store.engine.begin() as c:
        c.execute(sa.update(studies).where(studies.c.id == study).values(status="running"))


# --- mutual TLS: a copied session from another principal's machine ------------------------------------------


@pytest.fixture
def mtls(tmp_path: Path) -> Iterator[tuple[TestClient, TestClient, Dashboard]]:
    """An orchestrator whose every request through ``as_rita`` arrives with the client certificate of the
    researcher ``rita`` (as ``_serve`` adds it under ``--mtls``), and a plain client of the same app."""
    with rita_under_mtls(tmp_path) as clients:
        yield clients


def test_under_mtls_each_action_refused_for_its_client_certificate_is_an_audit_entry(mtls):
    as_rita, plain, dash = mtls
    [study] = seed(dash.svc, sites=2, studies=1, rounds=1)
    _running(dash, study)
    admin_key = add_user(dash.svc, "root", Role.ADMIN)
    assert sign_in(plain, "root", admin_key).status_code == 200  # the admin's own browser
    stolen = plain.cookies.get(SESSION_COOKIE)
    token = csrf_of(plain.get("/ui/federation").text)
    headers = {"Cookie": f"{SESSION_COOKIE}={stolen}"}
    attempts = [
        ("POST", "/ui/sites/site-000/revoke", "revoke site refused"),
        ("POST", f"/ui/studies/{study}/cancel", "cancel study refused"),
        ("POST", "/ui/drift/reference", "drift reference refused"),
        ("GET", "/ui/sites/site-000/onboarding.zip", "onboarding kit refused"),
        ("POST", "/ui/logout", "sign-out refused"),
    ]
    for method, path, action in attempts:
        before = len(_ui_actions(dash))
        data = {"csrf_token": token, "study_id": study} if method == "POST" else None
        answer = as_rita.request(method, path, data=data, headers=headers, follow_redirects=False)
        assert answer.status_code == 403, (path, answer.status_code)
        new = _ui_actions(dash)[before:]
        assert [a["action"] for a in new] == [action], (path, new)
        assert new[0]["by"] == "rita"  # the principal whose certificate made the attempt
        assert "certificate" in new[0]["reason"].lower()
    # nothing changed, and the admin's own session was not signed out by the thief's attempt
    assert dash.svc.store.get_site("site-000").status.value == "pending"
    assert dash.svc.store.get_study(study).status.value == "running"
    kinds = {e.type for e in dash.svc.audit.entries()}
    assert AuditEventType.SITE_REVOKED not in kinds
    assert AuditEventType.STUDY_CANCELLED not in kinds
    assert AuditEventType.DRIFT_REFERENCE not in kinds
    assert plain.get("/ui/federation", follow_redirects=False).status_code == 200


# --- several orchestrator processes on one database -------------------------------------------------------


def test_an_open_form_and_a_sign_out_outlive_a_restart_of_the_orchestrator(tmp_path):
    """One orchestrator per database (a second is refused), so "every process on one database" is the one
    that runs now and those that come after it: a form drawn before a restart is accepted after it, and a
    session signed out is refused by the next process too (the sign-out is in the database, not memory)."""
    key = IdentityKey.generate()
    state = tmp_path / "state"

    @contextmanager
    def orchestrator() -> Iterator[tuple[TestClient, Any]]:
        settings = OrchestratorSettings(state_dir=state, signing_key=key, rate_per_s=0)
        app = create_app(settings, extensions=[*default_extensions(), DashboardExtension()])
        with TestClient(app, base_url="https://testserver") as client:
            yield client, app.state.services

    with orchestrator() as (first, svc):
        seed(svc, sites=2, studies=0, rounds=1)
        admin_key = add_user(svc, "root", Role.ADMIN)
        assert sign_in(first, "root", admin_key).status_code == 200
        cookie = first.cookies.get(SESSION_COOKIE)
        form = csrf_of(first.get("/ui/federation").text)
        with pytest.raises(ConfigError, match="another orchestrator"), orchestrator():  # never two at once
            pass
    jar = {"Cookie": f"{SESSION_COOKIE}={cookie}"}  # the browser's cookie, sent to the next process
    with orchestrator() as (second, svc):
        revoked = second.post(
            "/ui/sites/site-000/revoke", data={"csrf_token": form}, headers=jar, follow_redirects=False
        )
        assert revoked.status_code == 303, revoked.text
        assert revoked.headers["location"] == "/ui/federation"
        assert svc.store.get_site("site-000").status.value == "revoked"
        forged = second.post("/ui/sites/site-001/revoke", data={"csrf_token": "0" * 64}, headers=jar)
        assert forged.status_code == 403
        out = second.post("/ui/logout", data={"csrf_token": form}, headers=jar, follow_redirects=False)
        assert out.status_code == 303
    with orchestrator() as (third, svc):
        page = third.get("/ui/federation", headers=jar, follow_redirects=False)
        assert page.status_code == 303
        assert page.headers["location"] == "/ui/login"
        refused = third.post(
            "/ui/sites/site-001/revoke", data={"csrf_token": form}, headers=jar, follow_redirects=False
        )
        assert refused.status_code == 303  # sent to sign in; nothing done
        assert svc.store.get_site("site-001").status.value == "pending"
        api = third.get("/api/v1/studies", headers={"Authorization": f"Bearer {cookie}"})
        assert api.status_code == 401


# --- what a refused sign-in writes --------------------------------------------------------------------------


@pytest.fixture
def dash(tmp_path: Path) -> Iterator[Dashboard]:
    with dashboard_app(tmp_path / "state") as d:
        yield d


_ERROR = re.compile(r'<p class="error" role="alert">(.*?)</p>', re.S)


def test_a_refused_sign_in_names_only_a_user_name_and_writes_other_text_nowhere(dash, caplog):
    caplog.set_level(logging.DEBUG)
    admin_key = add_user(dash.svc, "root", Role.ADMIN)
    longest = "a" * 63  # a user name: at most 63 characters
    not_names = [
        "b" * 64,  # one character too many
        "Root",  # upper case
        "r\u043e\u043et",  # Cyrillic o's: looks like root
        "root admin",
        "root\u200b",  # a zero-width space that strip() keeps
        "-root",
        admin_key,  # the fields swapped
        f"{admin_key[:20]}\n{admin_key[20:]}",
    ]

    def attempt(user: str, *, with_csrf: bool = True) -> httpx.Response:
        page = dash.client.get("/ui/login")
        data = {"user": user, "api_key": "fhk_wrong"}
        if with_csrf:
            data["csrf_token"] = csrf_of(page.text)
        return dash.client.post("/ui/login", data=data)

    unknown = attempt(longest)
    assert unknown.status_code == 401
    assert _ui_actions(dash)[-1]["by"] == longest
    words = _ERROR.search(unknown.text).group(1)
    for text in not_names:
        before = len(_ui_actions(dash))
        answer = attempt(text)
        assert answer.status_code == 401, text
        assert _ERROR.search(answer.text).group(1) == words, text  # refused as an unknown user
        [entry] = _ui_actions(dash)[before:]
        assert entry["by"] == NOT_A_USER_NAME, text
        assert entry["action"] == "sign-in refused"
        # and refused for its CSRF token: still no other text in the log
        before = len(_ui_actions(dash))
        assert attempt(text, with_csrf=False).status_code == 403
        [entry] = _ui_actions(dash)[before:]
        assert (entry["by"], entry["reason"]) == (NOT_A_USER_NAME, "csrf"), text
    written = [json.dumps(e.payload) + (e.actor or "") for e in dash.svc.audit.entries()]
    logged = [r.getMessage() + repr(r.args) for r in caplog.records]
    for text in not_names:
        for where in (written, logged):
            assert not any(text in line or json.dumps(text)[1:-1] in line for line in where), text
    assert not any(admin_key[:20] in line for line in written + logged)


# --- a researcher's cancellation and a sign-out, in the audit log -------------------------------------------


def test_a_researchers_own_cancellation_and_a_sign_out_are_logged_as_the_rest_api_logs_them(dash):
    [own] = seed(dash.svc, sites=2, studies=1, rounds=1, owner="rita")
    _running(dash, own)
    key = add_user(dash.svc, "rita", Role.RESEARCHER)
    assert sign_in(dash.client, "rita", key).status_code == 200
    page = dash.client.get(f"/ui/studies/{own}").text
    assert f'action="/ui/studies/{own}/cancel"' in page  # the button is drawn for the owner
    done = dash.client.post(f"/ui/studies/{own}/cancel", data={"csrf_token": csrf_of(page)})
    assert done.status_code == 200
    study = dash.svc.store.get_study(own)
    assert study.status.value == "cancelled"
    [cancelled] = [e for e in dash.svc.audit.entries() if e.type == AuditEventType.STUDY_CANCELLED]
    assert cancelled.payload["study_id"] == own
    assert cancelled.payload["owner"] == "rita"
    assert cancelled.payload["reason"] == study.reason
    assert cancelled.actor == "user:rita"
    action = _ui_actions(dash)[-1]
    assert (action["action"], action["by"], action["study_id"]) == ("cancel study", "rita", own)
    assert action["outcome"] == "cancelled"
    # a second cancellation of the finished study changes nothing and logs no second study.cancelled
    again = dash.client.post(f"/ui/studies/{own}/cancel", data={"csrf_token": csrf_of(page)})
    assert again.status_code == 409
    assert len([e for e in dash.svc.audit.entries() if e.type == AuditEventType.STUDY_CANCELLED]) == 1
    out = dash.client.post("/ui/logout", data={"csrf_token": csrf_of(page)}, follow_redirects=False)
    assert out.status_code == 303
    last = _ui_actions(dash)[-1]
    assert (last["action"], last["by"]) == ("sign-out", "rita")


# --- the site dashboard: what leaves the site ---------------------------------------------------------------

PATIENT = "MRN-77123-SECRET"
REASON = "Reviewed with Dr Alvarez; patient MRN-55501 is in the pilot cohort"


@pytest.fixture
def home(tmp_path: Path) -> SiteHome:
    home = SiteHome(tmp_path / "site")
    home.root.mkdir(mode=0o700)
    IdentityKey.generate().save(home.identity_path)
    # a federation CA to pin, so a client can be made; every request below is caught before the network
    home.ca_path.write_bytes(create_ca("fedhealth test CA").cert_pem)
    home.settings_path.write_text(json.dumps({"site": "solo", "orchestrator": "https://127.0.0.1:1"}))
    return home


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every request the site's orchestrator client is asked to make (what would leave the site), answered
    as the orchestrator would answer it."""
    calls: list[dict[str, Any]] = []

    def call(self: OrchestratorClient, what: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        body = kwargs.get("content")
        if body is None and "json" in kwargs:
            body = json.dumps(kwargs["json"])
        calls.append({"what": what, "method": method, "path": path, "body": str(body or "")})
        if method == "GET":
            return httpx.Response(200, json={"specs": []})
        if "withdraw" in path:
            return httpx.Response(200, json={"flagged": []})
        return httpx.Response(200, json={})

    monkeypatch.setattr(OrchestratorClient, "call", call)
    return calls


@contextmanager
def _signed_in(home: SiteHome) -> Iterator[TestClient]:
    with TestClient(site_dashboard_app(home, token="link", steward="dana"), base_url=LOCAL) as client:
        assert client.get("/login?token=link", follow_redirects=False).status_code == 303
        yield client


def test_a_decisions_reason_never_leaves_the_site(home, sent):
    body = breast_spec(["solo"], rounds=1, name="sepsis-risk").model_dump(mode="json")
    with SiteGovernance(home) as governance:
        governance.submit(body)
    digest = spec_hash(body)
    with _signed_in(home) as steward:
        token = csrf_of(steward.get(f"/approvals/{digest}").text)  # read before deciding
        for blank in ("", "   ", "\u2003\n\t"):  # no reason, or only (unicode) white space
            refused = steward.post(
                f"/approvals/{digest}/decide",
                data={"csrf_token": token, "decision": "approve", "reason": blank},
            )
            assert refused.status_code == 400
        assert not [c for c in sent if c["method"] == "POST"]
        decided = steward.post(
            f"/approvals/{digest}/decide",
            data={"csrf_token": token, "decision": "refuse", "reason": REASON},
            follow_redirects=False,
        )
        assert decided.status_code == 303
        steward.get("/approvals")  # the queue's synchronisation reports decisions again
    with SiteGovernance(home) as governance:
        assert governance.approvals.get(digest).status.value == "rejected"
        [rejected] = [e for e in governance.log.entries() if e.type == AuditEventType.STUDY_REJECTED]
        assert REASON in json.dumps(rejected.payload)  # kept at the site, in its signed log
    reports = [c for c in sent if c["method"] == "POST"]
    assert reports, "the decision was not reported"
    assert any(digest in c["body"] and "rejected" in c["body"] for c in reports)
    for c in sent:
        for word in ("Alvarez", "MRN-55501", "pilot cohort", "dana"):
            assert word not in c["body"] + c["path"], (word, c)


def test_withdrawal_notices_sent_from_the_overview_carry_no_patient_id(home, sent):
    with SiteGovernance(home) as governance:
        governance.consent().add(
            [ConsentRecord(patient_id=PATIENT, purpose="research", decision=ConsentDecision.PERMIT)]
        )
        governance.consent().withdraw(PATIENT, "research")
    with _signed_in(home) as steward:
        page = steward.get("/overview").text
        assert PATIENT not in page
        token = csrf_of(page.split('action="/overview/withdrawals"')[1])
        done = steward.post("/overview/withdrawals", data={"csrf_token": token}, follow_redirects=False)
        assert done.status_code == 303
        assert done.headers["location"] == "/overview?sent=1&flagged=0"
    [notice] = [c for c in sent if c["method"] == "POST"]
    assert "research" in notice["body"]  # the purpose, which the orchestrator matches
    assert PATIENT not in notice["body"]
    assert "77123" not in notice["body"]


def test_the_quality_overview_and_verification_pages_contact_nothing(home, sent, tmp_path, monkeypatch):
    csv = tmp_path / "cohort.csv"
    csv.write_text("pid,age,label\n" + "".join(f"{PATIENT}-{i},{40 + i},{i % 2}\n" for i in range(30)))
    SiteDatasets(home).add("cohort", csv_uri(csv, label="label", id_column="pid"))
    with SiteGovernance(home) as governance:
        governance.consent().add(
            [ConsentRecord(patient_id=PATIENT, purpose="research", decision=ConsentDecision.PERMIT)]
        )
        governance.consent().withdraw(PATIENT, "research")
    connections: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        connections.append(address)
        raise ConnectionRefusedError("no connection leaves the site in this test")

    with _signed_in(home) as steward:
        monkeypatch.setattr(socket.socket, "connect", refuse)
        monkeypatch.setattr(socket.socket, "connect_ex", refuse)
        for path in ("/datasets", "/datasets?refresh=1", "/overview", "/overview/verify"):
            page = steward.get(path)
            assert page.status_code == 200, (path, page.text)
            assert PATIENT not in page.text
        assert "cohort" in steward.get("/datasets").text
    assert connections == []
    assert sent == []


# --- the site dashboard: a signed sign-in link replayed ----------------------------------------------------


def test_a_signed_link_replayed_with_its_expiry_written_another_way_opens_nothing(home):
    key = b"k" * 32
    app = site_dashboard_app(home, token="printed", steward="dana", link_key=key)
    link = signed_sign_in_token(key, now=datetime.now(UTC))
    expires, nonce, mac = link.split(".")
    with TestClient(app, base_url=LOCAL) as first, TestClient(app, base_url=LOCAL) as thief:
        assert first.get(f"/login?token={link}", follow_redirects=False).status_code == 303
        for replay in (
            f"0{expires}.{nonce}.{mac}",  # the same number, so the same MAC
            f"00{expires}.{nonce}.{mac}",
            f"{expires}.{nonce}.{mac.upper()}",
            f"{expires}.{nonce}.{mac} ",
            f"+{expires}.{nonce}.{mac}",
        ):
            answer = thief.get("/login", params={"token": replay}, follow_redirects=False)
            assert answer.status_code == 401, replay
            assert COOKIE not in thief.cookies
        assert thief.get("/overview").status_code == 401
