"""The agent's tasks: the long poll (``GET /api/v1/agent/tasks/next``) and a task's outcome (a training
result, an evaluation, or the reason the site could not do it).

Handlers are plain functions of the service (``accept_result(svc, site, task_id, body) -> Ack``); the routes
parse, call them, and return their answer.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterable, Callable
from datetime import timedelta

import anyio
import numpy as np
from fastapi import APIRouter, Request
from pydantic import ValidationError

from fedhealth.core import TensorError
from fedhealth.orchestrator._blobs import BlobKind
from fedhealth.orchestrator._http import SAFETENSORS_BODY, ApiError, Recheck, Site, Svc, Wait, body_stream
from fedhealth.orchestrator._service import OrchestratorService
from fedhealth.orchestrator._store import RoundRow, TaskRow
from fedhealth.protocol import (
    Ack,
    ReleasedScaling,
    ResultManifest,
    Task,
    TaskFailure,
    TaskKind,
    TaskPoll,
    TaskStatus,
)
from fedhealth.runtime import (
    SCALING_ROUND,
    decode_update,
    federated_scaling_requested,
    param_specs,
    released_scaling,
)

log = logging.getLogger("fedhealth.orchestrator")
# Models up to this size travel inside their task (base64 in the JSON); larger ones are downloaded.
INLINE_MODEL_MAX_BYTES = 64 << 10
# An update holds the model's tensors plus a header and the result manifest; this bounds the latter two.
UPDATE_OVERHEAD_BYTES = 1 << 20


def task_message(svc: OrchestratorService, task: TaskRow, r: RoundRow) -> Task:
    """The task as its site receives it (before the observers decorate it)."""
    spec = svc.store.spec(task.study_id)
    small = svc.blobs.get_if_small(r.model_in_digest, INLINE_MODEL_MAX_BYTES)
    return Task(
        task_id=task.id,
        study_id=task.study_id,
        round=r.number,
        kind=task.kind,
        dataset=spec.dataset,
        recipe=spec.recipe,
        model_digest=r.model_in_digest,
        # a small model travels with its task: one request less per site and round
        model_inline=base64.b64encode(small).decode("ascii") if small is not None else None,
        seed=spec.seed,
        deadline=r.deadline_at,
        spec=spec,
        secure_round=driver.info() if (driver := svc.engine.secure.get(r.id)) is not None else None,
        collective=session.info() if (session := svc.engine.collective.get(r.id)) is not None else None,
        scaling=_released_scaling(svc, task.study_id, r),
    )


def _released_scaling(svc: OrchestratorService, study_id: str, r: RoundRow) -> ReleasedScaling | None:
    """What a ``standardize = "federated"`` study's pre-step (round 0) released, for every later task."""
    spec = svc.store.spec(study_id)
    if r.number == SCALING_ROUND or not federated_scaling_requested(spec.recipe):
        return None
    pre_step = next((x for x in svc.store.rounds_of(study_id) if x.number == SCALING_ROUND), None)
    return released_scaling(pre_step.metrics if pre_step is not None else None)


async def poll_task(
    svc: OrchestratorService, site: str, wait: float, recheck: Callable[[], object] | None = None
) -> TaskPoll:
    """This site's next task, as soon as one exists, or none after ``wait`` seconds. ``recheck`` (the
    caller's credentials, asked again) runs after every wake-up: revoking or re-keying a site wakes its
    waiting polls, which are then refused at once rather than answered when their wait ends."""
    now = svc.settings.clock.now()
    seen = svc.last_seen.get(site)
    if seen is None or now - seen > timedelta(seconds=5):
        svc.store.touch_site(site, now)
        svc.last_seen[site] = now
    loop = asyncio.get_running_loop()
    give_up = loop.time() + min(wait, svc.settings.max_wait_s)
    while True:
        waiter = svc.notifier.waiter(site)
        found = svc.store.next_task(site, skip=svc.engine.not_joinable)
        if found is not None:
            waiter.cancel()
            task, round_row = found
            if task.status is TaskStatus.PENDING:
                svc.store.mark_delivered(task.id, svc.settings.clock.now())
            message = task_message(svc, task, round_row)
            for observer in svc.engine.observers:
                message = observer.decorate_task(message)
            return TaskPoll(task=message)
        remaining = give_up - loop.time()
        if remaining <= 0 or svc.notifier.shutting_down:
            waiter.cancel()
            return TaskPoll(task=None)
        await asyncio.wait({waiter}, timeout=remaining)
        waiter.cancel()
        if recheck is not None:
            recheck()


