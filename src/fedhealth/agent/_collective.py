"""The site side of a collective session: check the session against the approved spec, then run the
recipe's site program with :class:`HttpCollectives`, the session's collectives over the agent's connection.

The protocol is ``fedhealth.secagg``'s :class:`CollectiveSite` (masks, signatures, the closing check); this
module carries its bytes and holds the site's checks against a malicious orchestrator:

- **The session is the approved one.** Before any key is advertised or any data read, the site checks that
  the session's participants are exactly the spec's sites (:func:`~fedhealth.protocol.collective_plan`:
  its training sites; at least 3, and at least 2 outside the spec's collusion bound), that every peer key the
  orchestrator hands out hashes to the spec's fingerprint for that site, and that no pinned key changed
  (``peers.json``, shared with secure rounds). The session's keys bind the study, round, attempt and the
  approved spec's hash.
- **Nothing in clear.** Every sum is masked before it leaves the site; broadcasts are the leader's (signed)
  and public by design.
- **Equivocation is caught.** The closing call checks that every site was sent the same results; a mismatch
  (or a forged broadcast, or a bad key) stops the session at this site with ``collective_refused``.

Transport: one ``POST .../collective/{index}?wait=S`` per collective on the agent's keep-alive connection
(raw bytes, no JSON), answered with the result; if the result is not ready within ``S`` the site long-polls
with ``GET``. A transport retry re-sends the same bytes (the relay counts a call once).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import math
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pydantic_core

import fedhealth
from fedhealth.agent._client import OrchestratorClient, OrchestratorRefused, TlsVerificationError
from fedhealth.agent._pipeline import TaskRefused
from fedhealth.agent._secure import PeerPins, bounded_deadline
from fedhealth.core import ConfigError, ServiceUnavailableError
from fedhealth.crypto import IdentityKey, PublicIdentity
from fedhealth.governance import spec_hash
from fedhealth.learning import SessionMember
from fedhealth.protocol import (
    ATTESTATION_HEADER,
    SESSION_HEADER,
    FailureCode,
    SiteAttestation,
    Task,
    TaskKind,
    collective_plan,
    version_headers,
)
from fedhealth.secagg import (
    CollectiveConfig,
    CollectiveSite,
    KeyReuseGuard,
    SessionFailedError,
    SessionFailure,
)

log = logging.getLogger("fedhealth.agent")


@dataclass(frozen=True, slots=True)
class CheckedSession:
    """A collective session that passed the site's checks: its configuration and the peers' identities."""

    config: CollectiveConfig
    peers: dict[str, PublicIdentity]


def _mismatch(what: str) -> TaskRefused:
    return TaskRefused(
        FailureCode.SECURE_ROUND_MISMATCH.value,
        f"the collective session's {what} differs from what the approved study spec prescribes; "
        "refusing the session",
    )


def check_collective_session(task: Task, site: str, identity: IdentityKey, pins: PeerPins) -> CheckedSession:
    """The site's checks of a collective task's session against the approved spec, before any key is
    advertised or any data read. Raises :class:`TaskRefused`."""
    if task.kind is not TaskKind.COLLECTIVE:
        raise _mismatch("task kind")
    info = task.collective
    if info is None:
        raise TaskRefused(
            FailureCode.SECURE_ROUND_MISSING.value,
            "the task is a collective session but came without the session's set-up; this site sends "
            "nothing in clear for it",
        )
    try:
        plan = collective_plan(task.spec)
    except ValueError:
        raise _mismatch("existence (the spec cannot hold a collective session)") from None
    if tuple(info.sites) != plan.sites or site not in plan.sites:
        raise _mismatch("participant list")
    if set(info.peer_keys) != set(plan.sites):
        raise _mismatch("peer key list")
    if plan.site_keys[site] != identity.public().fingerprint:
        raise TaskRefused(
            FailureCode.PEER_KEY_MISMATCH.value,
            "the approved spec names another identity key for this site; refusing the session",
        )
    pins.check(info.peer_keys, plan.site_keys)
    try:
        config = CollectiveConfig(
            study_id=task.study_id,
            round=task.round,
            attempt=info.attempt,
            spec_hash=spec_hash(task.spec.model_dump(mode="json")),
            sites=plan.sites,
            collusion=plan.collusion,
        )
    except ValueError:  # ConfigError: e.g. a study id or attempt the session cannot bind
        raise _mismatch("configuration") from None
    peers = {s: PublicIdentity(bytes.fromhex(k)) for s, k in info.peer_keys.items()}
    return CheckedSession(config=config, peers=peers)


# The most one answer of the relay may hold: a sum is the size of what the site sent, a broadcast the leader's
# payload (the released model); far below this. An error answer is a line of JSON.
MAX_RESULT_BYTES = 256 << 20
MAX_ERROR_BYTES = 64 << 10


class _CallWatch:
    """Ends a call whose answer is still arriving when it is due. ``http.client`` bounds each read of the
    socket only, so a relay sending a byte of its status line, headers or body now and then would hold the
    site for as long as it liked. One thread per channel, started with its first call and waking once a
    second; a call itself only sets two attributes (nothing on the path a collective's milliseconds take)."""

    TICK_S = 1.0

    def __init__(self) -> None:
        self.due = math.inf  # time.monotonic() by which the call in progress must be answered whole
        self.cut = False  # whether the watch ended the last call
        self._sock: socket.socket | None = None
        self._ended = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, due: float) -> None:
        self.cut = False
        self._sock = sock
        self.due = due
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="collective-call-watch", daemon=True)
            self._thread.start()

    def done(self) -> None:
        self.due = math.inf

    def end(self) -> None:
        self._ended.set()

    def _run(self) -> None:
        while not self._ended.wait(self.TICK_S):
            sock = self._sock
            if sock is not None and time.monotonic() > self.due:
                self.due = math.inf
                self.cut = True
                # the plain socket's shutdown (not SSLSocket's, which drops its TLS object under the reader):
                # the blocked read returns and the call fails as a broken connection, then is retried
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


