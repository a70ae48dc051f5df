"""Model downloads from the blob store: a task's input model for its site
(``GET /api/v1/agent/models/{sha}``), and released models for the operator
(``GET /api/v1/studies/{id}/model``, ``GET /api/v1/models/{sha}``).

Nothing else the blob store holds (sites' updates, secure-aggregation messages) is served. Handlers are plain
functions of the service that decide who may read which digest; the routes send the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Response

from fedhealth.orchestrator._auth import Forbidden, Principal
from fedhealth.orchestrator._blobs import check_digest
from fedhealth.orchestrator._http import SAFETENSORS, ApiError, Researcher, Site, Svc
from fedhealth.orchestrator._service import OrchestratorService
from fedhealth.orchestrator._store import ModelVersion, StudyRow
from fedhealth.protocol import Role


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelFile:
    """A model's safetensors bytes and their digest."""

    digest: str
    data: bytes


def owner_or_admin(who: Principal, study: StudyRow, what: str) -> None:
    """Only the study's owner or an admin may ``what`` (403 otherwise)."""
    if who.role is not Role.ADMIN and study.spec.owner != who.name:
        raise Forbidden(f"only the study's owner ({study.spec.owner}) or an admin may {what}")


def task_model(svc: OrchestratorService, site: str, digest: str) -> bytes:
    """The input model of one of this site's open tasks. Any other digest (another site's upload, the model
    of a task this site was not given, nothing at all) gets the same 404."""
    check_digest(digest)
    if not svc.store.site_may_read_model(site, digest):
        raise ApiError(404, "no model with this digest belongs to a task of this site")
    return svc.blobs.get(digest)


def _file(svc: OrchestratorService, version: ModelVersion) -> ModelFile:
    return ModelFile(digest=version.digest, data=svc.blobs.get(version.digest))


def study_model(svc: OrchestratorService, who: Principal, study_id: str) -> ModelFile:
    """The study's latest released model (its owner or an admin only); 404 until a round released one."""
    study = svc.store.get_study(study_id)
    owner_or_admin(who, study, "download its model")
    version = svc.store.model_version(study.model_digest)
    if version is None or study.completed_rounds == 0:
        raise ApiError(404, "no model of this study has been released yet")
    return _file(svc, version)


def released_model(svc: OrchestratorService, who: Principal, digest: str) -> ModelFile:
    """A released model version by its digest: admins any, researchers those of their own studies."""
    check_digest(digest)
    version = svc.store.model_version(digest)
    if version is None:
        raise ApiError(404, "no released model has this digest")
    owner_or_admin(who, svc.store.get_study(version.study_id), "download its models")
    return _file(svc, version)


def _model_response(model: ModelFile) -> Response:
    return Response(model.data, media_type=SAFETENSORS, headers={"X-Fedhealth-Model-Digest": model.digest})


def models_router() -> APIRouter:
    router = APIRouter()

    @router.get("/api/v1/agent/models/{digest}", tags=["agent"], response_class=Response)
    async def get_model(svc: Svc, site: Site, digest: str) -> Response:
        """The input model of one of this site's open tasks. Any other digest (another site's upload, the
        model of a task this site was not given, nothing at all) gets the same 404."""
        return Response(task_model(svc, site, digest), media_type=SAFETENSORS)

    @router.get("/api/v1/studies/{study_id}/model", tags=["operator"], response_class=Response)
    async def get_study_model(svc: Svc, who: Researcher, study_id: str) -> Response:
        """The study's latest released model (safetensors): its owner or an admin only. 404 until a round
        has released one."""
        return _model_response(study_model(svc, who, study_id))

    @router.get("/api/v1/models/{digest}", tags=["operator"], response_class=Response)
    async def get_released_model(svc: Svc, who: Researcher, digest: str) -> Response:
        """A released model version by its digest (any round's, as the provenance lists them): admins any,
        researchers those of their own studies. Nothing else the orchestrator stores is served here."""
        return _model_response(released_model(svc, who, digest))

    return router
