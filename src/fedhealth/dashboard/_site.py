"""The site dashboard (``fedhealth site dashboard``): the data steward's approvals queue, in a browser, on the
site's own machine (bound to 127.0.0.1 by default, plain HTTP on the loopback interface).

- Sign-in: the command prints a one-time sign-in link holding a random token (as Jupyter does); whoever can
  run the command already holds the site's home. The token opens a session (an ``HttpOnly``,
  ``SameSite=Strict`` cookie; not ``Secure``, since this listener is plain HTTP on loopback and a Secure
  cookie would never come back); the token is spent on first use.
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
import json
import logging
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError
from sqlalchemy import func, select

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
from fedhealth.core import FedHealthError, write_private_file
from fedhealth.dashboard._assets import ASSET_NAMES, asset
from fedhealth.dashboard._site_consent import WithdrawalFlags
from fedhealth.dashboard._site_quality import QualityCache
from fedhealth.governance import GOVERNANCE_METADATA, ApprovalStatus, list_study_approvals
from fedhealth.privacy import BudgetLedger, sqlite_engine
from fedhealth.protocol import StudySpec

log = logging.getLogger("fedhealth.dashboard")
SITE_COOKIE = "fedhealth_site_ui"
REASON_MAX = 2000
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
    """The one-time sign-in token, the sessions it opened, and their CSRF tokens."""

    def __init__(self, token: str) -> None:
        self._token: str | None = token
        self._sessions: set[str] = set()
        self._key = secrets.token_bytes(32)

    def sign_in(self, token: str) -> str | None:
        if self._token is None or not hmac.compare_digest(self._token.encode(), token.encode()):
            return None
        self._token = None  # spent: a link copied from a terminal's scrollback opens nothing more
        session = secrets.token_urlsafe(32)
        self._sessions.add(session)
        return session

    def valid(self, session: str | None) -> bool:
        return session is not None and session in self._sessions

    def csrf(self, session: str) -> str:
        return hmac.new(self._key, session.encode(), hashlib.sha256).hexdigest()


def _page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _templates.get_template(name).render(prefix="", site_ui=True, user=None, **context)
    return HTMLResponse(html, status_code=status, headers=_HEADERS)


def _error(status: int, message: str) -> HTMLResponse:
    return _page("error.html", status=status, message=message)


def site_dashboard_app(
    home: SiteHome, *, token: str, steward: str, quality: QualityCache | None = None
) -> FastAPI:
    """The steward's dashboard for the site at ``home``; ``token`` is the one-time sign-in token; ``quality``
    keeps the datasets' quality reports between page loads (a fresh one by default)."""
    sessions = _Sessions(token)
    reports = quality or QualityCache()
    withdrawals = WithdrawalFlags()
    site_name = home.require()["site"]
    app = FastAPI(title=f"fedhealth site {site_name}", docs_url=None, redoc_url=None, openapi_url=None)

    def session_of(request: Request) -> str | None:
        session = request.cookies.get(SITE_COOKIE)
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
    async def login(token: str = "") -> Response:
        session = sessions.sign_in(token)
        if session is None:
            return _error(
                401, "this sign-in link is wrong or was already used: run `fedhealth site dashboard` again"
            )
        response = RedirectResponse("/approvals", status_code=303)
        response.set_cookie(SITE_COOKIE, session, httponly=True, samesite="strict", path="/")
        return response

    @app.get("/approvals")
    async def approvals(request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return _error(401, "sign in with the link `fedhealth site dashboard` printed")

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
        )

    @app.get("/approvals/{digest}")
    async def show(request: Request, digest: str) -> Response:
        session = session_of(request)
        if session is None:
            return _error(401, "sign in with the link `fedhealth site dashboard` printed")

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
            return _error(401, "sign in with the link `fedhealth site dashboard` printed")
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
            try:  # the state (never the reason) to the orchestrator; the agent reports it again if this fails
                report_approval(home, full, approved=decision == "approve")
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
            return _error(401, "sign in with the link `fedhealth site dashboard` printed")
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
            return _error(401, "sign in with the link `fedhealth site dashboard` printed")
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
            return _error(401, "sign in with the link `fedhealth site dashboard` printed")
        data = await anyio.to_thread.run_sync(site_verification, home)
        return _page("site_verify.html", **data)

    @app.get("/datasets")
    async def datasets(request: Request, refresh: str = "") -> Response:
        if session_of(request) is None:
            return _error(401, "sign in with the link `fedhealth site dashboard` printed")
        try:
            found = await anyio.to_thread.run_sync(
                lambda: reports.reports(SiteDatasets(home), refresh=refresh == "1")
            )
        except FedHealthError as exc:  # the registry file itself is unreadable
            return _error(500, str(exc))
        return _page("site_datasets.html", page="datasets", site=site_name, steward=steward, datasets=found)

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


def _sync(governance: SiteGovernance) -> str | None:
    client = site_client(governance.home, max_elapsed_s=5.0)
    try:
        result = sync_approvals(governance, client)
    except (FedHealthError, httpx.HTTPError) as exc:
        return f"could not fetch the specs awaiting this site ({' '.join(str(exc).split())[:200]})"
    finally:
        client.close()
    if result.refused:
        return "not registered (bad signature or spec): " + "; ".join(result.refused)
    return None


def new_sign_in_token() -> str:
    return secrets.token_urlsafe(32)


def serve_site_dashboard(
    home: SiteHome,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    steward: str,
    ready_file: Path | None = None,
    log_level: str = "info",
) -> None:
    """Serve the site dashboard until interrupted; prints (and writes to ``ready_file``) the sign-in link."""
    import os
    import socket

    import uvicorn

    token = new_sign_in_token()
    app = site_dashboard_app(home, token=token, steward=steward)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{sock.getsockname()[1]}"
    login = f"{url}/login?token={token}"
    if ready_file is not None:  # for supervisors and tests; private, as it holds the sign-in token
        write_private_file(
            ready_file, json.dumps({"url": url, "login_url": login, "pid": os.getpid()}).encode()
        )
    print(f"site dashboard of {home.require()['site']} on {url}\nsign in (once) at: {login}", flush=True)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
