"""The operator API client."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

import fedhealth
from fedhealth.client._words import field_errors
from fedhealth.core import FedHealthError
from fedhealth.crypto import IdentityKey, client_tls_for_url
from fedhealth.governance import SignedSpec
from fedhealth.protocol import (
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

M = TypeVar("M", bound=BaseModel)


class ClientError(FedHealthError):
    """The orchestrator answered with an error; ``status`` and ``error`` are its own. A 422's list of field
    errors reads as rules in the message (``field rounds: must be at least 1``); ``detail`` keeps it raw."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        shown = detail
        if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
            shown = field_errors(detail)
        super().__init__(f"{status} {error}" + (f": {shown}" if shown else ""))
        self.status = status
        self.error = error
        self.detail = detail


class OperatorClient:
    """The operator API over HTTPS pinned to the federation CA. A plain ``http://`` URL is refused (the API
    key would cross the network in clear) unless ``insecure=True`` is passed explicitly."""

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
    ) -> None:
        verify = client_tls_for_url(url, ca_pem, client_cert=client_cert, insecure=insecure)
        self.url = url
        self.user = user
        self._api_key = api_key
        self._http = httpx.Client(
            base_url=url.strip().rstrip("/"),
            verify=verify,
            timeout=timeout,
            headers={"User-Agent": "fedhealth-operator", **version_headers(fedhealth.__version__)},
        )
        # the orchestrator's versions, from its last answer (None: it stated none)
        self.orchestrator_version: PeerVersion | None = None
        self._token: str | None = None
        self._expires = datetime.min.replace(tzinfo=UTC)

    @classmethod
    def from_credential(cls, path: Path, *, url: str | None = None, insecure: bool = False) -> OperatorClient:
        credential = OperatorCredential.model_validate_json(path.read_text())
        client_cert = None
        if credential.tls_certificate and credential.tls_key:
            client_cert = (credential.tls_certificate.encode(), credential.tls_key.encode())
        return cls(
            url or credential.orchestrator,
            user=credential.user,
            api_key=credential.api_key,
            ca_pem=credential.ca_pem,
            client_cert=client_cert,
            insecure=insecure,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ----------------------------------------------------------------------------------------

    def _login(self) -> None:
        response = self._http.post("/api/v1/auth/token", json={"user": self.user, "api_key": self._api_key})
        token = TokenResponse.model_validate(self._json(response))
        self._token = token.access_token
        self._expires = token.expires_at

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send an authenticated request (logging in or renewing the token as needed); raise on 4xx/5xx."""
        if self._token is None or datetime.now(UTC) > self._expires - timedelta(seconds=30):
            self._login()
        response = self._http.request(
            method, path, headers={"Authorization": f"Bearer {self._token}"}, **kwargs
        )
        if response.status_code == 401:  # expired early (clock skew) or revoked key: log in once more
            self._login()
            response = self._http.request(
                method, path, headers={"Authorization": f"Bearer {self._token}"}, **kwargs
            )
        self.orchestrator_version = PeerVersion.from_headers(response.headers)
        if response.status_code >= 400:
            raise _error(response)
        return response

    def _parse(self, model: type[M], data: Any) -> M:
        """A message from the orchestrator: fields a newer orchestrator added are dropped, not refused."""
        version = self.orchestrator_version
        return from_peer(model, data, version.protocol if version is not None else None)

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    # --- sites and users ---------------------------------------------------------------------------------

    def add_site(self, name: str) -> SiteCreated:
        return self._parse(SiteCreated, self.request("POST", "/api/v1/sites", json={"name": name}).json())

    def new_enrollment_token(self, name: str) -> SiteCreated:
        return self._parse(SiteCreated, self.request("POST", f"/api/v1/sites/{name}/enrollment-token").json())

    def rotate_site(self, name: str) -> SiteCreated:
        """Retire the site's key and certificate; returns the enrollment token for its new key."""
        return SiteCreated.model_validate(self.request("POST", f"/api/v1/sites/{name}/rotate").json())

    def revoke_site(self, name: str) -> SiteInfo:
        return self._parse(SiteInfo, self.request("POST", f"/api/v1/sites/{name}/revoke").json())

    def sites(self) -> list[SiteInfo]:
        return [self._parse(SiteInfo, s) for s in self.request("GET", "/api/v1/sites").json()]

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
        return self._parse(
            UserCreated, self.request("POST", "/api/v1/users", json={"name": name, "role": role}).json()
        )

    def new_api_key(self, name: str) -> UserCreated:
        """Replace a user's API key; the old key and the tokens issued against it stop working."""
        return UserCreated.model_validate(self.request("POST", f"/api/v1/users/{name}/api-key").json())

    def revoke_user(self, name: str) -> None:
        self.request("POST", f"/api/v1/users/{name}/revoke")

    def users(self) -> list[UserInfo]:
        return [self._parse(UserInfo, u) for u in self.request("GET", "/api/v1/users").json()]

    # --- studies -----------------------------------------------------------------------------------------

    def create_study(self, spec: StudySpec, *, approval_wait_s: float | None = None) -> StudyInfo:
        """Submit an unsigned spec (sites see it as unsigned); see :meth:`submit_study`."""
        params = {"approval_wait_s": approval_wait_s} if approval_wait_s is not None else None
        return self._parse(
            StudyInfo,
            self.request("POST", "/api/v1/studies", json=spec.model_dump(mode="json"), params=params).json(),
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
        response = self.request("POST", "/api/v1/governance/studies", json=body, params=params)
        return self._parse(StudyInfo, response.json())

    def study(self, study_id: str) -> StudyInfo:
        return self._parse(StudyInfo, self.request("GET", f"/api/v1/studies/{study_id}").json())

    def studies(self, status: StudyStatus | None = None) -> list[StudyInfo]:
        params = {"status": status.value} if status is not None else None
        return [
            self._parse(StudyInfo, s) for s in self.request("GET", "/api/v1/studies", params=params).json()
        ]

    def cancel_study(self, study_id: str) -> StudyInfo:
        return self._parse(StudyInfo, self.request("POST", f"/api/v1/studies/{study_id}/cancel").json())

    def model_bytes(self, study_id: str) -> bytes:
        """The study's latest released model (its owner or an admin)."""
        return self.request("GET", f"/api/v1/studies/{study_id}/model").content

    def download_model(self, study_id: str, path: Path) -> str:
        """Write the study's current model (safetensors) to ``path``; returns its sha256."""
        blob = self.model_bytes(study_id)
        path.write_bytes(blob)
        return hashlib.sha256(blob).hexdigest()

    def released_model(self, digest: str) -> bytes:
        """A released model version by digest (its study's owner or an admin)."""
        return self.request("GET", f"/api/v1/models/{digest}").content

    def report(self, study_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/studies/{study_id}/report").json()  # type: ignore[no-any-return]

    def site_readiness(self) -> list[SiteReadinessInfo]:
        """Each site's latest ``fedhealth site check`` report."""
        return [
            self._parse(SiteReadinessInfo, r) for r in self.request("GET", "/api/v1/sites/readiness").json()
        ]

    def wait_for_study(
        self,
        study_id: str,
        *,
        timeout: float = 600.0,
        interval: float = 0.1,
        on_progress: Any = None,
    ) -> StudyInfo:
        """Poll until the study has ended (it may wait for approvals, then run); transient connection errors
        are waited out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = self.study(study_id)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(interval)
                continue
            if on_progress is not None:
                on_progress(info)
            if info.status not in (StudyStatus.RUNNING, StudyStatus.AWAITING_APPROVAL):
                return info
            if time.monotonic() > deadline:
                raise ClientError(408, f"study {study_id} still {info.status.value} after {timeout:.0f} s")
            time.sleep(interval)


def signing_key_path(credential: Path) -> Path:
    """Where an operator's spec-signing key lives by default: beside the credential file."""
    return credential.with_name(credential.name.removesuffix(".credential") + ".signing.key")


def load_signing_key(path: Path) -> IdentityKey:
    """The operator's spec-signing key at ``path``, made (mode 0600) on first use."""
    if not path.exists():
        IdentityKey.generate().save(path)
    return IdentityKey.load(path)


def _error(response: httpx.Response) -> ClientError:
    try:
        body = response.json()
        return ClientError(response.status_code, str(body.get("error")), body.get("detail"))
    except ValueError:
        return ClientError(response.status_code, response.text[:500])
