"""The site dashboard (``fedhealth site dashboard``): the data steward's approvals queue, in a browser, on the
site's own machine (bound to 127.0.0.1 by default, plain HTTP on the loopback interface).

- Sign-in: the command prints a one-time sign-in link holding a random token (as Jupyter does); whoever can
  run the command already holds the site's home. The token opens a session (an ``HttpOnly``,
  ``SameSite=Strict`` cookie named per port; not ``Secure``, since this listener is plain HTTP on loopback
  and a Secure cookie would never come back); the token is spent on first use and void after 15 minutes.
  ``fedhealth site dashboard-link`` prints a fresh link to the running dashboard: it signs one with the
  per-process link key the dashboard wrote (mode 0600) into the site home. A session ends 8 hours after
  sign-in (absolute, not sliding) or at "Sign out" (a CSRF-checked POST that forgets it server-side).
- Only requests whose ``Host`` is a loopback name with the port they arrived on are answered (421 otherwise),
  so a page on another domain rebound to 127.0.0.1 (DNS rebinding) reaches nothing.
- Pages: the approvals queue; the overview (budgets, consent and the models flagged by withdrawals, the
  site's own audit log); the data quality of each registered dataset (``_site_quality``, kept per source
  snapshot). Nothing these pages show is sent anywhere.
- The queue lists the specs awaiting this site (fetched from the orchestrator, authenticated as the site, on
  each visit; the site's own list when it is out of reach) and those decided. Opening a spec shows it in full
  with the plain-language summary of ``fedhealth site approvals show`` and records that the steward read it
  (``study.reviewed``); only then can it be approved. Approving or refusing needs a reason and a CSRF token;
  the decision goes to the site's signed audit log (``study.approved`` / ``study.rejected``, the steward as
  actor) and its state (never the reason) to the orchestrator, so a study waiting for it starts.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError
from sqlalchemy import func, select
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from fedhealth.agent import (
    DatasetCheckError,
    SiteDatasets,
    SiteGovernance,
    SiteHome,
    check_dataset,
    report_approval,
    report_withdrawals,
    review,
    site_client,
    spec_summary,
    sync_approvals,
    was_reviewed,
    withdrawal_notices,
)
from fedhealth.core import Clock, FedHealthError, SystemClock, write_private_file
from fedhealth.dashboard._assets import ASSET_NAMES, asset
from fedhealth.dashboard._site_consent import WithdrawalFlags
from fedhealth.dashboard._site_quality import QualityCache
from fedhealth.governance import GOVERNANCE_METADATA, ApprovalStatus, list_study_approvals
from fedhealth.privacy import BudgetLedger, sqlite_engine
from fedhealth.protocol import StudySpec

log = logging.getLogger("fedhealth.dashboard")
SITE_COOKIE = "fedhealth_site_ui"  # + "_<port>": browsers send a host's cookies to all its ports
REASON_MAX = 2000
SESSION_LIFETIME_S = 8 * 3600  # absolute: a copied cookie is worth one working day at most
SIGN_IN_LIFETIME_S = 15 * 60
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
RUNTIME_FILE = "site-dashboard.json"  # in the site home, mode 0600: {url, pid, link_key} of the running one
_LINK_PURPOSE = b"fedhealth.site-dashboard.sign-in.v1"
_SIGN_IN_HELP = (
    "sign in with the link `fedhealth site dashboard` printed (a new one: `fedhealth site dashboard-link`)"
)
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_templates = Environment(
    loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


class _Sessions:
    """The sign-in tokens (the one printed at start, and those signed with the link key), the sessions they
    opened with their expiry, and the sessions' CSRF tokens. Called on the event loop only, so a check and
    the spend that follows it are not interleaved with another request's."""

    def __init__(self, token: str, *, link_key: bytes, clock: Clock) -> None:
        self._clock = clock
        self._token: str | None = token
        self._token_expires = clock.monotonic() + SIGN_IN_LIFETIME_S
        self._link_key = link_key
        self._spent: dict[str, float] = {}  # nonce of a signed link used -> its expiry (wall time)
        self._sessions: dict[str, float] = {}  # session -> its expiry (monotonic)
        self._key = secrets.token_bytes(32)

    def sign_in(self, token: str) -> str | None:
        now = self._clock.monotonic()
        if self._token is not None and now >= self._token_expires:
            self._token = None
        if self._token is not None and hmac.compare_digest(self._token.encode(), token.encode()):
            self._token = None  # spent: a link copied from a terminal's scrollback opens nothing more
        elif not self._spend_signed_link(token, self._clock.now().timestamp()):
            return None
        self._sessions = {s: t for s, t in self._sessions.items() if t > now}
        session = secrets.token_urlsafe(32)
        self._sessions[session] = now + SESSION_LIFETIME_S
        return session

    def _spend_signed_link(self, token: str, now: float) -> bool:
        expires, _, rest = token.partition(".")
        nonce, _, mac = rest.partition(".")
        if (
            not (expires.isascii() and expires.isdigit() and len(expires) <= 12)  # int() of "²" raises
            or not nonce
            or not hmac.compare_digest(_link_mac(self._link_key, int(expires), nonce).encode(), mac.encode())
        ):
            return False
        self._spent = {n: t for n, t in self._spent.items() if t > now}
        # the expiry bound keeps a link signed for far ahead from outliving the spent-nonce memory
        if not now < int(expires) <= now + SIGN_IN_LIFETIME_S or nonce in self._spent:
            return False
        self._spent[nonce] = int(expires)
        return True

    def valid(self, session: str | None) -> bool:
        if session is None or session not in self._sessions:
            return False
        if self._clock.monotonic() >= self._sessions[session]:
            del self._sessions[session]
            return False
        return True

    def sign_out(self, session: str) -> None:
        self._sessions.pop(session, None)

    def csrf(self, session: str) -> str:
        return hmac.new(self._key, session.encode(), hashlib.sha256).hexdigest()


