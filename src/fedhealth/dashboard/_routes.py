"""The dashboard's routes under ``/ui``: thin adapters that check the session, call a read model of
:mod:`fedhealth.dashboard._views` in a worker thread, and render a template.

Pages: federation, studies (list and one study), privacy, models (and each model card), drift, audit (with
the verification result). Actions (forms, POST, CSRF-checked): sign in, sign out, revoke a site (admin),
cancel a study (its owner or an admin), designate a drift reference (admin). Every action through the UI,
allowed or refused (for its role, its CSRF token or, under mutual TLS, its client certificate), is an entry in
the orchestrator's audit log (``ui.action``), and so is every sign-in attempt. The log names who signed in by
a user name only: other text typed into the user field (an API key pasted in the wrong field) is written
nowhere.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from fedhealth.core import FedHealthError, NotFoundError, is_valid_name
from fedhealth.dashboard import _views as views
from fedhealth.dashboard._assets import ASSET_NAMES, asset, check_assets
from fedhealth.dashboard._drift import DriftPolicy
from fedhealth.dashboard._drift_watch import stats_report_of
from fedhealth.dashboard._onboarding import onboarding_pack, pack_zip
from fedhealth.dashboard._session import (
    COOKIE_PATH,
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    Denied,
    UiUser,
    check_csrf,
    current_user,
    new_login_csrf,
)
from fedhealth.governance import AuditEventType
from fedhealth.orchestrator import (
    CertificateMismatch,
    Services,
    check_certificate_names,
    peer_certificate,
)
from fedhealth.protocol import Role, StudyStatus

log = logging.getLogger("fedhealth.dashboard")
PREFIX = "/ui"
# Scripts and styles from this origin only; Plotly sets inline styles on its SVG, hence 'unsafe-inline' for
# styles (not for scripts: the pages have no inline script).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
FORM_MAX_BYTES = 16 << 10
# Who a refused sign-in names in the audit log when the user field holds no user name.
NOT_A_USER_NAME = "(not a user name)"
# The orchestrator's answer to an unknown user or a wrong key, so that text which is no user name is refused
# in the same words (and never reaches the store).
_SIGN_IN_REFUSED = "unknown user or wrong API key"

_templates = Environment(
    loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _svc(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def _render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _templates.get_template(name).render(prefix=PREFIX, **context)
    return HTMLResponse(html, status_code=status, headers=_HEADERS)


def _user(request: Request) -> UiUser:
    svc = _svc(request)
    return current_user(
        svc.auth,
        svc.settings.signing_key,
        request.cookies.get(SESSION_COOKIE),
        peer_certificate(request.scope),
    )


async def _acting(request: Request, action: str, **details: Any) -> UiUser:
    """The session's user of an action. Under mutual TLS, a session refused for the connection's client
    certificate (a copied cookie used from another principal's machine) is an audit entry like every refused
    attempt (``action`` refused, by the certificate's principal, reason ``CertificateMismatch``)."""
    try:
        return _user(request)
    except Denied as exc:
        certificate = peer_certificate(request.scope)
        if isinstance(exc.__cause__, CertificateMismatch) and certificate is not None:
            svc = _svc(request)
            who = certificate.name if is_valid_name(certificate.name) else NOT_A_USER_NAME
            reason = type(exc.__cause__).__name__
            await anyio.to_thread.run_sync(
                lambda: _audit(svc, who, f"{action} refused", reason=reason, **details)
            )
        raise


def _audit(svc: Services, who: str, action: str, **details: Any) -> None:
    """One UI action in the orchestrator's signed audit log."""
    svc.audit.append(AuditEventType.UI_ACTION, {"action": action, "by": who, **details}, actor=f"user:{who}")


async def _checked_csrf(svc: Services, who: UiUser, given: str | None, action: str, **details: Any) -> None:
    """The form's CSRF token against the session's; a refusal is an audit entry like every refused attempt
    (``action`` refused, reason ``csrf``)."""
    try:
        check_csrf(who.csrf, given)
    except Denied:
        await anyio.to_thread.run_sync(
            lambda: _audit(svc, who.name, f"{action} refused", reason="csrf", **details)
        )
        raise


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > FORM_MAX_BYTES:
        raise Denied(400, "the form is too large")
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as exc:
        raise Denied(400, "the form is not UTF-8") from exc
    return {k: v[0] for k, v in parsed.items()}


Page = Callable[..., Awaitable[Response]]


def ui_page(handler: Page) -> Page:
    """Turn :class:`Denied` (and not-found) into an HTML answer: a sign-in redirect for 401, an error page
    otherwise."""

    @functools.wraps(handler)
    async def wrapped(*args: Any, **kwargs: Any) -> Response:
        try:
            return await handler(*args, **kwargs)
        except Denied as exc:
            if exc.status == 401:
                return RedirectResponse(f"{PREFIX}/login", status_code=303)
            return _render("error.html", status=exc.status, message=str(exc), user=None)
        except NotFoundError as exc:
            return _render("error.html", status=404, message=str(exc), user=None)

    return wrapped


def dashboard_router(drift: DriftPolicy | None = None) -> APIRouter:
    """The ``/ui`` routes; ``drift``: the thresholds the drift page shows as configured. Raises
    :class:`~fedhealth.dashboard._assets.MissingAsset` if an asset's package is missing, so a broken install
    fails when the orchestrator starts, not in a browser."""
    check_assets()
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    drift_policy = drift or DriftPolicy()

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in ASSET_NAMES:
            return Response("not found", status_code=404, media_type="text/plain")
        found = asset(name)
        return Response(
            found.body,
            media_type=found.media_type,
            headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    @router.get("")
    @router.get("/")
    async def home() -> Response:
        return RedirectResponse(f"{PREFIX}/federation", status_code=303)

    # --- sign-in ---------------------------------------------------------------------------------------

    @router.get("/login")
    async def login_page(request: Request) -> Response:
        token = new_login_csrf()
        response = _render("login.html", user=None, csrf=token, error=None)
        _set_cookie(response, LOGIN_CSRF_COOKIE, token, max_age=900)
        return response

    @router.post("/login")
    @ui_page
    async def login(request: Request) -> Response:
        svc = _svc(request)
        client = request.client.host if request.client else "?"
        if svc.limiter.retry_after(f"ip:{client}") is not None:
            raise Denied(429, "too many sign-in attempts; wait a moment")
        form = await _form(request)
        user, api_key = form.get("user", "").strip(), form.get("api_key", "").strip()
        # the log names a user name or the placeholder, never other typed text (it may be a secret)
        who = user if is_valid_name(user) else NOT_A_USER_NAME

        async def refused(reason: str) -> None:
            await anyio.to_thread.run_sync(lambda: _audit(svc, who, "sign-in refused", reason=reason))

        try:
            check_csrf(request.cookies.get(LOGIN_CSRF_COOKIE) or "", form.get(CSRF_FIELD))
        except Denied:
            await refused("csrf")
            raise
        if not is_valid_name(user):
            await refused("not a user name")
            return _sign_in_again(_SIGN_IN_REFUSED)
        try:
            check_certificate_names(request, user)  # under mutual TLS, as the REST login
        except CertificateMismatch as exc:
            await refused(type(exc).__name__)
            raise Denied(403, str(exc)) from exc
        try:
            token, claims = await anyio.to_thread.run_sync(
                lambda: svc.auth.operator_token(user=user, api_key=api_key)
            )
        except FedHealthError as exc:
            await refused(type(exc).__name__)
            return _sign_in_again(str(exc))
        await anyio.to_thread.run_sync(lambda: _audit(svc, user, "sign-in", role=claims.role))
        response = RedirectResponse(f"{PREFIX}/federation", status_code=303)
        lifetime = int(svc.settings.auth.operator_token_ttl.total_seconds())
        _set_cookie(response, SESSION_COOKIE, token, max_age=lifetime)
        response.delete_cookie(
            LOGIN_CSRF_COOKIE, path=COOKIE_PATH, secure=True, httponly=True, samesite="strict"
        )
        return response

    @router.post("/logout")
    @ui_page
    async def logout(request: Request) -> Response:
        who = await _acting(request, "sign-out")
        form = await _form(request)
        svc = _svc(request)
        await _checked_csrf(svc, who, form.get(CSRF_FIELD), "sign-out")
        # the session's token ends here, not when it expires: a copy of the cookie opens nothing after this
        await anyio.to_thread.run_sync(lambda: svc.auth.sign_out(who.token))
        await anyio.to_thread.run_sync(lambda: _audit(svc, who.name, "sign-out"))
        response = RedirectResponse(f"{PREFIX}/login", status_code=303)
        response.delete_cookie(
            SESSION_COOKIE, path=COOKIE_PATH, secure=True, httponly=True, samesite="strict"
        )
        return response

    # --- pages -----------------------------------------------------------------------------------------

    @router.get("/federation")
    @ui_page
    async def federation(request: Request) -> Response:
        who = _user(request)
        data = await anyio.to_thread.run_sync(views.federation_view, _svc(request))
        return _render("federation.html", user=who, page="federation", **data)

    @router.get("/studies")
    @ui_page
    async def studies(request: Request) -> Response:
        who = _user(request)
        rows = await anyio.to_thread.run_sync(views.studies_view, _svc(request))
        return _render("studies.html", user=who, page="studies", studies=rows)

    @router.get("/studies/{study_id}")
    @ui_page
    async def study(request: Request, study_id: str) -> Response:
        who = _user(request)
        svc = _svc(request)
        owner = (await anyio.to_thread.run_sync(svc.store.get_study, study_id)).spec.owner
        if not who.may_see_study(owner):
            raise Denied(403, "a researcher sees the details of their own studies only")
        data = await anyio.to_thread.run_sync(views.study_view, svc, study_id)
        cancellable = data["status"] in (StudyStatus.RUNNING.value, StudyStatus.AWAITING_APPROVAL.value)
        return _render(
            "study.html",
            user=who,
            page="studies",
            study=data,
            may_cancel=cancellable and who.may_cancel_study(owner),
        )

    @router.get("/privacy")
    @ui_page
    async def privacy(request: Request) -> Response:
        who = _user(request)
        data = await anyio.to_thread.run_sync(views.privacy_view, _svc(request))
        return _render("privacy.html", user=who, page="privacy", **data)

    @router.get("/models")
    @ui_page
    async def models(request: Request) -> Response:
        who = _user(request)
        rows = await anyio.to_thread.run_sync(views.models_view, _svc(request))
        return _render("models.html", user=who, page="models", models=rows)

    @router.get("/models/{digest}/card")
    @ui_page
    async def card(request: Request, digest: str) -> Response:
        who = _user(request)
        svc = _svc(request)
        study_id, text = await anyio.to_thread.run_sync(views.model_card, svc, digest)
        owner = (await anyio.to_thread.run_sync(svc.store.get_study, study_id)).spec.owner
        if not who.may_see_study(owner):
            raise Denied(403, "a researcher sees the details of their own studies only")
        return _render("card.html", user=who, page="models", digest=digest, card=text)

    @router.get("/drift")
    @ui_page
    async def drift_page(request: Request) -> Response:
        who = _user(request)
        data = await anyio.to_thread.run_sync(views.drift_view, _svc(request), drift_policy)
        return _render("drift.html", user=who, page="drift", **data)

    @router.get("/audit")
    @ui_page
    async def audit(request: Request) -> Response:
        who = _user(request)
        q = request.query_params
        filters: dict[str, str | None] = {
            "event_type": q.get("type") or None,
            "actor": q.get("actor") or None,
            "text": (q.get("text") or "")[:200] or None,
        }
        rows = await anyio.to_thread.run_sync(
            lambda: views.audit_view(
                _svc(request), event_type=filters["event_type"], actor=filters["actor"], text=filters["text"]
            )
        )
        return _render(
            "audit.html",
            user=who,
            page="audit",
            entries=rows,
            types=views.audit_types(),
            filters=filters,
            page_size=views.AUDIT_PAGE_SIZE,
            export=urlencode({k: v for k, v in q.items() if v}),
        )

    @router.get("/audit/verify")
    @ui_page
    async def verify(request: Request) -> Response:
        who = _user(request)
        result = await anyio.to_thread.run_sync(views.verification_view, _svc(request))
        return _render("verify.html", user=who, result=result)

    @router.get("/sites/{name}/onboarding.zip")
    @ui_page
    async def onboarding(request: Request, name: str) -> Response:
        who = await _acting(request, "onboarding kit", site=name)
        svc = _svc(request)
        if who.role is not Role.ADMIN:
            await anyio.to_thread.run_sync(
                lambda: _audit(svc, who.name, "onboarding kit refused", site=name, role=who.role.value)
            )
            raise Denied(403, f"role {who.role.value!r} may not download onboarding kits (needs admin)")
        pack = await anyio.to_thread.run_sync(
            lambda: onboarding_pack(svc.store, svc.audit, name, approval_wait_s=svc.settings.approval_wait_s)
        )
        await anyio.to_thread.run_sync(lambda: _audit(svc, who.name, "onboarding kit", site=name))
        folder = f"onboarding-{name}"
        return Response(
            pack_zip(pack, folder),
            media_type="application/zip",
            headers={**_HEADERS, "Content-Disposition": f'attachment; filename="{folder}.zip"'},
        )

    # --- actions ---------------------------------------------------------------------------------------

    @router.post("/sites/{name}/revoke")
    @ui_page
    async def revoke(request: Request, name: str) -> Response:
        who = await _acting(request, "revoke site", site=name)
        svc = _svc(request)
        form = await _form(request)
        await _checked_csrf(svc, who, form.get(CSRF_FIELD), "revoke site", site=name)
        if who.role is not Role.ADMIN:
            await anyio.to_thread.run_sync(
                lambda: _audit(svc, who.name, "revoke site refused", site=name, role=who.role.value)
            )
            raise Denied(403, f"role {who.role.value!r} may not revoke sites (needs admin)")

        def do() -> None:
            svc.store.get_site(name)  # 404 for an unknown site
            with svc.audit.transaction() as c:
                if svc.store.revoke_site(name, svc.settings.clock.now(), connection=c):
                    svc.audit.append(
                        AuditEventType.SITE_REVOKED,
                        {"site": name, "by": who.name, "via": "dashboard"},
                        actor=f"user:{who.name}",
                        connection=c,
                    )
                svc.audit.append(
                    AuditEventType.UI_ACTION,
                    {"action": "revoke site", "by": who.name, "site": name},
                    actor=f"user:{who.name}",
                    connection=c,
                )

        await anyio.to_thread.run_sync(do)
        log.warning("site %s revoked by %s through the dashboard", name, who.name)
        # its waiting polls and sessions end now, not when their wait does; its rounds go on without it
        await svc.site_revoked(name)
        return RedirectResponse(f"{PREFIX}/federation", status_code=303)

    @router.post("/drift/reference")
    @ui_page
    async def drift_reference(request: Request) -> Response:
        who = await _acting(request, "drift reference")
        svc = _svc(request)
        form = await _form(request)
        study_id = form.get("study_id", "").strip()[:64]
        await _checked_csrf(svc, who, form.get(CSRF_FIELD), "drift reference", study_id=study_id)
        if who.role is not Role.ADMIN:
            await anyio.to_thread.run_sync(
                lambda: _audit(
                    svc, who.name, "drift reference refused", study_id=study_id, role=who.role.value
                )
            )
            raise Denied(403, f"role {who.role.value!r} may not designate drift references (needs admin)")

        def do() -> None:
            study = svc.store.get_study(study_id)  # 404 for an unknown study
            if study.status is not StudyStatus.COMPLETED or stats_report_of(svc.store, study_id) is None:
                raise Denied(409, f"study {study_id} is not a completed statistics study")
            with svc.audit.transaction() as c:
                svc.audit.append(
                    AuditEventType.DRIFT_REFERENCE,
                    {"study_id": study_id, "dataset": study.spec.dataset, "by": who.name},
                    actor=f"user:{who.name}",
                    connection=c,
                )
                svc.audit.append(
                    AuditEventType.UI_ACTION,
                    {"action": "drift reference", "by": who.name, "study_id": study_id},
                    actor=f"user:{who.name}",
                    connection=c,
                )

        await anyio.to_thread.run_sync(do)
        return RedirectResponse(f"{PREFIX}/drift", status_code=303)

    @router.post("/studies/{study_id}/cancel")
    @ui_page
    async def cancel(request: Request, study_id: str) -> Response:
        who = await _acting(request, "cancel study", study_id=study_id)
        svc = _svc(request)
        form = await _form(request)
        await _checked_csrf(svc, who, form.get(CSRF_FIELD), "cancel study", study_id=study_id)
        study = await anyio.to_thread.run_sync(svc.store.get_study, study_id)
        if not who.may_cancel_study(study.spec.owner):
            await anyio.to_thread.run_sync(
                lambda: _audit(svc, who.name, "cancel study refused", study_id=study_id, role=who.role.value)
            )
            raise Denied(403, "only the study's owner or an admin may cancel it")
        if study.status not in (StudyStatus.RUNNING, StudyStatus.AWAITING_APPROVAL):
            raise Denied(409, f"the study is {study.status.value}")
        reason = f"cancelled by {who.name}"
        await svc.engine.cancel_study(study_id, reason)
        after = await anyio.to_thread.run_sync(svc.store.get_study, study_id)
        if after.status is StudyStatus.CANCELLED and after.reason == reason:
            await anyio.to_thread.run_sync(
                lambda: svc.audit.append(
                    AuditEventType.STUDY_CANCELLED,
                    {
                        "study_id": study_id,
                        "study": study.name,
                        "owner": study.spec.owner,
                        "reason": reason,
                        "by": who.name,
                    },
                    actor=f"user:{who.name}",
                )
            )
        await anyio.to_thread.run_sync(
            lambda: _audit(svc, who.name, "cancel study", study_id=study_id, outcome=after.status.value)
        )
        return RedirectResponse(f"{PREFIX}/studies/{study_id}", status_code=303)

    return router


def _sign_in_again(error: str) -> Response:
    """The sign-in page with a refusal's message (401) and a fresh double-submit token."""
    fresh = new_login_csrf()
    response = _render("login.html", status=401, user=None, csrf=fresh, error=error)
    _set_cookie(response, LOGIN_CSRF_COOKIE, fresh, max_age=900)
    return response


def _set_cookie(response: Response, name: str, value: str, *, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=COOKIE_PATH, secure=True, httponly=True, samesite="strict"
    )
