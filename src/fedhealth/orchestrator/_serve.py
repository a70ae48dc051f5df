"""Running the orchestrator under uvicorn: HTTPS with the federation's certificate, optionally mutual TLS."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

from fedhealth.core import ConfigError, keep_malloc_heaps, write_private_file
from fedhealth.orchestrator._app import create_app
from fedhealth.orchestrator._db import lock_orchestrator, make_engine, upgrade_database
from fedhealth.orchestrator._extensions import default_extensions
from fedhealth.orchestrator._service import Extension, OrchestratorSettings

log = logging.getLogger("fedhealth.orchestrator")


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path
    require_client_cert: bool = False  # mutual TLS: clients must present a certificate from the federation CA


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Listening from here on: the ready file is written during the app's start-up, before uvicorn listens,
    # and a client that read it got "connection refused" until then; now it waits in the backlog instead.
    sock.listen(2048)
    return sock


def _url(scheme: str, host: str, sock: socket.socket) -> str:
    url_host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{url_host}:{sock.getsockname()[1]}"


def serve(
    settings: OrchestratorSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8443,
    tls: TlsFiles | None,
    enroll_port: int | None = None,
    ready_file: Path | None = None,
    log_level: str = "info",
    extensions: Sequence[Extension] | None = None,
) -> None:
    """Serve until interrupted. ``tls=None`` serves plain HTTP (only with an explicit ``--insecure``).

    With ``port=0`` the OS picks a free port; ``ready_file`` receives ``{"url": ..., "pid": ...}`` once the
    service accepts requests (for supervisors and tests). ``enroll_port`` opens a second HTTPS listener that
    asks for no client certificate and serves enrollment only: under mutual TLS it is how a new site gets
    its certificate.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.lock is not None:  # the caller holds it
        _serve(settings, host, port, tls, enroll_port, ready_file, log_level, extensions)
        return
    # Refused here, before anything listens, as one error the CLI prints as one line: in the app's lifespan
    # a refusal is uvicorn's traceback. The lock is held until the server stops; the lifespan's
    # start_service finds it in the settings.
    settings.lock = lock_orchestrator(
        settings.state_dir, settings.resolved_database_url, wait_s=settings.lock_wait_s
    )
    try:
        database = make_engine(settings.resolved_database_url, fsync=settings.fsync)
        try:  # likewise a database a newer release migrated, or a migration that fails
            upgrade_database(database)
        finally:
            database.dispose()
        _serve(settings, host, port, tls, enroll_port, ready_file, log_level, extensions)
    finally:
        settings.lock.release()
        settings.lock = None


def _serve(
    settings: OrchestratorSettings,
    host: str,
    port: int,
    tls: TlsFiles | None,
    enroll_port: int | None,
    ready_file: Path | None,
    log_level: str,
    extensions: Sequence[Extension] | None,
) -> None:
    scheme = "https" if tls else "http"
    sock = _bind(host, port)
    url = _url(scheme, host, sock)
    enroll_sock = _bind(host, enroll_port) if enroll_port is not None else None
    enroll_url = _url(scheme, host, enroll_sock) if enroll_sock is not None else None
    if enroll_sock is not None:
        settings.enroll_port = enroll_sock.getsockname()[1]
    settings.require_client_cert = bool(tls and tls.require_client_cert)
    if tls is None:
        log.warning("serving PLAIN HTTP (--insecure): tokens and model updates cross the network unencrypted")

    def _announce() -> None:  # called after the lifespan's recovery: the service is ready
        # What start-up built (the app, its routes and schemas, the modules) lives as long as the process:
        # out of the collector's way, a full collection walks only what requests create (gc.freeze's doc).
        gc.freeze()
        keep_malloc_heaps()  # the relay's per-call bodies and sums reuse heap pages (fedhealth.core._malloc)
        log.info("orchestrator listening on %s", url)
        if enroll_url is not None:
            log.info("enrollment listener on %s", enroll_url)
        if ready_file is not None:
            ready = {"url": url, "enroll_url": enroll_url, "pid": os.getpid()}
            write_private_file(ready_file, json.dumps(ready).encode())

    app = create_app(
        settings, on_ready=_announce, extensions=default_extensions() if extensions is None else extensions
    )

    def config(require_client_cert: bool, lifespan: str) -> uvicorn.Config:
        options: dict[str, object] = {}
        if tls is not None:
            options = {
                "ssl_certfile": str(tls.cert),
                "ssl_keyfile": str(tls.key),
                "ssl_ca_certs": str(tls.ca),
                "ssl_cert_reqs": ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE,
            }
            options["http"] = _PeerCertificateProtocol if require_client_cert else _CoalescingProtocol
        return uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=5,
            lifespan=lifespan,  # type: ignore[arg-type]
            **options,  # type: ignore[arg-type]
        )

    main = _Server(config(bool(tls and tls.require_client_cert), "on"))
    lost: list[str] = []

    def _lock_lost(reason: str) -> None:  # another orchestrator took the database (the service said why)
        lost.append(reason)
        main.stop()

    settings.on_lock_lost = _lock_lost
    try:
        if enroll_sock is None:
            main.run(sockets=[sock])
        else:
            enroll = _Server(config(False, "off"))
            main.peers = [enroll]
            enroll.peers = [main]

            async def both() -> None:
                await asyncio.gather(main.serve(sockets=[sock]), enroll.serve(sockets=[enroll_sock]))

            # the loop uvicorn's own run() would take (uvloop when installed), not asyncio's default
            with asyncio.Runner(loop_factory=main.config.get_loop_factory()) as runner:
                runner.run(both())
    finally:
        settings.on_lock_lost = None
    if lost:  # one line from the CLI, and a failed exit for the supervisor
        raise ConfigError(lost[0])