def _link_mac(link_key: bytes, expires: int, nonce: str) -> str:
    return hmac.new(
        link_key, b"|".join([_LINK_PURPOSE, str(expires).encode(), nonce.encode()]), "sha256"
    ).hexdigest()


def signed_sign_in_token(link_key: bytes, *, now: datetime) -> str:
    """A one-time sign-in token for the dashboard holding ``link_key``, void 15 minutes after ``now``."""
    expires = int(now.timestamp()) + SIGN_IN_LIFETIME_S
    nonce = secrets.token_urlsafe(16)
    return f"{expires}.{nonce}.{_link_mac(link_key, expires, nonce)}"


class _LoopbackHostOnly:
    """Answers only requests whose ``Host`` names this listener by a loopback name (or its own IP address)
    and the port the request arrived on (ASGI ``server``). A page on another domain that rebinds its name to
    127.0.0.1 sends that name, so it gets a 421 and reads nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _addressed_to_loopback(scope):
            refused = PlainTextResponse(
                "misdirected request: open the dashboard at http://127.0.0.1:<port>/\n", status_code=421
            )
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _addressed_to_loopback(scope: Scope) -> bool:
    server = scope.get("server")
    hosts = Headers(scope=scope).getlist("host")
    if not server or server[1] is None or len(hosts) != 1:
        return False
    names = set(LOOPBACK_NAMES)
    try:  # an address literal cannot be rebound, so the one it was reached at is fine (`--host` elsewhere)
        address = ipaddress.ip_address(server[0])
        names.add(f"[{address}]" if address.version == 6 else str(address))
    except ValueError:
        pass
    allowed = {f"{name}:{server[1]}" for name in names} | (names if server[1] == 80 else set())
    return hosts[0].lower() in allowed


def _cookie_name(request: Request) -> str:
    return f"{SITE_COOKIE}_{request.scope['server'][1]}"  # _LoopbackHostOnly let only such requests in


def _page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _templates.get_template(name).render(prefix="", site_ui=True, user=None, **context)
    return HTMLResponse(html, status_code=status, headers=_HEADERS)


def _error(status: int, message: str) -> HTMLResponse:
    return _page("error.html", status=status, message=message)


def site_dashboard_app(
    home: SiteHome,
    *,
    token: str,
    steward: str,
    quality: QualityCache | None = None,
    link_key: bytes | None = None,
    clock: Clock | None = None,
) -> FastAPI:
    """The steward's dashboard for the site at ``home``; ``token`` is the one-time sign-in token; ``quality``
    keeps the datasets' quality reports between page loads (a fresh one by default); ``link_key`` signs
    further sign-in links (:func:`signed_sign_in_token`; a fresh random key by default); ``clock`` gives the
    time of the tokens' and sessions' expiry."""
    sessions = _Sessions(token, link_key=link_key or secrets.token_bytes(32), clock=clock or SystemClock())
    reports = quality or QualityCache()
    withdrawals = WithdrawalFlags()
    site_name = home.require()["site"]
    app = FastAPI(title=f"fedhealth site {site_name}", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_LoopbackHostOnly)

    def session_of(request: Request) -> str | None:
        session = request.cookies.get(_cookie_name(request))
        return session if sessions.valid(session) else None

    async def checked_form(request: Request, session: str) -> dict[str, str] | Response:
        """The posted form, or the error page if it is too large or lacks the session's CSRF token."""
        body = await request.body()
        if len(body) > 16 << 10:
            return _error(400, "the form is too large")
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        given = form.get("csrf_token", "")
        if not hmac.compare_digest(sessions.csrf(session).encode(), given.encode()):
            return _error(403, "the form's CSRF token is missing or wrong: reload the page and try again")
        return form

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in ASSET_NAMES:
            return Response("not found", status_code=404, media_type="text/plain")
        found = asset(name)
        return Response(
            found.body, media_type=found.media_type, headers={"X-Content-Type-Options": "nosniff"}
        )

    @app.get("/")
    async def root() -> Response:
        return RedirectResponse("/approvals", status_code=303)

    @app.get("/login")
    async def login(request: Request, token: str = "") -> Response:
        session = sessions.sign_in(token)
        if session is None:
            return _error(
                401,
                "this sign-in link is wrong, expired (15 minutes) or already used: "
                "`fedhealth site dashboard-link` prints a new one",
            )
        response = RedirectResponse("/approvals", status_code=303)
        response.set_cookie(
            _cookie_name(request),
            session,
            max_age=SESSION_LIFETIME_S,
            httponly=True,
            samesite="strict",
            path="/",
        )
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return _error(401, _SIGN_IN_HELP)
        form = await checked_form(request, session)
        if isinstance(form, Response):
            return form
        sessions.sign_out(session)
        log.info("steward %s signed out", steward)
        response = _page("site_signed_out.html", site=site_name)
        response.delete_cookie(_cookie_name(request), httponly=True, samesite="strict", path="/")
        return response

    @app.get("/approvals")
    async def approvals(request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return _error(401, _SIGN_IN_HELP)

        def read() -> tuple[list[Any], str | None]:
            with SiteGovernance(home) as governance:
                warning = _sync(governance)
                return list_study_approvals(governance.engine), warning

        records, warning = await anyio.to_thread.run_sync(read)
        pending = [r for r in records if r.status is ApprovalStatus.PENDING]
        decided = [r for r in records if r.status is not ApprovalStatus.PENDING]
        return _page(
            "site_approvals.html",
            page="approvals",
            site=site_name,
            pending=pending,
            decided=decided,
            warning=warning,
            steward=steward,
            csrf=sessions.csrf(session),
        )

    @app.get("/approvals/{digest}")
    async def show(request: Request, digest: str) -> Response:
        session = session_of(request)
        if session is None:
            return _error(401, _SIGN_IN_HELP)

        def read() -> tuple[Any, list[str]]:
            with SiteGovernance(home) as governance:
                full = governance.approvals.resolve(digest)
                record = review(governance.approvals, governance.log, full, steward=steward)
            try:
                parsed = StudySpec.model_validate(dict(record.spec))
            except ValidationError:
                return record, ["Not a study spec this release can summarise: read it in full below."]
            dataset, problem = _dataset_summary(home, parsed.dataset)
            return record, [*spec_summary(parsed, site_name, dataset), *([problem] if problem else [])]

        try:
            record, summary = await anyio.to_thread.run_sync(read)
        except FedHealthError as exc:
            return _error(404, str(exc))
        return _page(
            "site_spec.html",
            site=site_name,
            record=record,
            summary=summary,
            steward=steward,
            spec_json=json.dumps(dict(record.spec), indent=2, sort_keys=True),
            csrf=sessions.csrf(session),
        )

    @app.post("/approvals/{digest}/decide")
    async def decide(request: Request, digest: str) -> Response:
        session = session_of(request)
        if session is None:
            return _error(401, _SIGN_IN_HELP)
        form = await checked_form(request, session)
        if isinstance(form, Response):
            return form
        decision, reason = form.get("decision"), form.get("reason", "").strip()
        if decision not in ("approve", "refuse"):
            return _error(400, "the decision must be approve or refuse")
        if not reason or len(reason) > REASON_MAX:
            return _error(400, f"a decision needs a reason (at most {REASON_MAX} characters)")

        def record() -> tuple[str, str | None]:
            with SiteGovernance(home) as governance:
                full = governance.approvals.resolve(digest)
                if not was_reviewed(governance.engine, full):
                    raise FedHealthError("open the spec and read it before deciding")
                if decision == "approve":
                    governance.approvals.approve(full, reason=reason, steward=steward)
                else:
                    governance.approvals.reject(full, reason=reason, steward=steward)
            # the state (never the reason) to the orchestrator; the agent reports it again if this fails, so
            # the steward's page does not wait long on an orchestrator out of reach
            try:
                report_approval(home, full, approved=decision == "approve", max_elapsed_s=_REPORT_WAIT_S)
            except (FedHealthError, httpx.HTTPError) as exc:
                return full, f"the orchestrator was not told yet ({' '.join(str(exc).split())[:200]})"
            return full, None

        try:
            full, warning = await anyio.to_thread.run_sync(record)
        except FedHealthError as exc:
            return _error(409, str(exc))
        log.info("steward %s: %s spec %s", steward, decision, full)
        if warning:
            log.warning("spec %s: %s", full[:12], warning)
        return RedirectResponse("/approvals", status_code=303)

    @app.get("/overview")
    async def overview(request: Request, sent: int | None = None, flagged: int | None = None) -> Response:
        session = session_of(request)
        if session is None:
            return _error(401, _SIGN_IN_HELP)
        data = await anyio.to_thread.run_sync(site_overview, home, withdrawals)
        return _page(
            "site_overview.html",
            page="overview",
            site=site_name,
            steward=steward,
            csrf=sessions.csrf(session),
            sent=sent,
            flagged_versions=flagged,
            **data,
        )

    @app.post("/overview/withdrawals")
    async def send_withdrawals(request: Request) -> Response:
        """Send every withdrawal notice in the site's log to the orchestrator (as ``fedhealth site consent
        sync`` does: snapshot commitments, never a patient id; it ignores notices it has seen), which flags
        the model versions trained on them."""
        session = session_of(request)
        if session is None:
            return _error(401, _SIGN_IN_HELP)
        form = await checked_form(request, session)
        if isinstance(form, Response):
            return form

        def send() -> tuple[int, int]:
            with SiteGovernance(home) as governance:
                notices = withdrawal_notices(governance)
            return len(notices), len(report_withdrawals(home, notices)) if notices else 0

        try:
            sent, flagged = await anyio.to_thread.run_sync(send)
        except (FedHealthError, httpx.HTTPError) as exc:
            return _error(502, f"the orchestrator was not told ({' '.join(str(exc).split())[:300]})")
        log.info("steward %s: sent %d withdrawal notice(s); %d version(s) flagged", steward, sent, flagged)
        return RedirectResponse(f"/overview?sent={sent}&flagged={flagged}", status_code=303)

    @app.get("/overview/verify")
    async def overview_verify(request: Request) -> Response:
        """The site's own audit log verified (a fragment the overview loads after it is shown: checking every
        entry's signature takes seconds on a long log)."""
        if session_of(request) is None:
            return _error(401, _SIGN_IN_HELP)
        data = await anyio.to_thread.run_sync(site_verification, home)
        return _page("site_verify.html", **data)

    @app.get("/datasets")
    async def datasets(request: Request, refresh: str = "") -> Response:
        session = session_of(request)
        if session is None:
            return _error(401, _SIGN_IN_HELP)
        try:
            found = await anyio.to_thread.run_sync(
                lambda: reports.reports(SiteDatasets(home), refresh=refresh == "1")
            )
        except FedHealthError as exc:  # the registry file itself is unreadable
            return _error(500, str(exc))
        return _page(
            "site_datasets.html",
            page="datasets",
            site=site_name,
            steward=steward,
            datasets=found,
            csrf=sessions.csrf(session),
        )

    return app


def site_overview(home: SiteHome, withdrawals: WithdrawalFlags | None = None) -> dict[str, Any]:
    """This site's privacy budget per dataset with each study's charge, its consent states, and the studies
    that trained on data of patients who withdrew later (``withdrawals`` keeps what it read of the log
    between calls)."""
    with SiteGovernance(home) as governance:
        flags = withdrawals or WithdrawalFlags()
        flagged, withdrawn = flags.flags(governance.engine, governance.log.log_id)
        ledger_engine = sqlite_engine(home.database_path)
        try:
            BudgetLedger.create_schema(ledger_engine)
            ledger = BudgetLedger(ledger_engine)
            budgets = [ledger.statement(b.dataset) for b in ledger.budgets()]
        finally:
            ledger_engine.dispose()
        records = GOVERNANCE_METADATA.tables["gov_consent_records"]
        with governance.engine.connect() as conn:
            consent = [
                {"purpose": purpose, "decision": decision, "withdrawn": bool(withdrawn), "patients": int(n)}
                for purpose, decision, withdrawn, n in conn.execute(
                    select(
                        records.c.purpose,
                        records.c.decision,
                        records.c.withdrawn_at.is_not(None),
                        func.count(func.distinct(records.c.patient_id)),
                    )
                    .group_by(records.c.purpose, records.c.decision, records.c.withdrawn_at.is_not(None))
                    .order_by(records.c.purpose, records.c.decision)
                )
            ]
    return {"budgets": budgets, "consent": consent, "flagged": flagged, "withdrawals": withdrawn}


def site_verification(home: SiteHome) -> dict[str, Any]:
    """This site's own audit log verified against its identity key (every entry's chain and signature)."""
    with SiteGovernance(home) as governance:
        report = governance.log.verify()
    return {"verified": report.ok, "checked": report.checked, "summary": report.summary()}


def _dataset_summary(home: SiteHome, name: str) -> tuple[Any, str | None]:
    """The site's registered dataset of that name, checked now (as ``site approvals show`` does)."""
    datasets = SiteDatasets(home)
    if name not in datasets.all():
        return None, None
    try:
        return check_dataset(name, datasets.uri(name), None), None
    except DatasetCheckError as exc:
        return None, f"Warning: {exc}"


_REPORT_WAIT_S = 3.0  # a decision's report to the orchestrator: the agent sends it again if this fails
_SYNC_PAUSE_S = 60.0  # after a failed fetch, the queue shows what the site holds without asking again
_sync_failed: dict[str, tuple[float, str]] = {}  # site home -> (when the fetch failed, its warning)


def _sync(governance: SiteGovernance) -> str | None:
    """Fetch and register the specs awaiting this site; a warning when the orchestrator is out of reach,
    after which the queue does not ask again for a minute (each try may wait seconds)."""
    key = str(governance.home.root)
    failed = _sync_failed.get(key)
    if failed is not None and time.monotonic() - failed[0] < _SYNC_PAUSE_S:
        return failed[1]
    client = None
    try:
        # inside: a home that cannot make a client (no federation CA to pin) is a warning, not a failed page
        client = site_client(governance.home, max_elapsed_s=5.0)
        result = sync_approvals(governance, client)
    except (FedHealthError, httpx.HTTPError) as exc:
        warning = f"could not fetch the specs awaiting this site ({' '.join(str(exc).split())[:200]})"
        _sync_failed[key] = (time.monotonic(), f"{warning}; asked again in a minute")
        return warning
    finally:
        if client is not None:
            client.close()
    _sync_failed.pop(key, None)
    if result.refused:
        return "not registered (bad signature or spec): " + "; ".join(result.refused)
    return None


def new_sign_in_token() -> str:
    return secrets.token_urlsafe(32)


def site_dashboard_link(home: SiteHome, *, clock: Clock | None = None) -> str:
    """A fresh one-time sign-in link to the dashboard running for ``home`` (void after 15 minutes), signed
    with the link key it wrote into the home; :class:`FedHealthError` when none is running."""
    runtime = home.root / RUNTIME_FILE
    try:
        info = json.loads(runtime.read_text())
        pid, url, link_key = int(info["pid"]), str(info["url"]), bytes.fromhex(info["link_key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FedHealthError(
            f"no site dashboard is running for {home.root}: start one with `fedhealth site dashboard`"
        ) from exc
    try:
        os.kill(pid, 0)
    except ProcessLookupError as exc:
        raise FedHealthError(
            f"the site dashboard for {home.root} (pid {pid}) is no longer running: start it again"
        ) from exc
    except PermissionError:
        pass  # running, as another account (a supervisor's): its file is in this home, so the link is ours
    return f"{url}/login?token={signed_sign_in_token(link_key, now=(clock or SystemClock()).now())}"


def serve_site_dashboard(
    home: SiteHome,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    steward: str,
    ready_file: Path | None = None,
    log_level: str = "info",
) -> None:
    """Serve the site dashboard until interrupted; prints (and writes to ``ready_file``) the sign-in link,
    and writes its link key to the home for ``fedhealth site dashboard-link`` while it runs."""
    import socket

    import uvicorn

    token = new_sign_in_token()
    link_key = secrets.token_bytes(32)
    app = site_dashboard_app(home, token=token, steward=steward, link_key=link_key)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{sock.getsockname()[1]}"
    login = f"{url}/login?token={token}"
    runtime = home.root / RUNTIME_FILE
    # private, as it signs sign-in links; whoever can read it already holds the site's identity key
    write_private_file(
        runtime, json.dumps({"url": url, "pid": os.getpid(), "link_key": link_key.hex()}).encode()
    )
    if ready_file is not None:  # for supervisors and tests; private, as it holds the sign-in token
        write_private_file(
            ready_file, json.dumps({"url": url, "login_url": login, "pid": os.getpid()}).encode()
        )
    print(
        f"site dashboard of {home.require()['site']} on {url}\n"
        f"sign in (once, within 15 minutes) at: {login}\n"
        f"a new sign-in link: fedhealth site dashboard-link --home {home.root}",
        flush=True,
    )
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=3)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        try:  # unless a later dashboard for this home wrote its own
            if json.loads(runtime.read_text()).get("pid") == os.getpid():
                runtime.unlink()
        except (OSError, ValueError):
            pass