def own_task(svc: OrchestratorService, site: str, task_id: str, kind: TaskKind) -> TaskRow:
    """The task, if it is this site's and of this kind (404, 403, 409 otherwise)."""
    task = svc.store.get_task(task_id)
    if task.site != site:
        raise ApiError(403, "this task belongs to another site")
    if task.kind is not kind:
        raise ApiError(409, f"task {task_id} is a {task.kind.value} task")
    return task


async def _reject(svc: OrchestratorService, task: TaskRow, message: str) -> ApiError:
    svc.store.close_task(task.id, TaskStatus.REJECTED, message, svc.settings.clock.now())
    log.warning("rejected the result of %s from %s: %s", task.id, task.site, message)
    await svc.engine.task_closed(task.round_id, task.id)
    return ApiError(422, "invalid update", message)


async def _chunks(body: bytes | AsyncIterable[bytes]) -> AsyncIterable[bytes]:
    if isinstance(body, bytes):
        yield body
    else:
        async for chunk in body:
            yield chunk


async def accept_result(
    svc: OrchestratorService, site: str, task_id: str, body: bytes | AsyncIterable[bytes]
) -> Ack:
    """Store a training result: ``body`` is the update as a safetensors file (whole, or as it arrives),
    the result manifest in its metadata.

    A retried upload of the same bytes is acknowledged once stored; different bytes for a finished task get
    409. An invalid update (malformed, wrong names/shapes/dtypes, NaN/Inf) closes the task as rejected and
    gets 422; the round goes on with the other sites.
    """
    task = own_task(svc, site, task_id, TaskKind.TRAIN)
    if not task.is_open and task.status is not TaskStatus.COMPLETED:
        raise ApiError(409, f"task is {task.status.value}: {task.reason}")
    spec = svc.store.spec(task.study_id)
    specs = param_specs(spec.recipe)
    # no update of this model can be larger: anything beyond is refused before it is stored
    limit = sum(s.numel * np.dtype(s.dtype).itemsize for s in specs) + UPDATE_OVERHEAD_BYTES
    writer = svc.blobs.writer(BlobKind.UPDATE)  # streamed to disk, not held in memory while it arrives
    try:
        async for chunk in _chunks(body):
            if writer.size + len(chunk) > limit:
                raise ApiError(
                    413,
                    f"an update of this study's model is at most {limit} bytes",
                    None,
                    {"Connection": "close"},
                )
            writer.write(chunk)
        digest = writer.digest
        task = svc.store.get_task(task_id)
        if task.status is TaskStatus.COMPLETED:
            if task.result_digest == digest:
                return Ack(detail="already stored")
            raise ApiError(409, "a different result was already stored for this task")
        if not task.is_open:
            raise ApiError(409, f"task is {task.status.value}: {task.reason}")
        data = await anyio.to_thread.run_sync(writer.read)
        try:
            _, manifest = await anyio.to_thread.run_sync(decode_update, data, specs)
        except TensorError as exc:
            raise await _reject(svc, task, str(exc)) from exc
        except ValidationError as exc:
            # the field's path too: "String should match pattern" alone left a site guessing which field
            # (tests/orchestrator/test_site_report_poisoning_attacks.py)
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            message = f"{where}: {first['msg']}" if where else first["msg"]
            raise await _reject(svc, task, f"malformed result manifest: {message}") from exc
        del data
        if manifest.task_id != task_id:
            raise await _reject(svc, task, "the result manifest names another task")
        if manifest.metrics is None:
            raise await _reject(svc, task, "the result manifest lacks the site's metrics")
        await anyio.to_thread.run_sync(writer.commit)
    finally:
        writer.discard()  # a no-op once committed
    stored = svc.store.complete_task(
        task_id,
        digest=digest,
        num_samples=manifest.metrics.num_samples,
        metrics=manifest.metrics,
        when=svc.settings.clock.now(),
        attestation=manifest.attestation,
    )
    if not stored:
        again = svc.store.get_task(task_id)
        if again.status is TaskStatus.COMPLETED and again.result_digest == digest:
            return Ack(detail="already stored")
        # Lost the race for this task: no task points to these bytes (an update's manifest names its task),
        # so they go, rather than stay on disk for good.
        await anyio.to_thread.run_sync(svc.blobs.remove_update, digest)
        raise ApiError(409, f"task is {again.status.value}: {again.reason}")
    await svc.engine.task_closed(task.round_id, task.id)
    return Ack()


