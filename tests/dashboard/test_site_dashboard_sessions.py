"""The site dashboard's sessions and listener hardened (docs/dashboard.md, "The site dashboard"): only a
loopback ``Host`` with the port it serves is answered (DNS rebinding); a session ends 8 hours after sign-in
and at "Sign out" (server-side: a copied cookie opens nothing afterwards); an unused sign-in link is void
after 15 minutes; ``fedhealth site dashboard-link`` prints a fresh one-time link signed with the running
dashboard's link key; the cookie is named per port.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from typer.testing import CliRunner

from fedhealth.agent import SiteHome
from fedhealth.cli import app as cli
from fedhealth.core import ManualClock
from fedhealth.crypto import IdentityKey, create_ca
from fedhealth.dashboard import site_dashboard_app, site_dashboard_link
from fedhealth.dashboard._site import RUNTIME_FILE, SITE_COOKIE, signed_sign_in_token
from support import TestClient

TOKEN = "the-one-time-token"
PORT = 8765
LOCAL = f"http://127.0.0.1:{PORT}"
COOKIE = f"{SITE_COOKIE}_{PORT}"
KEY = b"k" * 32
HOUR = 3600


@pytest.fixture
def home(tmp_path: Path) -> SiteHome:
    home = SiteHome(tmp_path / "site")
    home.root.mkdir(mode=0o700)
    IdentityKey.generate().save(home.identity_path)
    home.settings_path.write_text(json.dumps({"site": "solo", "orchestrator": "https://127.0.0.1:1"}))
    home.ca_path.write_bytes(create_ca("test federation").cert_pem)  # as enrollment leaves it
    return home


@pytest.fixture(autouse=True)
def no_orchestrator(monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue's fetch from the orchestrator answers at once (as if it had nothing new)."""
    monkeypatch.setattr("fedhealth.dashboard._site._sync", lambda governance: None)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def ui(home: SiteHome, clock: ManualClock) -> Iterator[TestClient]:
    app = site_dashboard_app(home, token=TOKEN, steward="dana", link_key=KEY, clock=clock)
    with TestClient(app, base_url=LOCAL) as client:
        yield client


def _signed_in(client: TestClient, token: str = TOKEN) -> str:
    answer = client.get(f"/login?token={token}", follow_redirects=False)
    assert answer.status_code == 303, answer.text
    return client.cookies[COOKIE]


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, "no CSRF token on the page"
    return found.group(1)


# --- the Host check (DNS rebinding) -------------------------------------------------------------------------


def test_a_request_whose_host_is_not_a_loopback_name_with_this_port_is_refused(ui):
    for host in (
        f"rebound.example:{PORT}",  # DNS rebinding: the attacker's name, now resolving to 127.0.0.1
        f"localhost.rebound.example:{PORT}",
        f"127.0.0.1.rebound.example:{PORT}",
        "testserver",
        "127.0.0.1",  # no port: the browser would have sent :8765
        "127.0.0.1:8766",  # another port's name
        "localhost:80",
        f"[::2]:{PORT}",
        f"127.0.0.1:{PORT}@rebound.example",
        "",
    ):
        for path in ("/approvals", f"/login?token={TOKEN}", "/static/dashboard.css"):
            answer = ui.get(path, headers={"Host": host}, follow_redirects=False)
            assert answer.status_code == 421, (host, path)
            assert answer.text.count("\n") <= 1, answer.text  # one line
            assert "set-cookie" not in answer.headers
    # the refused sign-in did not spend the link
    for host in (f"127.0.0.1:{PORT}", f"localhost:{PORT}", f"LOCALHOST:{PORT}", f"[::1]:{PORT}"):
        assert ui.get("/static/dashboard.css", headers={"Host": host}).status_code == 200, host
    _signed_in(ui)
    assert ui.get("/approvals").status_code == 200
    # a signed-in browser's cookie sent through a rebound name reads nothing
    assert ui.get("/approvals", headers={"Host": f"rebound.example:{PORT}"}).status_code == 421


def test_a_request_without_a_host_or_with_two_is_refused(home):
    app = site_dashboard_app(home, token=TOKEN, steward="dana")

    async def status(headers: list[tuple[bytes, bytes]]) -> int:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": "/static/dashboard.css", "raw_path": b"/static/dashboard.css",
            "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", PORT),
        }  # fmt: skip
        await app(scope, receive, send)
        return int(sent[0]["status"])

    good = (b"host", f"127.0.0.1:{PORT}".encode())
    assert anyio.run(status, [good]) == 200
    assert anyio.run(status, []) == 421
    assert anyio.run(status, [good, (b"host", f"rebound.example:{PORT}".encode())]) == 421


