"""A deadline for a whole answer, kept by every socket operation of an httpx client's connections."""

from __future__ import annotations

import socket
import ssl
import time
import typing
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import httpcore
import httpx

# the time.monotonic() at which the current thread's request must be answered in full (None: no deadline)
_DEADLINE: ContextVar[float | None] = ContextVar("fedhealth_answer_deadline", default=None)
_LATE = "the answer was still arriving at its deadline"


@contextmanager
def answer_deadline(at: float | None) -> Iterator[None]:
    """Within this block, requests through a :class:`DeadlineTransport` in this thread (or task) end at
    ``at`` (a ``time.monotonic()`` value) however the server paces its bytes: connecting, the TLS
    handshake, sending the request and reading every byte of the answer, its headers included."""
    token = _DEADLINE.set(at)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _bounded(timeout: float | None, late: type[Exception]) -> float | None:
    """``timeout`` (httpx's, per operation) shortened to what is left before the deadline; ``late`` once
    none is left."""
    at = _DEADLINE.get()
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise late(_LATE)
    return left if timeout is None else min(timeout, left)


def _passed() -> bool:
    at = _DEADLINE.get()
    return at is not None and time.monotonic() >= at


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return self._inner.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))
        except httpcore.ReadTimeout as exc:  # the socket's own "timed out": say which bound ended it
            if _passed():
                raise httpcore.ReadTimeout(_LATE) from exc
            raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # One write may be a whole request body. A TLS socket's send writes all of it within one timeout,
        # but a plain socket's returns once a little is taken, and the inner stream sends the rest with the
        # same timeout again: a server taking a few KiB now and then held the upload for ever. Here each
        # send of a plain socket gets what is left of the deadline.
        sock = self._inner.get_extra_info("socket")
        if _DEADLINE.get() is None or isinstance(sock, ssl.SSLSocket) or not isinstance(sock, socket.socket):
            self._inner.write(buffer, _bounded(timeout, httpcore.WriteTimeout))
            return
        view = memoryview(buffer)
        try:
            while view:
                sock.settimeout(_bounded(timeout, httpcore.WriteTimeout))
                view = view[sock.send(view) :]
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(_LATE if _passed() else str(exc)) from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, bounded))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_tcp(host, port, bounded, local_address, socket_options))

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, bounded, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class DeadlineTransport(httpx.HTTPTransport):
    """httpx's HTTP/1.1 transport, with the answer deadline kept by its sockets and no environment proxies.

    httpx offers no way to hand its transport a network backend, so the connection pool is built again
    here with the same settings and ours (httpcore's public ``network_backend`` seam); the versions are
    pinned in constraints.txt and ``tests/agent/test_agent_transport_attacks.py`` checks the deadline over
    a real socket.
    """

    def __init__(self, *, verify: ssl.SSLContext | bool, limits: httpx.Limits | None = None) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        super().__init__(verify=verify, trust_env=False, limits=limits)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_DeadlineBackend(),
        )