async def accept_evaluation(svc: OrchestratorService, site: str, task_id: str, body: ResultManifest) -> Ack:
    """Store an evaluation task's metrics (a retry of the same metrics is acknowledged, others get 409)."""
    task = own_task(svc, site, task_id, TaskKind.EVALUATE)
    if body.task_id != task_id:
        raise ApiError(422, "the result manifest names another task")
    if body.metrics is None:
        raise ApiError(422, "an evaluation result needs metrics")
    if task.status is TaskStatus.COMPLETED:
        if task.metrics == body.metrics:
            return Ack(detail="already stored")
        raise ApiError(409, "a different result was already stored for this task")
    if not task.is_open:
        raise ApiError(409, f"task is {task.status.value}: {task.reason}")
    svc.store.complete_task(
        task_id,
        digest=None,
        num_samples=0,
        metrics=body.metrics,
        when=svc.settings.clock.now(),
        attestation=body.attestation,
    )
    await svc.engine.task_closed(task.round_id, task.id)
    return Ack()


async def accept_failure(svc: OrchestratorService, site: str, task_id: str, body: TaskFailure) -> Ack:
    """A site that cannot do a task says why; the task closes as failed (a closed task stays as it is)."""
    task = svc.store.get_task(task_id)
    if task.site != site:
        raise ApiError(403, "this task belongs to another site")
    if task.is_open:
        svc.store.close_task(
            task_id,
            TaskStatus.FAILED,
            f"{body.code}: {body.reason}",
            svc.settings.clock.now(),
            attestation=body.attestation,
        )
        log.warning("site %s could not do %s: %s: %s", site, task_id, body.code, body.reason)
        await svc.engine.task_closed(task.round_id, task.id)
    return Ack()


def tasks_router() -> APIRouter:
    router = APIRouter(tags=["agent"])

    @router.get("/api/v1/agent/tasks/next", response_model=TaskPoll)
    async def next_task(svc: Svc, site: Site, recheck: Recheck, wait: Wait = 25.0) -> TaskPoll:
        """Long-poll: answers as soon as a task for this site exists, or after ``wait`` seconds with none.
        A site revoked or re-keyed while its poll waits is refused then (403 or 401), not when it ends."""
        return await poll_task(svc, site, wait, recheck)

    @router.post("/api/v1/agent/tasks/{task_id}/result", response_model=Ack, openapi_extra=SAFETENSORS_BODY)
    async def upload_result(svc: Svc, site: Site, task_id: str, request: Request) -> Ack:
        """Upload a training result: the update as a safetensors file, the result manifest in its metadata.

        A retried upload of the same bytes is acknowledged once stored; different bytes for a finished task
        get 409. An invalid update (malformed, wrong names/shapes/dtypes, NaN/Inf) closes the task as rejected
        and gets 422; the round goes on with the other sites.
        """
        return await accept_result(svc, site, task_id, body_stream(request))

    @router.post("/api/v1/agent/tasks/{task_id}/evaluation", response_model=Ack)
    async def upload_evaluation(svc: Svc, site: Site, task_id: str, body: ResultManifest) -> Ack:
        return await accept_evaluation(svc, site, task_id, body)

    @router.post("/api/v1/agent/tasks/{task_id}/failure", response_model=Ack)
    async def report_failure(svc: Svc, site: Site, task_id: str, body: TaskFailure) -> Ack:
        """A site that cannot do a task says why; the round goes on without it."""
        return await accept_failure(svc, site, task_id, body)

    return router
