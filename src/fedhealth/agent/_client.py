"""The agent's HTTP client for the orchestrator.

- Trusts only the pinned federation CA; a certificate that does not verify is a hard, clear error, never
  retried (it means the wrong server or the wrong CA). A plain ``http://`` URL is refused unless the caller
  passes ``insecure=True`` explicitly; the scheme is compared case-insensitively (``HTTPS://`` pins too).
- Logs in by signing the orchestrator's fresh challenge with the site's identity key, keeps the short-lived
  access token and renews it before it expires (or at once on a 401).
- Retries connection errors, 5xx and 429 with bounded exponential backoff and full jitter (honouring
  Retry-After, but never past the policy's longest pause nor the call's deadline); other 4xx answers are
  final and raised as :class:`OrchestratorRefused`, whatever their body holds.
"""

from __future__ import annotations

import base64
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pydantic_core

import fedhealth
from fedhealth.core import (
    ConfigError,
    FedHealthError,
    ServiceUnavailableError,
    canonical_json,
    token_lifetime_s,
)
from fedhealth.crypto import IdentityKey, client_tls_for_url
from fedhealth.protocol import (
    ATTESTATION_HEADER,
    Ack,
    ChallengeResponse,
    PeerVersion,
    ProtocolMismatch,
    ResultManifest,
    SiteAttestation,
    Task,
    TaskFailure,
    TaskPoll,
    TokenResponse,
    agent_login_message,
    from_peer,
    negotiate,
    ours,
    version_headers,
)
from fedhealth.transport import DeadlineTransport, answer_deadline

log = logging.getLogger("fedhealth.agent")
T = TypeVar("T")

# The most an answer other than a model may hold: a task (a model is inlined only up to 64 KiB), an ack, a
# challenge, the specs awaiting approval. A model download is bounded by the size its recipe fixes.
MAX_ANSWER_BYTES = 4 << 20


class _AnswerTooLarge(Exception):
    pass


class _AnswerTooSlow(Exception):
    pass


class OrchestratorRefused(FedHealthError):
    """The orchestrator answered 4xx: the request will not succeed by retrying."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(f"{status} {error}" + (f": {detail}" if detail else ""))
        self.status = status
        self.error = error
        self.detail = detail


class SecureRoundGone(FedHealthError):
    """The orchestrator answered 410: this site has no further part in the secure round."""


class TlsVerificationError(FedHealthError):
    """The orchestrator's certificate does not verify against the pinned federation CA."""


def connection_problem(exc: httpx.TransportError) -> Exception:
    """Name a transport failure; certificate failures become :class:`TlsVerificationError`."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return TlsVerificationError(
                "TLS verification failed: the orchestrator's certificate is not trusted by the pinned "
                f"federation CA ({cause.verify_message or cause.reason}); check the --ca given at enrollment"
            )
        cause = cause.__cause__ or cause.__context__
    return exc


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    base_s: float = 0.2
    max_s: float = 10.0
    max_elapsed_s: float | None = None  # None: retry until stopped

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^attempt)]."""
        return rng.uniform(0, min(self.max_s, self.base_s * (2**attempt)))

    def after_rate_limit(self, attempt: int, rng: random.Random, retry_after: str) -> float:
        """The pause after a 429: at least what the orchestrator asked (``Retry-After`` in seconds) and at
        least the usual backoff, but never longer than ``max_s``: a Retry-After of 10^9 seconds (or one too
        large for a float) must not park the agent, and one of 0 must not make it hammer."""
        backoff = self.delay(attempt, rng)
        value = retry_after.strip()
        # ASCII digits only: "²" (one latin-1 byte) passes str.isdigit(), and float() raised ValueError out of
        # the call: out of a secure stage, a collective call, and the poll, ending `site run`
        # (tests/agent/test_secure_wait_attacks.py)
        if not (value.isascii() and value.replace(".", "", 1).isdigit()):
            return backoff  # absent, negative, an HTTP date, no number: the usual backoff
        return min(self.max_s, max(backoff, float(value)))


