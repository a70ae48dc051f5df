"""The operator's sites and users (``/api/v1/sites``, ``/api/v1/users``): registration, enrollment tokens,
rotation, revocation, API keys.

Each security action is an entry in the orchestrator's signed audit log, written in the same transaction as
the change it records. Handlers are plain functions of the service and the acting admin.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter

from fedhealth.core import sha256_hex
from fedhealth.governance import AuditEventType
from fedhealth.orchestrator._auth import IssuedToken, Principal
from fedhealth.orchestrator._http import Admin, ApiError, Reader, Svc
from fedhealth.orchestrator._service import OrchestratorService
from fedhealth.orchestrator._store import SiteRow, shown_id
from fedhealth.protocol import Ack, Role, SiteCreate, SiteCreated, SiteInfo, UserCreate, UserCreated, UserInfo

log = logging.getLogger("fedhealth.orchestrator")


def _token_entry(site: str, issued: IssuedToken) -> dict[str, Any]:
    # never the token nor its hash: the entry says that one was issued, when it expires, what it replaced
    return {"site": site, "expires_at": issued.expires_at.isoformat(), "cancelled_tokens": issued.cancelled}


def site_info(row: SiteRow) -> SiteInfo:
    return SiteInfo(
        name=row.name,
        status=row.status.value,
        fingerprint=sha256_hex(bytes.fromhex(row.public_key)) if row.public_key else None,
        created_at=row.created_at,
        last_seen_at=row.last_seen_at,
        enrolled_at=row.enrolled_at,
        revoked_at=row.revoked_at,
        software_version=row.software_version,
        protocol_version=row.protocol_version,
    )


def register_site(svc: OrchestratorService, admin: Principal, body: SiteCreate) -> SiteCreated:
    """Register a site and issue its one-time enrollment token."""
    with svc.audit.transaction() as c:
        svc.store.create_site(body.name, svc.settings.clock.now(), connection=c)
        issued = svc.auth.enrollment_token(body.name, connection=c)
        svc.record(admin, AuditEventType.SITE_CREATED, {"site": body.name}, c)
        svc.record(admin, AuditEventType.SITE_TOKEN_ISSUED, _token_entry(body.name, issued), c)
    return SiteCreated(name=body.name, enrollment_token=issued.token, expires_at=issued.expires_at)


def reissue_enrollment_token(svc: OrchestratorService, admin: Principal, name: str) -> SiteCreated:
    """A fresh enrollment token for a site that has not enrolled yet (409 for an enrolled one)."""
    with svc.audit.transaction() as c:
        issued = svc.auth.enrollment_token(name, connection=c)
        svc.record(admin, AuditEventType.SITE_TOKEN_ISSUED, _token_entry(name, issued), c)
    return SiteCreated(name=name, enrollment_token=issued.token, expires_at=issued.expires_at)


def rotate(svc: OrchestratorService, admin: Principal, name: str) -> SiteCreated:
    """Re-key an enrolled site: its key, tokens and certificate stop working; a new enrollment token."""
    with svc.audit.transaction() as c:
        token, expires, before = svc.auth.rotate(name, connection=c)
        entry = {
            "site": name,
            "old_key": before.public_key,
            "old_certificate_fingerprint": before.cert_fingerprint,
            "expires_at": expires.isoformat(),
        }
        svc.record(admin, AuditEventType.SITE_ROTATED, entry, c)
    log.warning("site %s rotated by %s: its old key is retired", name, admin.name)
    svc.site_locked_out(name)  # its waiting polls and sessions end now, not when their wait does
    return SiteCreated(name=name, enrollment_token=token, expires_at=expires)


async def revoke(svc: OrchestratorService, admin: Principal, name: str) -> SiteInfo:
    """Revoke a site: every request it makes from now on is refused, and its open tasks fail at once."""
    svc.store.get_site(name)
    with svc.audit.transaction() as c:
        if svc.store.revoke_site(name, svc.settings.clock.now(), connection=c):
            svc.record(admin, AuditEventType.SITE_REVOKED, {"site": name}, c)
    log.warning("site %s revoked by %s", name, admin.name)
    # its waiting polls and sessions end now, not when their wait does; its rounds go on without it
    await svc.site_revoked(name)
    return site_info(svc.store.get_site(name))


def add_user(svc: OrchestratorService, admin: Principal, body: UserCreate) -> UserCreated:
    if body.role is Role.SITE:
        raise ApiError(422, "sites enroll; they are not users")
    with svc.audit.transaction() as c:
        api_key = svc.auth.new_user(body.name, body.role, connection=c)
        svc.record(admin, AuditEventType.USER_CREATED, {"user": body.name, "role": body.role.value}, c)
    return UserCreated(name=body.name, role=body.role, api_key=api_key)


def users(svc: OrchestratorService) -> list[UserInfo]:
    return [
        UserInfo(name=u.name, role=Role(u.role), created_at=u.created_at, revoked_at=u.revoked_at)
        for u in svc.store.list_users()
    ]


def replace_api_key(svc: OrchestratorService, admin: Principal, name: str) -> UserCreated:
    """A user's new API key (shown once): the old key and its tokens stop working at once."""
    user = svc.store.get_user(name)
    if user is None:
        raise ApiError(404, f"user {shown_id(name)} does not exist")
    with svc.audit.transaction() as c:
        api_key = svc.auth.new_api_key(name, connection=c)
        svc.record(admin, AuditEventType.USER_KEY_CHANGED, {"user": name}, c)
    return UserCreated(name=name, role=Role(user.role), api_key=api_key)