class _Server(uvicorn.Server):
    peers: list[_Server]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._end_long_polls()
        super().handle_exit(sig, frame)
        for peer in getattr(self, "peers", []):  # a second listener stops with the first
            peer.should_exit = True

    def stop(self) -> None:
        """What a signal does, without one (uvicorn raises the signals it caught again once it stopped)."""
        self._end_long_polls()
        self.should_exit = True
        for peer in getattr(self, "peers", []):
            peer.should_exit = True

    def _end_long_polls(self) -> None:
        # Long polls would otherwise hold the graceful shutdown for up to their full wait.
        state = getattr(self.config.app, "state", None)
        shutdown = getattr(state, "shutdown", None)
        if shutdown is not None:
            shutdown()


def _with_client_certificate(app: Any, pem: str) -> Any:
    """The ASGI app with the connection's client certificate in each request's scope, as the ASGI TLS
    extension names it (``extensions.tls.client_cert_chain``)."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            extensions = dict(scope.get("extensions") or {})
            extensions["tls"] = {**extensions.get("tls", {}), "client_cert_chain": [pem]}
            scope = {**scope, "extensions": extensions}
        await app(scope, receive, send)

    return wrapped


class _CoalescedWrites:
    """A connection's transport as the HTTP protocol writes to it: the writes of one event-loop turn go out
    as one (uvicorn writes a response's head and its body separately, and on TLS each write is a record and
    a send: for the small answers of a collective session the head's own record and syscall were a quarter
    of the orchestrator's time). Large writes are not joined (that would copy them); they go out at once,
    after what is pending, so the order is kept."""

    JOIN_LIMIT = 256 << 10

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._size + len(data) > self.JOIN_LIMIT:
            self.flush()
            self._transport.write(data)
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(bytes(data))
        self._size += len(data)

    def flush(self) -> None:
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending, self._size = [], 0
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _CoalescingProtocol(AutoHTTPProtocol):  # type: ignore[valid-type,misc]
    """uvicorn's HTTP protocol writing through :class:`_CoalescedWrites`, and reading a body with two copies
    fewer (:meth:`on_body`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self.transport = _CoalescedWrites(transport)

    def on_body(self, body: bytes) -> None:
        """A piece of the request's body, from the HTTP parser (httptools; h11 does not call this).

        uvicorn appends every piece to a bytearray and hands the app ``bytes()`` of it: two copies of each
        byte, a tenth of the orchestrator's time for the megabytes of a collective call. A piece that
        arrives while nothing is waiting is kept as it is (``bytes()`` of bytes is the same object); only
        pieces that pile up before the app reads them are joined, as uvicorn does. Otherwise the same as
        uvicorn's ``on_body``: a body past the high-water mark pauses reading until the app takes it."""
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        if not cycle.body:
            cycle.body = body
        else:
            if type(cycle.body) is bytes:
                cycle.body = bytearray(cycle.body)
            cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()


class _PeerCertificateProtocol(_CoalescingProtocol):
    """uvicorn's HTTP protocol, telling the app which certificate the client presented (uvicorn does not):
    mutual TLS then checks who holds it against the store on every request, so a revoked or rotated
    site's certificate is refused at once although the CA still vouches for it."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            # uvicorn's protocols keep the app per connection, so this connection's requests carry its cert
            self.app = _with_client_certificate(self.app, ssl.DER_cert_to_PEM_cert(der))  # type: ignore[has-type]
