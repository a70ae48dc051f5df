"""The agent's HTTP client for the orchestrator: retries with bounded exponential backoff and full jitter.

Connection errors and 5xx answers are retried (the orchestrator may be restarting); 4xx answers are final and
raised as :class:`OrchestratorRefused` with the orchestrator's message.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from fedhealth.core import FedHealthError, ServiceUnavailableError
from fedhealth.protocol import Ack, ResultManifest, Task, TaskFailure, TaskPoll

log = logging.getLogger("fedhealth.agent")
T = TypeVar("T")


class OrchestratorRefused(FedHealthError):
    """The orchestrator answered 4xx: the request will not succeed by retrying."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(f"{status} {error}" + (f": {detail}" if detail else ""))
        self.status = status
        self.error = error
        self.detail = detail


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    base_s: float = 0.2
    max_s: float = 10.0
    max_elapsed_s: float | None = None  # None: retry until stopped

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^attempt)]."""
        return rng.uniform(0, min(self.max_s, self.base_s * (2**attempt)))


class OrchestratorClient:
    def __init__(
        self,
        base_url: str,
        site: str,
        *,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        verify: Any = True,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.site = site
        self.retry = retry or RetryPolicy()
        self._rng = random.Random()
        self._should_stop = should_stop
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"X-Fedhealth-Site": site, "User-Agent": "fedhealth-agent"},
            timeout=httpx.Timeout(30.0, connect=5.0),
            transport=transport,
            verify=verify,
        )

    def close(self) -> None:
        self._http.close()

    def _call(
        self, what: str, send: Callable[[], httpx.Response], *, max_elapsed_s: float | None = None
    ) -> httpx.Response:
        started = time.monotonic()
        limit = max_elapsed_s if max_elapsed_s is not None else self.retry.max_elapsed_s
        attempt = 0
        while True:
            problem: str
            try:
                response = send()
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.status_code < 400:
                    return response
                if response.status_code < 500:
                    raise _refused(response)
                problem = f"HTTP {response.status_code}"
            if self._should_stop():
                raise ServiceUnavailableError(f"{what}: stopped while retrying ({problem})")
            if limit is not None and time.monotonic() - started > limit:
                raise ServiceUnavailableError(
                    f"{what}: orchestrator unreachable for {limit:.0f} s ({problem})"
                )
            delay = self.retry.delay(attempt, self._rng)
            log.warning("%s failed (%s); retrying in %.2f s", what, problem, delay)
            time.sleep(delay)
            attempt += 1

    def next_task(self, wait: float) -> Task | None:
        response = self._call(
            "polling for tasks",
            lambda: self._http.get(
                "/api/v1/agent/tasks/next",
                params={"wait": wait},
                timeout=httpx.Timeout(wait + 15, connect=5.0),
            ),
        )
        return TaskPoll.model_validate_json(response.content).task

    def get_model(self, digest: str, *, max_elapsed_s: float | None = None) -> bytes:
        return self._call(
            "downloading the model",
            lambda: self._http.get(f"/api/v1/agent/models/{digest}"),
            max_elapsed_s=max_elapsed_s,
        ).content

    def upload_result(self, task_id: str, body: bytes, *, max_elapsed_s: float | None = None) -> Ack:
        response = self._call(
            "uploading the update",
            lambda: self._http.post(
                f"/api/v1/agent/tasks/{task_id}/result",
                content=body,
                headers={"Content-Type": "application/octet-stream"},
            ),
            max_elapsed_s=max_elapsed_s,
        )
        return Ack.model_validate_json(response.content)

    def upload_evaluation(
        self, task_id: str, manifest: ResultManifest, *, max_elapsed_s: float | None = None
    ) -> Ack:
        response = self._call(
            "uploading the evaluation",
            lambda: self._http.post(
                f"/api/v1/agent/tasks/{task_id}/evaluation",
                content=manifest.model_dump_json(),
                headers={"Content-Type": "application/json"},
            ),
            max_elapsed_s=max_elapsed_s,
        )
        return Ack.model_validate_json(response.content)

    def report_failure(
        self, task_id: str, failure: TaskFailure, *, max_elapsed_s: float | None = None
    ) -> Ack:
        response = self._call(
            "reporting a failure",
            lambda: self._http.post(
                f"/api/v1/agent/tasks/{task_id}/failure",
                content=failure.model_dump_json(),
                headers={"Content-Type": "application/json"},
            ),
            max_elapsed_s=max_elapsed_s,
        )
        return Ack.model_validate_json(response.content)


def _refused(response: httpx.Response) -> OrchestratorRefused:
    try:
        body = response.json()
        return OrchestratorRefused(response.status_code, str(body.get("error")), body.get("detail"))
    except ValueError:
        return OrchestratorRefused(response.status_code, response.text[:500])
