"""Request limits: body size (413) and per-caller request rate (429)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per key: ``rate`` requests per second on average, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def retry_after(self, key: str) -> float | None:
        """Take one token for ``key``; None if allowed, else the seconds until one is available."""
        if self.rate <= 0:
            return None
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(tokens=float(self.burst), updated=now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / self.rate


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, whether or not they declare a Content-Length."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(send, int(value))
                return
        received = 0

        async def limited_receive() -> Any:
            # Raised inside the route, where the app's exception handlers turn it into a 413 answer.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, f"request body exceeds the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send: Callable[..., Any], declared: int | None) -> None:
        size = f"of {declared} bytes " if declared is not None else ""
        body = json.dumps(
            {"error": f"request body {size}exceeds the limit of {self.max_bytes} bytes", "detail": None}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class EnrollmentPortMiddleware:
    """On the enrollment listener (no client certificates under mutual TLS), serve enrollment and health only:
    a site without a certificate yet can enroll there, and nothing else is reachable without one."""

    ALLOWED = ("/api/v1/enroll", "/healthz")

    def __init__(self, app: Any, port: int) -> None:
        self.app = app
        self.port = port

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        server = scope.get("server")
        if (
            scope["type"] == "http"
            and server is not None
            and server[1] == self.port
            and scope["path"] not in self.ALLOWED
        ):
            body = json.dumps({"error": "only enrollment is served on this port", "detail": None}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def ceil_seconds(value: float) -> str:
    return str(max(1, math.ceil(value)))
