"""Routes between sites and the orchestrator outside tasks, and the operator's view of them.

- Study approvals. ``GET /api/v1/agent/approvals``: the specs of the studies awaiting this site's decision
  (with the owner's signature, so the site can verify it before its steward reads it);
  ``POST /api/v1/agent/approvals``: the site's steward decided on a spec hash; waiting studies start or fail.
- Pilot readiness (``fedhealth site check``). ``GET /api/v1/agent/probe/time`` (clock skew),
  ``GET /api/v1/agent/probe?size=N`` and ``POST /api/v1/agent/probe`` (bandwidth down and up),
  ``POST /api/v1/agent/readiness`` (the site's figures), ``GET /api/v1/sites/readiness`` (the operator's
  view of every site's latest report and software version).

Handlers are plain functions of the services; the routes parse, call them, and map the result.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from fedhealth.orchestrator._http import ApiError, Reader, Site, Svc, body_stream
from fedhealth.orchestrator._service import OrchestratorService
from fedhealth.protocol import (
    Ack,
    ApprovalReport,
    PendingSpec,
    PendingSpecs,
    ProbeEcho,
    SiteReadiness,
    SiteReadinessInfo,
)

PROBE_MAX_BYTES = 32 << 20  # the largest bandwidth probe either way
_PROBE_BLOCK = bytes(range(256)) * 4096  # 1 MiB of a fixed pattern: no randomness needed to time a transfer


def pending_specs(svc: OrchestratorService, site: str) -> PendingSpecs:
    """The studies that name ``site`` and still await its steward's decision."""
    out = []
    for study in svc.store.awaiting_studies():
        if site not in study.named_sites or study.spec_hash is None:
            continue
        signed = svc.signature_of(study.id)  # the governance extension keeps owners' signatures
        out.append(
            PendingSpec(
                study_id=study.id,
                spec_hash=study.spec_hash,
                spec=study.spec,
                spec_signature=signed[0] if signed is not None else None,
                owner_public_key=signed[1] if signed is not None else None,
                approval_deadline=study.approval_deadline_at,
            )
        )
    return PendingSpecs(specs=out)


def readiness_of_sites(svc: OrchestratorService) -> list[SiteReadinessInfo]:
    reports = svc.store.readiness()
    return [
        SiteReadinessInfo(
            site=name,
            readiness=SiteReadiness.model_validate_json(text) if text else None,
        )
        for name, text in reports.items()
    ]


async def accept_approval(svc: OrchestratorService, site: str, body: ApprovalReport) -> Ack:
    """This site's steward decided on a spec hash; the studies waiting on it start or fail."""
    await svc.engine.approval_reported(site, body.spec_hash, body.state)
    return Ack()


def accept_readiness(svc: OrchestratorService, site: str, body: SiteReadiness) -> Ack:
    """Keep a site's latest readiness report (a site reports its own only: 403 otherwise)."""
    if body.site != site:
        raise ApiError(403, "a site reports its own readiness only")
    # Kept with the orchestrator's time of receipt, not the site's: a skewed or lying site clock made a
    # stale report read "checked 9999-12-31" (fresh for ever) on the dashboard and in `site readiness`, or
    # printed a time in its own offset, or none, labelled UTC
    # (tests/orchestrator/test_site_clock_attacks.py)
    body = body.model_copy(update={"checked_at": svc.settings.clock.now()})
    svc.store.set_readiness(site, body.model_dump_json())
    return Ack()


def sites_router() -> APIRouter:
    router = APIRouter()

    @router.get("/api/v1/agent/approvals", response_model=PendingSpecs, tags=["agent"])
    async def list_pending(svc: Svc, site: Site) -> PendingSpecs:
        """The study specs awaiting this site's data steward."""
        return pending_specs(svc, site)

    @router.post("/api/v1/agent/approvals", response_model=Ack, tags=["agent"])
    async def report_approval(svc: Svc, site: Site, body: ApprovalReport) -> Ack:
        """This site's steward approved or rejected a spec hash; studies waiting on it start or fail."""
        return await accept_approval(svc, site, body)

    @router.get("/api/v1/agent/probe/time", tags=["agent"])
    async def probe_time(svc: Svc, site: Site) -> dict[str, Any]:
        """The orchestrator's clock, for the site's skew check."""
        del site
        now: datetime = svc.settings.clock.now()
        return {"time": now.isoformat()}

    @router.get("/api/v1/agent/probe", tags=["agent"], response_class=Response)
    async def probe_download(
        svc: Svc, site: Site, size: Annotated[int, Query(ge=0, le=PROBE_MAX_BYTES)] = 10_000_000
    ) -> Response:
        """``size`` bytes of a fixed pattern, to time a download."""
        del svc, site
        whole, part = divmod(size, len(_PROBE_BLOCK))
        return Response(_PROBE_BLOCK * whole + _PROBE_BLOCK[:part], media_type="application/octet-stream")

    @router.post("/api/v1/agent/probe", response_model=ProbeEcho, tags=["agent"])
    async def probe_upload(svc: Svc, site: Site, request: Request) -> ProbeEcho:
        """Receive and discard a body, to time an upload.

        The gate admits it in the upload class (``--max-body-mb``); its own bound is checked from the
        declared length and as it streams, and nothing is kept, so a site cannot make the orchestrator hold
        more than a chunk of it (tests/orchestrator/test_security_doc_attacks.py)."""
        del svc, site
        too_large = ApiError(
            413, f"a probe is at most {PROBE_MAX_BYTES} bytes", headers={"Connection": "close"}
        )
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > PROBE_MAX_BYTES:
            raise too_large
        received = 0
        async for chunk in body_stream(request):
            received += len(chunk)
            if received > PROBE_MAX_BYTES:
                raise too_large
        return ProbeEcho(received_bytes=received)

    @router.post("/api/v1/agent/readiness", response_model=Ack, tags=["agent"])
    async def report_readiness(svc: Svc, site: Site, body: SiteReadiness) -> Ack:
        """A site's ``fedhealth site check`` figures (no data, paths or column names)."""
        return accept_readiness(svc, site, body)

    @router.get("/api/v1/sites/readiness", response_model=list[SiteReadinessInfo], tags=["operator"])
    async def list_readiness(svc: Svc, _: Reader) -> list[SiteReadinessInfo]:
        """Every site's latest readiness report."""
        return readiness_of_sites(svc)

    return router
