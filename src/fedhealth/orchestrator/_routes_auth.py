"""Health, enrollment and login: ``/healthz``, ``POST /api/v1/enroll``, ``/api/v1/agent/challenge``,
``/api/v1/agent/token`` and ``/api/v1/auth/token``.

Handlers are plain functions of the service; the routes check what only the connection knows (the client
certificate's name, the client's protocol versions), call them, and return their answer.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request

import fedhealth
from fedhealth.core import CryptoError
from fedhealth.crypto import certificate_fingerprint, sign_client_csr
from fedhealth.governance import AuditEventType
from fedhealth.orchestrator._http import ApiError, Svc, check_certificate_names
from fedhealth.orchestrator._service import OrchestratorService
from fedhealth.orchestrator._versions import check_client, record_agent
from fedhealth.protocol import (
    AgentTokenRequest,
    ChallengeRequest,
    ChallengeResponse,
    EnrollRequest,
    EnrollResponse,
    OperatorTokenRequest,
    PeerVersion,
    Role,
    TokenResponse,
)

log = logging.getLogger("fedhealth.orchestrator")


def enroll_site(svc: OrchestratorService, body: EnrollRequest) -> EnrollResponse:
    """A site registers its Ed25519 public key with its one-time enrollment token (see the route)."""
    certificate = None
    if body.tls_csr is not None and svc.settings.ca is not None:
        # checked before the token is spent, so a bad request does not burn the site's token
        try:
            certificate = sign_client_csr(svc.settings.ca, body.tls_csr.encode(), common_name=body.site)
        except CryptoError as exc:
            raise ApiError(422, "invalid certificate signing request", str(exc)) from exc
    fingerprint = certificate_fingerprint(certificate) if certificate is not None else None
    with svc.audit.transaction() as c:
        when = svc.auth.enroll(
            site=body.site,
            token=body.token,
            public_key_hex=body.public_key,
            cert_fingerprint=fingerprint,
            connection=c,
        )
        svc.audit.append(
            AuditEventType.ENROLLMENT,
            {
                "site": body.site,
                "public_key": body.public_key,
                "enrolled_at": when.isoformat(),
                "certificate_fingerprint": fingerprint,
            },
            actor=f"site:{body.site}",
            connection=c,
        )
    log.info("site %s enrolled (key %s…)", body.site, body.public_key[:16])
    return EnrollResponse(
        site=body.site, enrolled_at=when, tls_certificate=certificate.decode() if certificate else None
    )


def issue_challenge(svc: OrchestratorService, body: ChallengeRequest) -> ChallengeResponse:
    challenge, expires = svc.auth.challenge(body.site)
    return ChallengeResponse(challenge=challenge, expires_at=expires)


def issue_agent_token(svc: OrchestratorService, body: AgentTokenRequest, peer: PeerVersion) -> TokenResponse:
    """A short-lived agent token for a signature over a fresh challenge; the agent's versions are noted."""
    token, claims = svc.auth.agent_token(
        site=body.site, challenge=body.challenge, signature_hex=body.signature
    )
    record_agent(svc.store, body.site, peer)
    return TokenResponse(access_token=token, expires_at=claims.expires_at, role=Role.SITE)


def issue_operator_token(svc: OrchestratorService, body: OperatorTokenRequest) -> TokenResponse:
    token, claims = svc.auth.operator_token(user=body.user, api_key=body.api_key)
    return TokenResponse(access_token=token, expires_at=claims.expires_at, role=Role(claims.role))


def auth_router() -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    async def healthz(request: Request) -> dict[str, str]:
        """Up, its release, and whether the recipes' libraries are loaded yet ("loading" for a few seconds
        after start: a boosting study submitted meanwhile waits for them)."""
        libraries = getattr(request.app.state, "libraries", "loaded")
        return {"status": "ok", "version": fedhealth.__version__, "libraries": libraries}

    @router.post("/api/v1/enroll", response_model=EnrollResponse, tags=["enrollment"])
    async def enroll(svc: Svc, request: Request, body: EnrollRequest) -> EnrollResponse:
        """A site registers its Ed25519 public key with its one-time enrollment token.

        401: the token is unknown, superseded by a newer one, spent or expired. 409: the token is valid but
        the site is enrolled already (an enrolled site gets a new key only by an admin's rotation). 403: the
        connection's client certificate names another principal (one never carries another's token).
        """
        check_certificate_names(request, body.site)
        return enroll_site(svc, body)

    @router.post("/api/v1/agent/challenge", response_model=ChallengeResponse, tags=["enrollment"])
    async def agent_challenge(svc: Svc, request: Request, body: ChallengeRequest) -> ChallengeResponse:
        check_certificate_names(request, body.site)
        check_client(request.headers, client_name="agent", where="at this site")
        return issue_challenge(svc, body)

    @router.post("/api/v1/agent/token", response_model=TokenResponse, tags=["enrollment"])
    async def agent_token(svc: Svc, request: Request, body: AgentTokenRequest) -> TokenResponse:
        """Trade a signature over a fresh challenge for a short-lived agent token."""
        check_certificate_names(request, body.site)
        peer = check_client(request.headers, client_name="agent", where="at this site")
        return issue_agent_token(svc, body, peer)

    @router.post("/api/v1/auth/token", response_model=TokenResponse, tags=["operator"])
    async def operator_token(svc: Svc, request: Request, body: OperatorTokenRequest) -> TokenResponse:
        """Trade a user's API key for a short-lived operator token."""
        check_certificate_names(request, body.user)
        check_client(request.headers, client_name="command", where="here")
        return issue_operator_token(svc, body)

    return router