class OrchestratorClient:
    # how much longer than the long poll's own wait an answer may take before the read times out
    LONG_POLL_GRACE_S = 15.0
    # how long one login answer (challenge or token) may take to arrive whole
    LOGIN_ANSWER_S = 30.0
    RENEW_EARLY_S = 60.0  # a token is renewed this long before it expires

    def __init__(
        self,
        base_url: str,
        site: str,
        identity: IdentityKey,
        *,
        ca_pem: bytes | None = None,
        client_cert: tuple[bytes, bytes] | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        insecure: bool = False,
    ) -> None:
        verify = client_tls_for_url(base_url, ca_pem, client_cert=client_cert, insecure=insecure)
        if transport is None and not ca_pem and base_url.strip().lower().startswith("https:"):
            # https with no federation CA (HOME/ca.pem lost): the system's authorities would be trusted, and
            # any of them that mis-issues a certificate for the orchestrator's name would get the site's login
            raise ConfigError(
                f"no federation CA to pin for {base_url}: refusing to trust the system's certificate "
                "authorities; restore ca.pem in the site home (as given at enrollment)"
            )
        self.site = site
        self.retry = retry or RetryPolicy()
        self._identity = identity
        self._rng = random.Random()
        self._should_stop = should_stop
        self._token: str | None = None
        self._renew_at = 0.0  # time.monotonic() from which the token is renewed before a call
        self._verify = verify
        self._custom_transport = transport is not None
        self.base_url = base_url.strip().rstrip("/")
        # the orchestrator's versions, from its answers; None until it answered (or if it states none)
        self.orchestrator_version: PeerVersion | None = None
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"User-Agent": "fedhealth-agent", **version_headers(fedhealth.__version__)},
            timeout=httpx.Timeout(30.0, connect=5.0),
            transport=transport if transport is not None else DeadlineTransport(verify=verify),
            trust_env=False,
        )

    def close(self) -> None:
        self._http.close()

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context this client verifies the orchestrator with (pinned to the federation CA), for a
        connection of its own (a collective session's); None for a plain-HTTP test set-up."""
        if not self.base_url.lower().startswith("https"):
            return None
        return self._verify if isinstance(self._verify, ssl.SSLContext) else ssl.create_default_context()

    @property
    def has_custom_transport(self) -> bool:
        """Whether requests go through a transport given at construction (tests), not the network."""
        return self._custom_transport

    def forget_token(self) -> None:
        """Log in again before the next request (after a 401)."""
        self._token = None

    @property
    def should_stop(self) -> bool:
        return self._should_stop()

    def backoff(self, attempt: int) -> float:
        """How long to wait before retry ``attempt`` (the client's policy, full jitter)."""
        return self.retry.delay(attempt, self._rng)

    def rate_limit_backoff(self, attempt: int, retry_after: str) -> float:
        """How long to wait before retry ``attempt`` after a 429 with ``retry_after`` (bounded by the
        policy: :meth:`RetryPolicy.after_rate_limit`)."""
        return self.retry.after_rate_limit(attempt, self._rng, retry_after)

    @property
    def http(self) -> httpx.Client:
        """The underlying HTTP client (pinned TLS, no retries), for callers that need raw answers."""
        return self._http

    # --- authentication ----------------------------------------------------------------------------------

    def _login(self) -> None:
        answer = self._raw("POST", "/api/v1/agent/challenge", json={"site": self.site})
        self._check_orchestrator(answer)
        try:
            challenge = ChallengeResponse.model_validate_json(answer.content)
        except ValueError as exc:
            raise ServiceUnavailableError("logging in: the challenge answer is not a challenge") from exc
        signature = self._identity.sign(canonical_json(agent_login_message(self.site, challenge.challenge)))
        answer = self._raw(
            "POST",
            "/api/v1/agent/token",
            json={"site": self.site, "challenge": challenge.challenge, "signature": signature.hex()},
        )
        try:
            token = TokenResponse.model_validate_json(answer.content)
        except ValueError as exc:
            raise ServiceUnavailableError("logging in: the token answer is not a token") from exc
        self._token = token.access_token
        self._renew_at = (
            time.monotonic()
            + token_lifetime_s(token.expires_at, answer.headers.get("date"))
            - self.RENEW_EARLY_S
        )
        log.debug("logged in as %s until %s", self.site, token.expires_at.isoformat())

    def _check_orchestrator(self, response: httpx.Response) -> None:
        """Refuse an orchestrator that shares no protocol with this agent (one sentence, never retried)."""
        stated = PeerVersion.from_headers(response.headers)
        self.orchestrator_version = stated
        if stated is not None:
            negotiate(stated, ours(fedhealth.__version__), client_name="agent", where="at this site")

    @property
    def orchestrator_protocol(self) -> int | None:
        return self.orchestrator_version.protocol if self.orchestrator_version is not None else None

    def _raw(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        deadline = time.monotonic() + self.LOGIN_ANSWER_S  # a login answer that trickles is abandoned
        try:
            response = self._bounded(method, path, MAX_ANSWER_BYTES, deadline, **kwargs)
        except (_AnswerTooLarge, _AnswerTooSlow) as exc:
            raise ServiceUnavailableError(f"{path}: {exc}") from exc
        if response.status_code >= 400:
            raise _refused(response)
        return response

    def _bounded(
        self, method: str, path: str, max_bytes: int, deadline: float | None, **kwargs: Any
    ) -> httpx.Response:
        """The answer read in full, but never more than ``max_bytes`` of body (declared or sent) nor past
        ``deadline`` (``time.monotonic()``): httpx's timeouts bound each read, not the whole answer, so an
        orchestrator that sends a byte now and then, or without end, would otherwise hold the agent (and its
        memory) for as long as it likes. Redirects are not followed."""
        request = self._http.build_request(method, path, **kwargs)
        with answer_deadline(deadline):  # the status line and headers too, not only the body's chunks
            return self._read_bounded(request, max_bytes, deadline)

    def _read_bounded(self, request: httpx.Request, max_bytes: int, deadline: float | None) -> httpx.Response:
        response = self._http.send(request, stream=True, follow_redirects=False)
        try:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise _AnswerTooLarge(f"the answer declares {int(declared)} bytes, over {max_bytes}")
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_bytes():  # decoded: a compressed answer counts as what it inflates to
                size += len(chunk)
                if size > max_bytes:
                    raise _AnswerTooLarge(f"the answer runs past {max_bytes} bytes")
                if deadline is not None and time.monotonic() > deadline:
                    raise _AnswerTooSlow("the answer was still arriving at its deadline")
                chunks.append(chunk)
        finally:
            response.close()
        # the raw bytes, as they came: the decoded text of a header holding a byte over 0x7f (a "²" in a
        # Retry-After) could not be encoded back, and the UnicodeEncodeError ended `site run`
        # (tests/agent/test_secure_wait_attacks.py)
        headers = [
            (k, v)
            for k, v in response.headers.raw
            if k.lower() not in (b"content-encoding", b"content-length", b"transfer-encoding")
        ]
        return httpx.Response(
            response.status_code, headers=headers, content=b"".join(chunks), request=request
        )

    def auth_headers(self) -> dict[str, str]:
        # renewed a minute early (RENEW_EARLY_S) so a long upload does not outlive its token, on this
        # process's monotonic clock: see token_lifetime_s for why not on the wall clock
        if self._token is None or time.monotonic() >= self._renew_at:
            self._login()
        return {"Authorization": f"Bearer {self._token}"}

    # --- requests with retries ---------------------------------------------------------------------------

    def _call(
        self,
        what: str,
        method: str,
        path: str,
        *,
        max_elapsed_s: float | None = None,
        max_bytes: int = MAX_ANSWER_BYTES,
        **kwargs: Any,
    ) -> httpx.Response:
        started = time.monotonic()
        limit = max_elapsed_s if max_elapsed_s is not None else self.retry.max_elapsed_s
        timeout = kwargs.get("timeout")
        # one answer may take as long as the call may (its deadline), or a poll's wait and a margin
        per_answer = timeout.read if isinstance(timeout, httpx.Timeout) and timeout.read else None
        attempt = 0
        renewed = False
        extra_headers: dict[str, str] = kwargs.pop("headers", {})
        while True:
            problem: str
            retry_after: str | None = None
            try:
                headers = {**extra_headers, **self.auth_headers()}
                deadline = started + limit if limit is not None else None
                if per_answer is not None:
                    this_answer = time.monotonic() + per_answer
                    deadline = this_answer if deadline is None else min(deadline, this_answer)
                response = self._bounded(method, path, max_bytes, deadline, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                named = connection_problem(exc)
                if isinstance(named, TlsVerificationError):
                    raise named from exc
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            except _AnswerTooLarge as exc:  # the same answer again would be as large: not retried
                raise ServiceUnavailableError(f"{what}: {exc}") from exc
            except _AnswerTooSlow as exc:
                problem = str(exc)
            except OrchestratorRefused as exc:  # from the login requests
                if exc.status == 429 or exc.status >= 500:
                    problem = f"login: HTTP {exc.status}"
                else:
                    raise
            else:
                if response.status_code < 400:  # a redirect is not followed: its body is no answer
                    return response
                if response.status_code == 401 and not renewed:
                    # expired or not yet valid: log in again once, at once
                    self._token = None
                    renewed = True
                    continue
                if response.status_code == 429:
                    problem = "HTTP 429 (rate limited)"
                    retry_after = response.headers.get("retry-after", "")
                elif response.status_code < 500:
                    raise _refused(response)
                else:
                    problem = f"HTTP {response.status_code}"
            if self._should_stop():
                raise ServiceUnavailableError(f"{what}: stopped while retrying ({problem})")
            elapsed = time.monotonic() - started
            if limit is not None and elapsed > limit:
                raise ServiceUnavailableError(
                    f"{what}: orchestrator unreachable for {limit:.0f} s ({problem})"
                )
            if retry_after is not None:
                delay = self.retry.after_rate_limit(attempt, self._rng, retry_after)
            else:
                delay = self.retry.delay(attempt, self._rng)
            if limit is not None:  # no pause past the call's deadline: the last try comes at it
                delay = min(delay, max(0.0, limit - elapsed))
            log.warning("%s failed (%s); retrying in %.2f s", what, problem, delay)
            time.sleep(delay)
            attempt += 1

    def call(self, what: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """An authenticated request with this client's retries, for requests outside tasks (approvals,
        readiness); 4xx answers raise :class:`OrchestratorRefused`."""
        return self._call(what, method, path, **kwargs)

    def next_task(self, wait: float) -> Task | None:
        response = self._call(
            "polling for tasks",
            "GET",
            "/api/v1/agent/tasks/next",
            params={"wait": wait},
            timeout=httpx.Timeout(wait + self.LONG_POLL_GRACE_S, connect=5.0),
        )
        try:
            return from_peer(TaskPoll, response.content, self.orchestrator_protocol).task
        except ValueError as exc:  # pydantic's ValidationError: not a task poll; poll again, a bit later
            time.sleep(self.retry.delay(0, self._rng))
            raise ServiceUnavailableError(
                f"polling for tasks: the answer is not a task poll ({type(exc).__name__})"
            ) from exc

    def get_model(
        self, digest: str, *, max_elapsed_s: float | None = None, max_bytes: int = MAX_ANSWER_BYTES
    ) -> bytes:
        """The model of ``digest``, never more than ``max_bytes`` of it (its recipe fixes its size)."""
        return self._call(
            "downloading the model",
            "GET",
            f"/api/v1/agent/models/{digest}",
            max_elapsed_s=max_elapsed_s,
            max_bytes=max_bytes,
        ).content

    def upload_result(self, task_id: str, body: bytes, *, max_elapsed_s: float | None = None) -> Ack:
        response = self._call(
            "uploading the update",
            "POST",
            f"/api/v1/agent/tasks/{task_id}/result",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
            max_elapsed_s=max_elapsed_s,
        )
        return Ack.model_validate_json(response.content)

    def upload_evaluation(
        self, task_id: str, manifest: ResultManifest, *, max_elapsed_s: float | None = None
    ) -> Ack:
        response = self._call(
            "uploading the evaluation",
            "POST",
            f"/api/v1/agent/tasks/{task_id}/evaluation",
            content=manifest.model_dump_json(),
            headers={"Content-Type": "application/json"},
            max_elapsed_s=max_elapsed_s,
        )
        return Ack.model_validate_json(response.content)

    def secagg_send(
        self,
        task_id: str,
        stage: str,
        body: bytes,
        *,
        wait: float = 0.0,
        attestation: SiteAttestation | None = None,
        max_elapsed_s: float | None = None,
    ) -> bytes | None:
        """Send this site's message for ``stage`` (with the task's ``attestation``, if given). With ``wait``
        > 0, also wait up to that long for the server's message after the stage closes and return it (None:
        not yet; ask :meth:`secagg_receive`)."""
        waiting: dict[str, Any] = {}
        if wait > 0:
            waiting = {
                "params": {"wait": wait},
                "timeout": httpx.Timeout(wait + self.LONG_POLL_GRACE_S, connect=5.0),
            }
        headers = {"Content-Type": "application/octet-stream"}
        if attestation is not None:
            headers[ATTESTATION_HEADER] = base64.b64encode(attestation.model_dump_json().encode()).decode()
        try:
            response = self._call(
                f"sending the {stage} message",
                "POST",
                f"/api/v1/agent/tasks/{task_id}/secagg/{stage}",
                content=body,
                headers=headers,
                max_elapsed_s=max_elapsed_s,
                **waiting,
            )
        except OrchestratorRefused as exc:
            if exc.status == 410:
                raise SecureRoundGone(str(exc.detail or exc.error)) from exc
            raise
        if wait <= 0 or response.status_code == 204:
            return None
        if response.headers.get("content-type", "").startswith("application/json"):
            return None  # an orchestrator that does not answer with the next message
        return response.content

    def secagg_receive(
        self, task_id: str, stage: str, *, wait: float, max_elapsed_s: float | None = None
    ) -> bytes | None:
        """The server's message after ``stage`` closed; None if it has not closed yet (long-poll)."""
        try:
            response = self._call(
                f"waiting after the {stage} stage",
                "GET",
                f"/api/v1/agent/tasks/{task_id}/secagg/{stage}",
                params={"wait": wait},
                timeout=httpx.Timeout(wait + self.LONG_POLL_GRACE_S, connect=5.0),
                max_elapsed_s=max_elapsed_s,
            )
        except OrchestratorRefused as exc:
            if exc.status == 410:
                raise SecureRoundGone(str(exc.detail or exc.error)) from exc
            raise
        return None if response.status_code == 204 else response.content

    def report_failure(
        self, task_id: str, failure: TaskFailure, *, max_elapsed_s: float | None = None
    ) -> Ack:
        response = self._call(
            "reporting a failure",
            "POST",
            f"/api/v1/agent/tasks/{task_id}/failure",
            content=failure.model_dump_json(),
            headers={"Content-Type": "application/json"},
            max_elapsed_s=max_elapsed_s,
        )
        return Ack.model_validate_json(response.content)


def _refused(response: httpx.Response) -> OrchestratorRefused | ProtocolMismatch:
    """The refusal an error answer states. Its body comes from the orchestrator, so it is parsed with a
    nesting limit (the standard library's parser raises RecursionError on 10^5 brackets) and may be any
    JSON value, or none: whatever it holds, the result is a refusal, never an exception of another kind."""
    try:
        body = pydantic_core.from_json(response.content)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return OrchestratorRefused(response.status_code, response.text[:500])
    error = str(body.get("error"))[:500]
    if response.status_code == 426:  # no protocol in common: the sentence says which side to upgrade
        return ProtocolMismatch(error)
    detail = body.get("detail")
    return OrchestratorRefused(
        response.status_code, error, detail if len(repr(detail)) <= 2000 else repr(detail)[:2000]
    )
