"""The operator API client.

It trusts only the federation CA: an ``https://`` URL with no CA to pin is refused before anything is sent
(the system's authorities would vouch for whoever one of them issued a certificate for the orchestrator's
name, and the API key would go there). Every answer is read as a stream and abandoned at a bound (its size,
declared or sent, and a deadline for the whole answer); a redirect is not followed and, like any answer that
is not 2xx, is a :class:`ClientError`, whatever its body holds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import re
import ssl
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import httpx
import pydantic_core
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ValidationError

import fedhealth
from fedhealth.client._words import field_errors
from fedhealth.core import (
    ConfigError,
    CryptoError,
    FedHealthError,
    InputError,
    token_lifetime_s,
    write_private_file,
)
from fedhealth.crypto import IdentityKey, client_tls_for_url
from fedhealth.governance import SignedSpec, spec_hash
from fedhealth.protocol import (
    PROTOCOL_VERSION,
    OperatorCredential,
    PeerVersion,
    SiteCreated,
    SiteInfo,
    SiteReadinessInfo,
    StudyInfo,
    StudySpec,
    StudyStatus,
    TokenResponse,
    UserCreated,
    UserInfo,
    from_peer,
    version_headers,
)
from fedhealth.transport import DeadlineTransport, answer_deadline

M = TypeVar("M", bound=BaseModel)

# what a bearer token may hold to be sent in a header: visible ASCII, no space, CR or LF
_HEADER_TOKEN = re.compile(r"[\x21-\x7e]+")


class ClientError(FedHealthError):
    """The orchestrator answered with an error; ``status`` and ``error`` are its own. A 422's list of field
    errors reads as rules in the message (``field rounds: must be at least 1``); ``detail`` keeps it raw."""

    def __init__(
        self, status: int, error: str, detail: Any = None, *, retry_after: str | None = None
    ) -> None:
        shown = detail
        if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
            shown = field_errors(detail)
        super().__init__(f"{status} {error}" + (f": {shown}" if shown else ""))
        self.status = status
        self.error = error
        self.detail = detail
        # a 429's Retry-After, as sent (bounded by whoever honours it)
        self.retry_after = retry_after


class OperatorClient:
    """The operator API over HTTPS pinned to the federation CA. A plain ``http://`` URL is refused (the API
    key would cross the network in clear) unless ``insecure=True`` is passed explicitly; an ``https://`` URL
    with no ``ca_pem`` is refused too. ``transport`` replaces the network (tests)."""

    # the most an answer other than a model may hold: lists of studies and sites, reports, an audit log
    MAX_ANSWER_BYTES = 256 << 20
    RENEW_EARLY_S = 30.0  # a token is renewed this long before it expires
    # a model download (the orchestrator's own upload limit is 512 MiB unless raised)
    MAX_MODEL_BYTES = 2 << 30
    # the longest pause wait_for_study takes after a 429, whatever its Retry-After says
    MAX_PAUSE_S = 10.0

    def __init__(
        self,
        url: str,
        *,
        user: str,
        api_key: str,
        ca_pem: str | None,
        client_cert: tuple[bytes, bytes] | None = None,
        timeout: float = 30.0,
        insecure: bool = False,
        transport: httpx.BaseTransport | None = None,
        answer_deadline_s: float = 600.0,
    ) -> None:
        if urlsplit(url.strip()).scheme.lower() == "https" and not ca_pem:
            raise ConfigError(
                f"no federation CA to pin for {url[:200]}: refusing to trust the system's certificate "
                "authorities with the API key; the credential's ca_pem must hold the federation CA "
                "(ca.pem of `orchestrator init`)"
            )
        verify = client_tls_for_url(url, ca_pem, client_cert=client_cert, insecure=insecure)
        # httpx's timeout bounds each read, not the whole answer: one that trickles is cut off here
        self._answer_deadline_s = answer_deadline_s
        self.url = url
        self.user = user
        self._api_key = api_key
        self._http = httpx.Client(
            base_url=url.strip().rstrip("/"),
            timeout=timeout,
            # the deadline kept by every socket read (a status line or headers that trickle included)
            transport=transport if transport is not None else DeadlineTransport(verify=verify),
            trust_env=False,  # no proxy or .netrc from the environment: the API key goes where it is told
            follow_redirects=False,  # the API key and tokens go to the orchestrator and nowhere else
            headers={"User-Agent": "fedhealth-operator", **version_headers(fedhealth.__version__)},
        )
        # the orchestrator's versions, from its last answer (None: it stated none)
        self.orchestrator_version: PeerVersion | None = None
        self._token: str | None = None
        self._renew_at = 0.0  # time.monotonic() from which the token is renewed before a request

    # a credential holds a URL, a CA certificate, an API key and perhaps a TLS client key: a few KiB
    MAX_CREDENTIAL_BYTES = 1 << 20

    @staticmethod
    def read_credential(path: Path) -> OperatorCredential:
        """The credential file at ``path``, checked as the site's key files are (``IdentityKey.load``):
        :class:`ConfigError` (one line) for a file others can read (chmod 600 it), one another account owns,
        a symbolic link (not followed: another account could plant one where the operator looks), or what
        is not a regular file (a FIFO would block the command) or holds more than a credential can."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigError(
                    f"credential file {path} is a symbolic link; not followed (give the file itself)"
                ) from None
            raise ConfigError(f"credential file {path} cannot be read: {exc.strerror}") from exc
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # before fdopen: a folder would be its IsADirectoryError
            os.close(fd)
            raise ConfigError(f"credential file {path} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            if info.st_uid != os.getuid():
                raise ConfigError(
                    f"credential file {path} belongs to uid {info.st_uid}, not to this user "
                    f"(uid {os.getuid()}); refusing an API key another account controls"
                )
            mode = stat.S_IMODE(info.st_mode)
            if mode & 0o077:
                raise ConfigError(
                    f"credential file {path} is readable by other users (mode {mode:o}); chmod 600 it"
                )
            if info.st_size > OperatorClient.MAX_CREDENTIAL_BYTES:
                raise ConfigError(f"credential file {path} is too large ({info.st_size} bytes)")
            data = f.read(OperatorClient.MAX_CREDENTIAL_BYTES + 1)
        if len(data) > OperatorClient.MAX_CREDENTIAL_BYTES:
            raise ConfigError(f"credential file {path} is too large")
        try:
            return OperatorCredential.model_validate_json(data)
        except ValidationError as exc:  # its rules only: pydantic's own text would quote the API key
            raise ConfigError(
                f"{path} is not a fedhealth credential file ({field_errors(exc.errors())})"
            ) from None

    @classmethod
    def from_credential(cls, path: Path, *, url: str | None = None, insecure: bool = False) -> OperatorClient:
        """The client of the credential file at ``path`` (:meth:`read_credential`)."""
        credential = cls.read_credential(path)
        client_cert = None
        if credential.tls_certificate and credential.tls_key:
            client_cert = (credential.tls_certificate.encode(), credential.tls_key.encode())
        try:
            return cls(
                url or credential.orchestrator,
                user=credential.user,
                api_key=credential.api_key,
                ca_pem=credential.ca_pem,
                client_cert=client_cert,
                insecure=insecure,
            )
        except ssl.SSLError as exc:  # a ca_pem or TLS key that is not one
            raise ConfigError(
                f"credential file {path}: its CA certificate or TLS client key cannot be used "
                f"({' '.join(str(exc).split())[:200] or type(exc).__name__})"
            ) from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ----------------------------------------------------------------------------------------

    def _login(self) -> None:
        response = self._bounded(
            "POST",
            "/api/v1/auth/token",
            self.MAX_ANSWER_BYTES,
            json={"user": self.user, "api_key": self._api_key},
        )
        if not response.is_success:
            raise _error(response)
        token = _answer(response, lambda data: TokenResponse.model_validate(data))
        if not _HEADER_TOKEN.fullmatch(token.access_token):  # a CR LF or an é would break every request
            raise ClientError(response.status_code, "the orchestrator's token cannot be sent in a header")
        self._token = token.access_token
        # counted on this machine's monotonic clock from the orchestrator's own (core.token_lifetime_s)
        lifetime = token_lifetime_s(token.expires_at, response.headers.get("date"))
        self._renew_at = time.monotonic() + lifetime - self.RENEW_EARLY_S

    def request(
        self, method: str, path: str, *, max_bytes: int | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send an authenticated request (logging in or renewing the token as needed); raise on any answer
        but 2xx (a redirect is not followed). The answer is read whole, up to ``max_bytes``
        (:attr:`MAX_ANSWER_BYTES` by default) and the client's answer deadline."""
        bound = self.MAX_ANSWER_BYTES if max_bytes is None else max_bytes
        if self._token is None or time.monotonic() >= self._renew_at:
            self._login()
        response = self._bounded(
            method, path, bound, headers={"Authorization": f"Bearer {self._token}"}, **kwargs
        )
        if response.status_code == 401:  # expired early (clock skew) or revoked key: log in once more
            self._login()
            response = self._bounded(
                method, path, bound, headers={"Authorization": f"Bearer {self._token}"}, **kwargs
            )
        self.orchestrator_version = PeerVersion.from_headers(response.headers)
        if not response.is_success:
            raise _error(response)
        return response

    def _bounded(self, method: str, path: str, max_bytes: int, **kwargs: Any) -> httpx.Response:
        """The answer read in full, but never more than ``max_bytes`` of body (declared or sent) nor past
        the answer deadline: a lying orchestrator could otherwise fill the operator's memory, or hold the
        command for ever with a byte now and then. A compressed answer counts as what it inflates to."""
        request = self._http.build_request(method, path, **kwargs)
        deadline = time.monotonic() + self._answer_deadline_s
        with answer_deadline(deadline):
            return self._read_bounded(request, max_bytes, deadline)

    def _read_bounded(self, request: httpx.Request, max_bytes: int, deadline: float) -> httpx.Response:
        response = self._http.send(request, stream=True, follow_redirects=False)
        try:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ClientError(
                    response.status_code,
                    f"the answer declares {int(declared)} bytes, over the {max_bytes} allowed",
                )
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise ClientError(
                        response.status_code, f"the answer runs over the {max_bytes} bytes allowed"
                    )
                if time.monotonic() > deadline:
                    raise ClientError(
                        response.status_code,
                        f"the answer was still arriving at its deadline ({self._answer_deadline_s:g} s)",
                    )
                chunks.append(chunk)
        finally:
            response.close()
        # as sent, in bytes: a value of Latin-1 text (``café``) made str headers fail to encode as ASCII
        headers = [
            (k, v)
            for k, v in response.headers.raw
            if k.lower() not in (b"content-encoding", b"content-length", b"transfer-encoding")
        ]
        return httpx.Response(
            response.status_code, headers=headers, content=b"".join(chunks), request=request
        )

    def _parse(self, model: type[M], data: Any) -> M:
        """A message from the orchestrator: fields a newer orchestrator added are dropped, not refused."""
        version = self.orchestrator_version
        try:
            return from_peer(model, data, version.protocol if version is not None else None)
        except ValidationError as exc:
            if version is not None and version.protocol > PROTOCOL_VERSION and _newer_spec_field(exc):
                # a spec is read whole or not at all (protocol._versions): say why, and what to do
                raise ClientError(
                    200,
                    f"the orchestrator's {model.__name__} holds a study spec with a field this release does "
                    f"not know (it speaks protocol {version.protocol}, this client {PROTOCOL_VERSION}): "
                    "upgrade fedhealth to read it",
                ) from exc
            raise ClientError(200, f"the orchestrator's answer is not a {model.__name__}") from exc

    def _get(self, method: str, path: str, **kwargs: Any) -> Any:
        """An authenticated request's JSON answer (parsed with a nesting limit)."""
        return _answer(self.request(method, path, **kwargs), lambda data: data)

    def _list(self, path: str, **kwargs: Any) -> list[Any]:
        data = self._get("GET", path, **kwargs)
        if not isinstance(data, list):
            raise ClientError(200, f"the orchestrator's answer to {path} is not a list")
        return data

    # --- sites and users ---------------------------------------------------------------------------------

    def add_site(self, name: str) -> SiteCreated:
        return self._parse(SiteCreated, self._get("POST", "/api/v1/sites", json={"name": name}))

    def new_enrollment_token(self, name: str) -> SiteCreated:
        return self._parse(SiteCreated, self._get("POST", f"/api/v1/sites/{_segment(name)}/enrollment-token"))

    def rotate_site(self, name: str) -> SiteCreated:
        """Retire the site's key and certificate; returns the enrollment token for its new key."""
        return _answer(
            self.request("POST", f"/api/v1/sites/{_segment(name)}/rotate"), SiteCreated.model_validate
        )

    def revoke_site(self, name: str) -> SiteInfo:
        return self._parse(SiteInfo, self._get("POST", f"/api/v1/sites/{_segment(name)}/revoke"))

    def sites(self) -> list[SiteInfo]:
        return [self._parse(SiteInfo, s) for s in self._list("/api/v1/sites")]

    def site_keys(self, names: list[str]) -> dict[str, str]:
        """The enrolled identity-key fingerprints of ``names``, for a secure study's ``site_keys``, as the
        orchestrator reports them. The orchestrator is not trusted for them: each steward compares their
        site's entry with the site's own identity key before approving the spec."""
        known = {s.name: s.fingerprint for s in self.sites()}
        missing = sorted(n for n in names if known.get(n) is None)
        if missing:
            raise FedHealthError(f"sites not enrolled (no identity key yet): {', '.join(missing)}")
        return {n: known[n] for n in names}  # type: ignore[misc]

    def add_user(self, name: str, role: str) -> UserCreated:
        return self._parse(UserCreated, self._get("POST", "/api/v1/users", json={"name": name, "role": role}))

    def new_api_key(self, name: str) -> UserCreated:
        """Replace a user's API key; the old key and the tokens issued against it stop working."""
        return _answer(
            self.request("POST", f"/api/v1/users/{_segment(name)}/api-key"), UserCreated.model_validate
        )

    def revoke_user(self, name: str) -> None:
        self.request("POST", f"/api/v1/users/{_segment(name)}/revoke")

    def users(self) -> list[UserInfo]:
        return [self._parse(UserInfo, u) for u in self._list("/api/v1/users")]

    # --- studies -----------------------------------------------------------------------------------------

    def create_study(self, spec: StudySpec, *, approval_wait_s: float | None = None) -> StudyInfo:
        """Submit an unsigned spec (sites see it as unsigned); see :meth:`submit_study`."""
        params = {"approval_wait_s": approval_wait_s} if approval_wait_s is not None else None
        return self._parse(
            StudyInfo, self._get("POST", "/api/v1/studies", json=spec.model_dump(mode="json"), params=params)
        )

    def register_signing_key(self, key: IdentityKey) -> None:
        """Register this user's spec-signing key (once; an admin may replace it)."""
        self.request("PUT", "/api/v1/governance/owner-key", json={"public_key": key.public().raw.hex()})

    def submit_study(
        self, spec: StudySpec, key: IdentityKey, *, approval_wait_s: float | None = None
    ) -> StudyInfo:
        """Submit a spec signed with the owner's ``key`` (registered first if need be). The study waits in
        ``awaiting_approval`` until every site it names has approved its hash, then runs."""
        self.register_signing_key(key)
        signed = SignedSpec.sign(spec.model_dump(mode="json"), owner=spec.owner, key=key)
        params = {"approval_wait_s": approval_wait_s} if approval_wait_s is not None else None
        body = {"spec": spec.model_dump(mode="json"), "signature": signed.signature.hex()}
        info = self._parse(
            StudyInfo, self._get("POST", "/api/v1/governance/studies", json=body, params=params)
        )
        # the hash the owner sends each steward comes from this answer: one of another spec (an older one
        # this owner signed, replayed) would have the stewards approve what the owner did not just submit
        submitted = spec_hash(body["spec"])
        if info.spec_hash != submitted:
            raise ClientError(
                200,
                f"the orchestrator answered with spec hash {str(info.spec_hash)[:80]!r}, not {submitted} "
                "of the spec submitted; do not send its hash to the stewards",
            )
        return info

    def study(self, study_id: str) -> StudyInfo:
        return self._parse(StudyInfo, self._get("GET", f"/api/v1/studies/{_segment(study_id)}"))

    def studies(self, status: StudyStatus | None = None) -> list[StudyInfo]:
        params = {"status": status.value} if status is not None else None
        return [self._parse(StudyInfo, s) for s in self._list("/api/v1/studies", params=params)]

    def cancel_study(self, study_id: str) -> StudyInfo:
        return self._parse(StudyInfo, self._get("POST", f"/api/v1/studies/{_segment(study_id)}/cancel"))

    def model_bytes(self, study_id: str) -> bytes:
        """The study's latest released model (its owner or an admin); :class:`ClientError` when its bytes
        do not hash to the digest the orchestrator states with them."""
        return _model(
            self.request("GET", f"/api/v1/studies/{_segment(study_id)}/model", max_bytes=self.MAX_MODEL_BYTES)
        )

    def download_model(self, study_id: str, path: Path, *, overwrite: bool = True) -> str:
        """Write the study's current model (safetensors) to ``path``, 0600 and atomically (a symbolic link
        planted there is replaced, never written through; with ``overwrite=False`` an existing file or link
        raises :class:`FileExistsError`); returns its sha256."""
        blob = self.model_bytes(study_id)
        write_private_file(path, blob, overwrite=overwrite)
        return hashlib.sha256(blob).hexdigest()

    def released_model(self, digest: str) -> bytes:
        """A released model version by digest (its study's owner or an admin): :class:`ClientError` when
        the bytes answered do not hash to ``digest``."""
        response = self.request("GET", f"/api/v1/models/{_segment(digest)}", max_bytes=self.MAX_MODEL_BYTES)
        return _model(response, digest)

    def report(self, study_id: str) -> dict[str, Any]:
        report = self._get("GET", f"/api/v1/studies/{_segment(study_id)}/report")
        if not isinstance(report, dict):
            raise ClientError(200, "the orchestrator's report is not a JSON object")
        return report

    def site_readiness(self) -> list[SiteReadinessInfo]:
        """Each site's latest ``fedhealth site check`` report."""
        return [self._parse(SiteReadinessInfo, r) for r in self._list("/api/v1/sites/readiness")]

    def wait_for_study(
        self,
        study_id: str,
        *,
        timeout: float = 600.0,
        interval: float = 0.1,
        on_progress: Any = None,
    ) -> StudyInfo:
        """Poll until the study has ended (it may wait for approvals, then run); transient connection errors
        and 429s are waited out (a 429's Retry-After lengthens the pause up to :attr:`MAX_PAUSE_S`, never past
        ``timeout``: a Retry-After of 10^9 s does not park the caller, nor one of 0 make it hammer)."""
        if math.isnan(timeout) or not (math.isfinite(interval) and interval >= 0):
            # NaN would never pass (a poll for ever); sleep() refuses a negative or infinite interval
            raise InputError(
                f"wait_for_study: timeout must be a number of seconds and interval a finite one, at least 0 "
                f"(given {timeout!r} and {interval!r})"
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = self.study(study_id)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(interval)
                continue
            except ClientError as exc:
                if exc.status != 429 or time.monotonic() > deadline:
                    raise
                time.sleep(self._pause_after_429(exc.retry_after, interval, deadline))
                continue
            if on_progress is not None:
                on_progress(info)
            if info.status not in (StudyStatus.RUNNING, StudyStatus.AWAITING_APPROVAL):
                return info
            if time.monotonic() > deadline:
                raise ClientError(408, f"study {study_id} still {info.status.value} after {timeout:.0f} s")
            time.sleep(interval)

    def _pause_after_429(self, retry_after: str | None, interval: float, deadline: float) -> float:
        asked = (retry_after or "").strip()
        # isdigit() holds for "²", which float() refuses: ASCII digits only
        wanted = (
            float(asked) if asked.isascii() and asked.replace(".", "", 1).isdigit() else 0.0
        )  # a date, garbage: the interval
        pause = min(self.MAX_PAUSE_S, max(interval, wanted))  # float("9" * 400) is inf: min bounds it
        return max(0.0, min(pause, deadline - time.monotonic()))


def signing_key_path(credential: Path) -> Path:
    """Where an operator's spec-signing key lives by default: beside the credential file."""
    return credential.with_name(credential.name.removesuffix(".credential") + ".signing.key")


def load_signing_key(path: Path) -> IdentityKey:
    """The operator's spec-signing key at ``path``, made (mode 0600) on first use by whichever process gets
    there first: a key already written is never replaced (two notebooks submitting at once would otherwise
    each keep a key, and only one stays on disk).

    Read by :meth:`IdentityKey.load`, and every refusal is a :class:`CryptoError` (one line): a file others
    can read or another account owns, what is not a regular file (a FIFO would block), one larger than a key,
    one that is not an unencrypted Ed25519 private key in PEM, one that cannot be opened."""
    if not path.exists():
        pem = (
            IdentityKey.generate()
            .crypto_key()
            .private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        with contextlib.suppress(FileExistsError):  # another process made it first: that key is the one
            write_private_file(path, pem, overwrite=False)
    try:
        return IdentityKey.load(path)
    except OSError as exc:
        raise CryptoError(f"signing key {path} cannot be read: {exc.strerror or exc}") from None


T = TypeVar("T")


def _answer(response: httpx.Response, read: Callable[[Any], T]) -> T:
    """A 2xx answer's JSON, parsed with a nesting limit (the standard library's parser raises
    RecursionError on 10^5 brackets), then read; what is not JSON, or not the thing asked for, is a
    :class:`ClientError`."""
    try:
        return read(pydantic_core.from_json(response.content))
    except ValueError as exc:  # pydantic's ValidationError is one
        raise ClientError(
            response.status_code, "the orchestrator's answer is not what was asked for"
        ) from exc


def _model(response: httpx.Response, asked: str | None = None) -> bytes:
    """A model answer's bytes, checked against the digest asked for and the one the orchestrator states
    (``X-Fedhealth-Model-Digest``; an orchestrator that states none is taken at its bytes)."""
    blob = response.content
    actual = hashlib.sha256(blob).hexdigest()
    for promised in (asked, response.headers.get("x-fedhealth-model-digest")):
        if promised is not None and promised.strip().lower() != actual:
            raise ClientError(
                response.status_code,
                f"the model answered hashes to {actual}, not to the digest promised ({promised[:80]!r})",
            )
    return blob


def _segment(value: str) -> str:
    """``value`` (an id or a name: typed, pasted, or listed by the orchestrator) as one path segment. Put in
    the path as it was, a ``/``, ``?``, ``#`` or ``..`` in it made another request of the call:
    ``cancel_study("../users/rita/revoke?")`` was ``POST /api/v1/users/rita/revoke``."""
    quoted = quote(str(value), safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def _error(response: httpx.Response) -> ClientError:
    """The refusal an answer that is not 2xx states. Its body comes from the orchestrator, so it may be any
    JSON value, nested arbitrarily deep, or none: whatever it holds, the result is a ClientError."""
    retry_after = response.headers.get("retry-after")
    if response.is_redirect:  # never followed: the API key and tokens stay with the orchestrator
        location = response.headers.get("location", "")[:200]
        return ClientError(response.status_code, f"the orchestrator redirected to {location!r}; not followed")
    try:
        body = pydantic_core.from_json(response.content)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return ClientError(response.status_code, response.text[:500], retry_after=retry_after)
    detail = body.get("detail")
    return ClientError(
        response.status_code,
        str(body.get("error"))[:500],
        detail if len(repr(detail)) <= 2000 else repr(detail)[:2000],
        retry_after=retry_after,
    )


def _newer_spec_field(exc: ValidationError) -> bool:
    """Whether ``exc`` refuses a field the study spec (or its parts) does not have: what a newer peer's spec
    field looks like to this release."""
    return any(e["type"] == "extra_forbidden" and "spec" in e["loc"] for e in exc.errors())