def revoke_account(svc: OrchestratorService, admin: Principal, name: str) -> Ack:
    if svc.store.get_user(name) is None:
        raise ApiError(404, f"user {shown_id(name)} does not exist")
    if name == admin.name:
        raise ApiError(409, "an admin cannot revoke their own account")
    with svc.audit.transaction() as c:
        if svc.store.revoke_user(name, svc.settings.clock.now(), connection=c):
            svc.record(admin, AuditEventType.USER_REVOKED, {"user": name}, c)
    return Ack()


def admin_router() -> APIRouter:
    router = APIRouter(tags=["operator"])

    @router.post("/api/v1/sites", response_model=SiteCreated, status_code=201)
    async def create_site(svc: Svc, admin: Admin, body: SiteCreate) -> SiteCreated:
        """Register a site and issue its one-time enrollment token (hand it to the site out of band)."""
        return register_site(svc, admin, body)

    @router.post("/api/v1/sites/{name}/enrollment-token", response_model=SiteCreated)
    async def new_enrollment_token(svc: Svc, admin: Admin, name: str) -> SiteCreated:
        """A fresh enrollment token for a site that has not enrolled yet (a lost token): the site's earlier
        tokens stop working. An enrolled site gets 409: re-keying it is ``POST /api/v1/sites/{name}/rotate``.
        """
        return reissue_enrollment_token(svc, admin, name)

    @router.post("/api/v1/sites/{name}/rotate", response_model=SiteCreated)
    async def rotate_site(svc: Svc, admin: Admin, name: str) -> SiteCreated:
        """Re-key an enrolled site: its key, every token issued against it and its TLS client certificate
        stop working at once, and the answer holds the enrollment token for its new key (the site is
        pending until it enrolls with it)."""
        return rotate(svc, admin, name)

    @router.post("/api/v1/sites/{name}/revoke", response_model=SiteInfo)
    async def revoke_site(svc: Svc, admin: Admin, name: str) -> SiteInfo:
        """Revoke a site: every request it makes from now on is refused with 403, and its open tasks close
        as failed (``site_revoked``), so their rounds go on without it rather than wait for it."""
        return await revoke(svc, admin, name)

    @router.get("/api/v1/sites", response_model=list[SiteInfo])
    async def list_sites(svc: Svc, _: Reader) -> list[SiteInfo]:
        return [site_info(s) for s in svc.store.list_sites()]

    @router.post("/api/v1/users", response_model=UserCreated, status_code=201)
    async def create_user(svc: Svc, admin: Admin, body: UserCreate) -> UserCreated:
        return add_user(svc, admin, body)

    @router.get("/api/v1/users", response_model=list[UserInfo])
    async def list_users(svc: Svc, _: Admin) -> list[UserInfo]:
        return users(svc)

    @router.post("/api/v1/users/{name}/api-key", response_model=UserCreated)
    async def new_api_key(svc: Svc, admin: Admin, name: str) -> UserCreated:
        """Replace a user's API key (shown once): the old key, and every token issued against it, stop
        working at once."""
        return replace_api_key(svc, admin, name)

    @router.post("/api/v1/users/{name}/revoke", response_model=Ack)
    async def revoke_user(svc: Svc, admin: Admin, name: str) -> Ack:
        return revoke_account(svc, admin, name)

    return router