# --- session lifetime, sign-in link lifetime, sign-out ------------------------------------------------------


def test_a_session_ends_eight_hours_after_sign_in_however_active(ui, clock):
    _signed_in(ui)
    for _ in range(7):
        clock.advance(HOUR)
        assert ui.get("/approvals").status_code == 200  # activity does not extend it: absolute
    clock.advance(HOUR - 1)
    assert ui.get("/datasets").status_code == 200
    clock.advance(1)
    ended = ui.get("/approvals")
    assert ended.status_code == 401
    assert "fedhealth site dashboard-link" in ended.text  # where a new sign-in link comes from
    assert ui.get("/overview").status_code == 401


def test_the_cookie_expires_in_the_browser_with_the_session(ui):
    answer = ui.get(f"/login?token={TOKEN}", follow_redirects=False)
    assert f"Max-Age={8 * HOUR}" in answer.headers["set-cookie"]


def test_an_unused_sign_in_link_is_void_after_fifteen_minutes(home, clock):
    app = site_dashboard_app(home, token=TOKEN, steward="dana", link_key=KEY, clock=clock)
    with TestClient(app, base_url=LOCAL) as client:
        clock.advance(15 * 60)
        late = client.get(f"/login?token={TOKEN}", follow_redirects=False)
        assert late.status_code == 401
        assert "expired" in late.text
        # a signed link likewise: good for 15 minutes from when it was made
        link = signed_sign_in_token(KEY, now=clock.now())
        clock.advance(15 * 60 - 1)
        _signed_in(client, link)
        stale = signed_sign_in_token(KEY, now=clock.now())
        clock.advance(15 * 60)
        assert client.get(f"/login?token={stale}", follow_redirects=False).status_code == 401


def test_a_signed_sign_in_link_opens_one_session_and_a_forged_one_nothing(ui, clock):
    link = signed_sign_in_token(KEY, now=clock.now())
    expires, nonce, mac = link.split(".")
    forged = [
        signed_sign_in_token(b"x" * 32, now=clock.now()),  # another key
        f"{int(expires) + 3600}.{nonce}.{mac}",  # its expiry pushed
        f"{expires}.{nonce}x.{mac}",
        f"{expires}.{nonce}.{mac[:-1]}",
        f"{expires}.{nonce}.",
        f"{expires}..{mac}",
        f".{nonce}.{mac}",
        f"\u00b2.{nonce}.{mac}",  # a digit to str.isdigit, not to int()
        f"{'9' * 5000}.{nonce}.{mac}",
        signed_sign_in_token(KEY, now=clock.now().replace(year=2027)),  # signed for far ahead
    ]
    for token in forged:
        answer = ui.get("/login", params={"token": token}, follow_redirects=False)
        assert answer.status_code == 401, token
        assert "set-cookie" not in answer.headers
    _signed_in(ui, link)
    with TestClient(ui.app, base_url=LOCAL) as replay:  # the same link from a shell history
        assert replay.get("/login", params={"token": link}, follow_redirects=False).status_code == 401
        assert replay.get("/approvals").status_code == 401
    assert ui.get("/approvals").status_code == 200


def test_sign_out_needs_the_csrf_token_and_ends_the_session_server_side(ui):
    session = _signed_in(ui)
    for path in ("/approvals", "/overview", "/datasets"):
        page = ui.get(path)
        assert 'action="/logout"' in page.text, path
    token = _csrf(ui.get("/approvals").text)
    for data in ({}, {"csrf_token": ""}, {"csrf_token": token[:-1]}):
        refused = ui.post("/logout", data=data, follow_redirects=False)
        assert refused.status_code == 403, data
    assert ui.get("/logout").status_code == 405  # a link or an <img> on another page cannot sign out
    assert ui.get("/approvals").status_code == 200
    out = ui.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert out.status_code == 200
    assert "Signed out" in out.text
    cleared = out.headers["set-cookie"]
    assert cleared.startswith(f'{COOKIE}=""')
    assert "Max-Age=0" in cleared
    # the cookie, copied before sign-out, opens nothing: the server forgot the session
    with TestClient(ui.app, base_url=LOCAL) as copied:
        cookie = {"Cookie": f"{COOKIE}={session}"}
        assert copied.get("/approvals", headers=cookie).status_code == 401
        assert copied.post("/logout", data={"csrf_token": token}, headers=cookie).status_code == 401
        assert (
            copied.post("/overview/withdrawals", data={"csrf_token": token}, headers=cookie).status_code
            == 401
        )