class SessionChannel:
    """One keep-alive connection for a session's calls.

    It is ``http.client`` rather than the agent's httpx client: a collective is meant to cost milliseconds,
    and httpx's per-request work was a third of a small call's. The connection uses the agent client's
    TLS context (pinned to the federation CA, with its client certificate under mutual TLS), its token (a
    401 logs in again once) and its retry policy (connection errors, 429 and 5xx are retried with backoff
    until the deadline; the relay counts a re-sent call once). Results are read into one reused buffer: a
    returned view is valid until the next call.
    """

    def __init__(self, client: OrchestratorClient, *, task_id: str, attempt: str) -> None:
        url = urlsplit(client.base_url)
        self._client = client
        self._context = client.tls_context()
        self._host = url.hostname or "localhost"
        self._port = url.port or (443 if self._context is not None else 80)
        self._prefix = f"{url.path.rstrip('/')}/api/v1/agent/tasks/{task_id}/collective/"
        self._attempt = attempt
        # what every agent request states (its protocol range and release), and the session's attempt
        self._fixed_headers = {**version_headers(fedhealth.__version__), SESSION_HEADER: attempt}
        self._connection: http.client.HTTPConnection | None = None
        self._buffer = bytearray()
        self._watch = _CallWatch()

    def close(self) -> None:
        """Close the connection and end the watch (the session is over)."""
        self._watch.end()
        self._drop()

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._connection is None:
            if self._context is not None:
                self._connection = http.client.HTTPSConnection(
                    self._host, self._port, timeout=timeout, context=self._context
                )
            else:
                self._connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        elif self._connection.sock is not None:
            self._connection.sock.settimeout(timeout)
        else:
            self._connection.timeout = timeout
        return self._connection

    def call(
        self,
        index: int,
        body: bytes | memoryview | None,
        *,
        wait: float,
        deadline: float,
        headers: dict[str, str] | None = None,
    ) -> memoryview | None:
        """Send call ``index`` (``body``; None long-polls for its result) and return its result, or None if
        it is not ready within ``wait`` seconds. ``deadline`` is a ``time.monotonic()`` value."""
        path = f"{self._prefix}{index}?wait={wait:.3f}"
        sent = {**self._fixed_headers, **(headers or {})}
        if body is not None:
            sent["Content-Type"] = "application/octet-stream"
            sent["Content-Length"] = str(len(body))
        method = "GET" if body is None else "POST"
        try:
            return self._call(index, method, path, body, sent, wait, deadline)
        finally:
            self._watch.done()

    def _call(
        self,
        index: int,
        method: str,
        path: str,
        body: bytes | memoryview | None,
        sent: dict[str, str],
        wait: float,
        deadline: float,
    ) -> memoryview | None:
        attempt, renewed = 0, False
        while True:
            retry_after: float | None = None
            try:
                connection = self._connect(wait + 15)
                if connection.sock is None:
                    connection.connect()
                # the whole answer is due by the call's wait and a margin, and never after the deadline
                self._watch.watch(connection.sock, min(time.monotonic() + wait + 15, deadline))
                connection.request(method, path, body=body, headers={**sent, **self._client.auth_headers()})
                response = connection.getresponse()
                result = self._read(response) if response.status == 200 else None
                data = b"" if result is not None else response.read(MAX_ERROR_BYTES)
                if self._watch.cut:  # what arrived before the cut is no answer (its end ended the headers)
                    raise ConnectionAbortedError("cut off when due")
                if result is not None:
                    return result
            except ssl.SSLCertVerificationError as exc:
                raise TlsVerificationError(
                    f"TLS verification failed: the orchestrator's certificate is not trusted by the pinned "
                    f"federation CA ({exc.verify_message or exc.reason})"
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                if self._watch.cut:
                    problem = "the answer was still arriving when it was due"
                else:
                    problem = f"{type(exc).__name__}: {exc}"
            except OrchestratorRefused as exc:  # from logging in again
                if exc.status != 429 and exc.status < 500:
                    raise
                problem = f"login: HTTP {exc.status}"
            else:
                status = response.status
                if status == 204:
                    return None
                if status == 401 and not renewed:
                    self._client.forget_token()
                    renewed = True
                    continue
                error, detail = _error_of(data)
                if status == 410:
                    raise SessionFailedError(SessionFailure.ABORTED, str(detail or error))
                if status == 429:  # the pause it asks for, within the client's policy (never 0, never days)
                    retry_after = self._client.rate_limit_backoff(
                        attempt, response.getheader("retry-after", "")
                    )
                elif status < 500:
                    raise OrchestratorRefused(status, error, detail)
                problem = f"HTTP {status}"
            if self._client.should_stop:
                raise ServiceUnavailableError(f"collective call {index}: stopped while retrying ({problem})")
            delay = retry_after if retry_after is not None else self._client.backoff(attempt)
            if time.monotonic() + delay > deadline:
                raise ServiceUnavailableError(f"collective call {index}: gave up at the deadline ({problem})")
            log.warning("collective call %d failed (%s); retrying in %.2f s", index, problem, delay)
            time.sleep(delay)
            attempt += 1

    def _read(self, response: http.client.HTTPResponse) -> memoryview:
        """The answer's body, never more than :data:`MAX_RESULT_BYTES` (declared or sent): a lying relay
        would otherwise have the site allocate whatever length it declares, or read for ever."""
        declared = response.getheader("content-length") or ""
        # ASCII digits only: "²" passes str.isdigit() (http.client reads headers as latin-1), and int() raised
        # ValueError out of the session (tests/agent/test_secure_wait_attacks.py)
        length = int(declared) if declared.isascii() and declared.isdigit() else -1
        if length > MAX_RESULT_BYTES:
            self._drop()
            raise SessionFailedError(
                SessionFailure.PROTOCOL_VIOLATION,
                f"the relay declared an answer of {length} bytes, over {MAX_RESULT_BYTES}",
            )
        if length < 0:  # not what the relay sends, but still HTTP
            data = response.read(MAX_RESULT_BYTES + 1)
            if len(data) > MAX_RESULT_BYTES:
                self._drop()
                raise SessionFailedError(
                    SessionFailure.PROTOCOL_VIOLATION,
                    f"the relay's answer runs past {MAX_RESULT_BYTES} bytes",
                )
            return memoryview(data)
        if len(self._buffer) != length:
            self._buffer = bytearray(length)  # a new one: the caller may still hold a view of the old
        view = memoryview(self._buffer)
        got = 0
        while got < length:
            n = response.readinto(view[got:])
            if not n:
                raise http.client.IncompleteRead(bytes(view[:got]), length - got)
            got += n
        return view


def _error_of(data: bytes) -> tuple[str, object]:
    """The error and detail of an error answer, whatever its body holds: parsed with a nesting limit (the
    standard library's parser raises RecursionError on 10^5 brackets); anything but a JSON object is text."""
    try:
        body = pydantic_core.from_json(data)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return bytes(data[:500]).decode("utf-8", "replace"), None
    detail = body.get("detail")
    return str(body.get("error"))[:500], detail if len(repr(detail)) <= 2000 else repr(detail)[:2000]


class HttpCollectives(SessionMember):
    """This site's part in a session, over the agent's HTTPS connection to the orchestrator."""

    def __init__(
        self,
        client: OrchestratorClient,
        task: Task,
        checked: CheckedSession,
        *,
        site: str,
        identity: IdentityKey,
        guard: KeyReuseGuard | None = None,
        poll_wait_s: float = 25.0,
    ) -> None:
        super().__init__(CollectiveSite(checked.config, site, identity, checked.peers, key_guard=guard))
        # the task's deadline, but never past two approved round periods from the session's start: one in the
        # year 9999 held the site's calls (and their retries) for ever (agent/_secure.py's bounded_deadline)
        self._deadline = bounded_deadline(task)
        self._poll_wait_s = poll_wait_s
        self._extra: dict[str, str] = {}
        if client.has_custom_transport:  # a test transport cannot lend its TLS set-up to a connection of ours
            raise ConfigError("a collective session needs the agent's network connection to the orchestrator")
        self._channel = SessionChannel(client, task_id=task.task_id, attempt=checked.config.attempt)

    def _exchange(self, index: int, body: bytes | memoryview) -> bytes | memoryview:
        data = self._send(index, body, self._extra)
        while data is None:
            data = self._send(index, None, {})
        return data

    def _send(
        self, index: int, body: bytes | memoryview | None, headers: dict[str, str]
    ) -> bytes | memoryview | None:
        left = (self._deadline - datetime.now(UTC)).total_seconds()
        if left <= 0:
            raise SessionFailedError(SessionFailure.ABORTED, "the session's round deadline passed")
        wait = min(self._poll_wait_s, left)
        return self._channel.call(
            index, body, wait=wait, deadline=time.monotonic() + max(1.0, left), headers=headers
        )

    def release(self) -> None:
        """Close the session's connection."""
        self._channel.close()

    def close_with(self, attestation: SiteAttestation | None) -> None:
        """The closing call, carrying the site's attestation for the task (no per-site figure)."""
        if attestation is not None:
            self._extra = {
                ATTESTATION_HEADER: base64.b64encode(attestation.model_dump_json().encode()).decode()
            }
        try:
            self.close()
        finally:
            self._extra = {}
