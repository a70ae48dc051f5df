"""The operator's studies: submit, list, read, cancel, and the study report (``/api/v1/studies...``).

Handlers are plain functions of the service and the calling principal; the routes parse, call them, and
return their answer.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi import APIRouter

from fedhealth.core import InputError, NotFoundError
from fedhealth.governance import AuditEventType
from fedhealth.orchestrator._auth import Principal
from fedhealth.orchestrator._http import ApiError, ApprovalWait, Reader, Researcher, Svc
from fedhealth.orchestrator._report import build_report, study_info
from fedhealth.orchestrator._routes_models import owner_or_admin
from fedhealth.orchestrator._service import OrchestratorService
from fedhealth.protocol import StudyInfo, StudySpec, StudyStatus

log = logging.getLogger("fedhealth.orchestrator")


async def submit_study(
    svc: OrchestratorService, owner: Principal, body: StudySpec, approval_wait_s: float | None = None
) -> StudyInfo:
    """Store a study the submitting user owns; it runs once every site it names approved its spec hash."""
    if body.owner != owner.name:
        raise ApiError(422, "invalid study", f"the spec's owner must be the submitting user ({owner.name!r})")
    try:
        study = await svc.engine.create_study(body, owner.name, approval_wait_s=approval_wait_s)
    except (NotFoundError, InputError) as exc:  # unknown or revoked sites: a malformed study
        raise ApiError(422, "invalid study", str(exc)) from exc
    return study_info(svc.store, study.id)


def studies(svc: OrchestratorService, status: StudyStatus | None = None) -> list[StudyInfo]:
    return [study_info(svc.store, s.id, with_rounds=False) for s in svc.store.list_studies(status)]


async def cancel(svc: OrchestratorService, who: Principal, study_id: str) -> StudyInfo:
    """Cancel a running or waiting study: its owner or an admin only (409 once it ended)."""
    study = svc.store.get_study(study_id)
    owner_or_admin(who, study, "cancel it")
    if study.status not in (StudyStatus.RUNNING, StudyStatus.AWAITING_APPROVAL):
        raise ApiError(409, f"study is {study.status.value}")
    reason = f"cancelled by {who.name}"
    await svc.engine.cancel_study(study_id, reason)
    after = svc.store.get_study(study_id)
    if after.status is not StudyStatus.CANCELLED or after.reason != reason:
        raise ApiError(409, f"study is {after.status.value}")  # it ended otherwise meanwhile
    # The engine committed the cancellation; its entry follows (as the observers' entries follow the
    # changes they record).
    svc.record(
        who,
        AuditEventType.STUDY_CANCELLED,
        {"study_id": study_id, "study": study.name, "owner": study.spec.owner, "reason": reason},
    )
    log.warning("study %s cancelled by %s", study_id, who.name)
    return study_info(svc.store, study_id)


def studies_router() -> APIRouter:
    router = APIRouter(tags=["operator"])

    @router.post("/api/v1/studies", response_model=StudyInfo, status_code=201)
    async def create_study(
        svc: Svc, owner: Researcher, body: StudySpec, approval_wait_s: ApprovalWait = None
    ) -> StudyInfo:
        return await submit_study(svc, owner, body, approval_wait_s)

    @router.get("/api/v1/studies", response_model=list[StudyInfo])
    async def list_studies(svc: Svc, _: Reader, status: StudyStatus | None = None) -> list[StudyInfo]:
        return studies(svc, status)

    @router.get("/api/v1/studies/{study_id}", response_model=StudyInfo)
    async def get_study(svc: Svc, _: Reader, study_id: str) -> StudyInfo:
        return study_info(svc.store, study_id)

    @router.post("/api/v1/studies/{study_id}/cancel", response_model=StudyInfo)
    async def cancel_study(svc: Svc, who: Researcher, study_id: str) -> StudyInfo:
        """Cancel a running study: its owner or an admin only."""
        return await cancel(svc, who, study_id)

    @router.get("/api/v1/studies/{study_id}/report")
    async def get_study_report(svc: Svc, _: Reader, study_id: str) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(build_report, svc.store, study_id)

    return router