def test_the_cookie_is_named_per_port_so_two_dashboards_on_one_machine_keep_their_sessions(tmp_path, home):
    other = SiteHome(tmp_path / "other")
    other.root.mkdir(mode=0o700)
    IdentityKey.generate().save(other.identity_path)
    other.settings_path.write_text(json.dumps({"site": "other", "orchestrator": "https://127.0.0.1:1"}))
    first = site_dashboard_app(home, token="a", steward="dana")
    second = site_dashboard_app(other, token="b", steward="dana")
    with TestClient(first, base_url=LOCAL) as a, TestClient(second, base_url="http://127.0.0.1:8766") as b:
        a.get("/login?token=a", follow_redirects=False)
        b.get("/login?token=b", follow_redirects=False)
        assert set(a.cookies) == {COOKIE}
        assert set(b.cookies) == {f"{SITE_COOKIE}_8766"}
        # a browser sends both cookies to both ports: each dashboard finds its own
        both = "; ".join(f"{name}={value}" for c in (a, b) for name, value in c.cookies.items())
        assert a.get("/approvals", headers={"Cookie": both}).status_code == 200
        assert b.get("/approvals", headers={"Cookie": both}).status_code == 200
        # and neither opens with the other's session
        swapped = f"{COOKIE}={b.cookies[f'{SITE_COOKIE}_8766']}"
        with TestClient(first, base_url=LOCAL) as stranger:
            assert stranger.get("/approvals", headers={"Cookie": swapped}).status_code == 401


# --- a fresh sign-in link -----------------------------------------------------------------------------------


def test_dashboard_link_refuses_in_one_line_when_no_dashboard_runs(home):
    result = CliRunner().invoke(cli, ["site", "dashboard-link", "--home", str(home.root)])
    assert result.exit_code == 1
    assert result.output.startswith("error:")
    assert "no site dashboard is running" in result.output
    # a file left by a dashboard that was killed
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (home.root / RUNTIME_FILE).write_text(json.dumps({"url": LOCAL, "pid": dead.pid, "link_key": KEY.hex()}))
    with pytest.raises(Exception, match="no longer running"):
        site_dashboard_link(home)


def test_a_running_dashboard_refuses_a_rebound_host_and_takes_a_fresh_link_from_dashboard_link(
    home, tmp_path
):
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedhealth", "site", "dashboard", "--home", str(home.root), "--port", "0",
         "--steward", "dana", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    runtime = home.root / RUNTIME_FILE
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text():
            assert proc.poll() is None, f"the site dashboard exited with {proc.returncode}"
            assert time.monotonic() < deadline, "the site dashboard did not start"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        port = httpx.URL(info["url"]).port
        assert runtime.stat().st_mode & 0o077 == 0  # it holds the key that signs sign-in links
        with httpx.Client(base_url=info["url"], timeout=10) as browser:
            # the port is known at request time: the rebound name with the right port is refused
            rebound = browser.get(info["login_url"], headers={"Host": f"rebound.example:{port}"})
            assert rebound.status_code == 421
            assert browser.get(info["login_url"], follow_redirects=False).status_code == 303
            assert browser.get("/approvals").status_code == 200
            token = _csrf(browser.get("/approvals").text)
            assert browser.post("/logout", data={"csrf_token": token}).status_code == 200
            assert browser.get("/approvals").status_code == 401
        # the command, in this process (another process than the dashboard's all the same)
        fresh = CliRunner().invoke(cli, ["site", "dashboard-link", "--home", str(home.root)])
        assert fresh.exit_code == 0, fresh.output
        link = fresh.stdout.strip()
        assert link.startswith(f"{info['url']}/login?token=")
        with httpx.Client(timeout=10) as browser:
            assert browser.get(link, follow_redirects=False).status_code == 303
            assert browser.get(f"{info['url']}/approvals").status_code == 200
        with httpx.Client(timeout=10) as replay:
            assert replay.get(link, follow_redirects=False).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert not runtime.exists()  # gone with the process: no link can be made for a dashboard not running
