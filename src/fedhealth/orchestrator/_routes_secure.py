"""The agent's side of a secure round (SecAgg+): ``POST`` and ``GET /api/v1/agent/tasks/{id}/secagg/{stage}``.

The protocol is :class:`~fedhealth.orchestrator._secure.SecureRoundDriver`'s; handlers are plain functions
of the service that find the round's driver for a site's task and hand it the message, or wait for the
server's message to the site.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fastapi import APIRouter, Request, Response

from fedhealth.orchestrator._http import (
    SAFETENSORS,
    SAFETENSORS_BODY,
    ApiError,
    Recheck,
    Site,
    Svc,
    Wait,
    attestation_header,
    read_body,
)
from fedhealth.orchestrator._secure import SecureRoundDriver, SecureRoundGone
from fedhealth.orchestrator._service import OrchestratorService
from fedhealth.protocol import Ack, SiteAttestation
from fedhealth.secagg import Stage

log = logging.getLogger("fedhealth.orchestrator")


def secure_task(svc: OrchestratorService, site: str, task_id: str) -> SecureRoundDriver:
    """The driver of the secure round of this site's open task (403: another site's; 410: none runs).

    Answered from memory while the round runs: its driver was given its tasks when it started, and the
    engine takes a task out when it closes one, so the five messages a site sends per round read nothing from
    the database (that read was most of the orchestrator's work per message). Any other task is looked up.
    """
    held = svc.engine.secure.by_task(task_id)
    if held is not None:
        owner, driver = held
        if owner != site:
            raise ApiError(403, "this task belongs to another site")
        return driver
    task = svc.store.get_task(task_id)
    if task.site != site:
        raise ApiError(403, "this task belongs to another site")
    found = svc.engine.secure.get(task.round_id)
    if found is None or not task.is_open:
        raise ApiError(410, "no secure round is running for this task")
    return found


def accept_secagg_message(
    svc: OrchestratorService,
    site: str,
    task_id: str,
    stage: str,
    body: bytes,
    attestation: SiteAttestation | None,
) -> SecureRoundDriver:
    """Hand this site's message for ``stage`` to its round's driver; the driver, to wait for the answer on.

    The attestation is stored with the task when the round closes. 410: the site has no further part in the
    round (it was counted out, or the round ended).
    """
    driver = secure_task(svc, site, task_id)
    try:
        driver.receive(site, stage, body)
    except SecureRoundGone as exc:
        raise ApiError(410, "no longer part of this secure round", str(exc)) from exc
    if attestation is not None:
        driver.attestations[site] = attestation  # stored with the task when the round closes
    log.info("task %s: %s message received from %s", task_id, stage, site)
    return driver


async def secagg_message(
    svc: OrchestratorService,
    driver: SecureRoundDriver,
    site: str,
    stage: str,
    wait: float,
    recheck: Callable[[], object] | None = None,
) -> bytes | None:
    """The server's message to this site after ``stage`` closes; None if not within ``wait`` seconds.

    ``recheck`` (the caller's credentials, asked again) runs whenever the site is woken while it waits:
    revoking or re-keying a site wakes it, so its waiting poll is refused then (403 or 401) and is not
    handed the round's next message."""
    receive = asyncio.ensure_future(driver.next_message(site, stage, min(wait, svc.settings.max_wait_s)))
    try:
        while recheck is not None and not receive.done():
            waiter = svc.notifier.waiter(site)
            await asyncio.wait({receive, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not receive.done():
                recheck()
        return await receive
    except SecureRoundGone as exc:
        raise ApiError(410, "no longer part of this secure round", str(exc)) from exc
    finally:
        receive.cancel()


def _answer(data: bytes | None) -> Response:
    if data is None:
        return Response(status_code=204)
    return Response(data, media_type=SAFETENSORS)


def secure_router() -> APIRouter:
    router = APIRouter(tags=["agent"])

    @router.post(
        "/api/v1/agent/tasks/{task_id}/secagg/{stage}", response_model=Ack, openapi_extra=SAFETENSORS_BODY
    )
    async def secagg_send(
        svc: Svc,
        site: Site,
        task_id: str,
        stage: str,
        request: Request,
        recheck: Recheck,
        wait: Wait = 0.0,
    ) -> Ack | Response:
        """Send this site's SecAgg+ message for ``stage`` (advertise_keys, share_keys, masked_input,
        consistency, unmask).

        The site's attestation for the task rides along in the ``X-Fedhealth-Attestation`` header (base64
        of its JSON); it is stored with the task when the round closes. With ``wait`` > 0 (not for unmask)
        the answer is the server's message to this site after the stage closes, as ``GET`` of the same path
        would give it (204: not within ``wait`` seconds; the message sent is kept): one request per stage
        instead of two. 410 means this site has no further part in the round (it was counted out, or the
        round ended). A site revoked or re-keyed while it waits is refused then (403 or 401).
        """
        body = await read_body(request)
        attestation = attestation_header(request)
        driver = accept_secagg_message(svc, site, task_id, stage, body, attestation)
        if wait <= 0 or stage == Stage.UNMASK.value:
            return Ack()
        return _answer(await secagg_message(svc, driver, site, stage, wait, recheck))

    @router.get("/api/v1/agent/tasks/{task_id}/secagg/{stage}", response_class=Response)
    async def secagg_receive(
        svc: Svc,
        site: Site,
        task_id: str,
        stage: str,
        recheck: Recheck,
        wait: Wait = 25.0,
    ) -> Response:
        """Long-poll for the server's SecAgg+ message to this site after ``stage`` closes (204: not yet). A
        site revoked or re-keyed while its poll waits is refused then (403 or 401), not when it ends."""
        driver = secure_task(svc, site, task_id)
        return _answer(await secagg_message(svc, driver, site, stage, wait, recheck))

    return router
