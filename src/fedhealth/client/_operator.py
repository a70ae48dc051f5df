"""The operator API client."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from fedhealth.core import FedHealthError
from fedhealth.crypto import client_tls_for_url
from fedhealth.protocol import (
    OperatorCredential,
    SiteCreated,
    SiteInfo,
    StudyInfo,
    StudySpec,
    StudyStatus,
    TokenResponse,
    UserCreated,
    UserInfo,
)


class ClientError(FedHealthError):
    """The orchestrator answered with an error; ``status`` and ``error`` are its own."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(f"{status} {error}" + (f": {detail}" if detail else ""))
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
            headers={"User-Agent": "fedhealth-operator"},
        )
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
        if response.status_code >= 400:
            raise _error(response)
        return response

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    # --- sites and users ---------------------------------------------------------------------------------

    def add_site(self, name: str) -> SiteCreated:
        return SiteCreated.model_validate(self.request("POST", "/api/v1/sites", json={"name": name}).json())

    def new_enrollment_token(self, name: str) -> SiteCreated:
        return SiteCreated.model_validate(
            self.request("POST", f"/api/v1/sites/{name}/enrollment-token").json()
        )

    def rotate_site(self, name: str) -> SiteCreated:
        """Retire the site's key and certificate; returns the enrollment token for its new key."""
        return SiteCreated.model_validate(self.request("POST", f"/api/v1/sites/{name}/rotate").json())

    def revoke_site(self, name: str) -> SiteInfo:
        return SiteInfo.model_validate(self.request("POST", f"/api/v1/sites/{name}/revoke").json())

    def sites(self) -> list[SiteInfo]:
        return [SiteInfo.model_validate(s) for s in self.request("GET", "/api/v1/sites").json()]

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
        return UserCreated.model_validate(
            self.request("POST", "/api/v1/users", json={"name": name, "role": role}).json()
        )

    def new_api_key(self, name: str) -> UserCreated:
        """Replace a user's API key; the old key and the tokens issued against it stop working."""
        return UserCreated.model_validate(self.request("POST", f"/api/v1/users/{name}/api-key").json())

    def revoke_user(self, name: str) -> None:
        self.request("POST", f"/api/v1/users/{name}/revoke")

    def users(self) -> list[UserInfo]:
        return [UserInfo.model_validate(u) for u in self.request("GET", "/api/v1/users").json()]

    # --- studies -----------------------------------------------------------------------------------------

    def create_study(self, spec: StudySpec) -> StudyInfo:
        return StudyInfo.model_validate(
            self.request("POST", "/api/v1/studies", json=spec.model_dump(mode="json")).json()
        )

    def study(self, study_id: str) -> StudyInfo:
        return StudyInfo.model_validate(self.request("GET", f"/api/v1/studies/{study_id}").json())

    def studies(self) -> list[StudyInfo]:
        return [StudyInfo.model_validate(s) for s in self.request("GET", "/api/v1/studies").json()]

    def cancel_study(self, study_id: str) -> StudyInfo:
        return StudyInfo.model_validate(self.request("POST", f"/api/v1/studies/{study_id}/cancel").json())

    def model_bytes(self, study_id: str) -> bytes:
        """The study's latest released model (its owner or an admin)."""
        return self.request("GET", f"/api/v1/studies/{study_id}/model").content

    def released_model(self, digest: str) -> bytes:
        """A released model version by digest (its study's owner or an admin)."""
        return self.request("GET", f"/api/v1/models/{digest}").content

    def report(self, study_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/studies/{study_id}/report").json()  # type: ignore[no-any-return]

    def wait_for_study(
        self,
        study_id: str,
        *,
        timeout: float = 600.0,
        interval: float = 0.1,
        on_progress: Any = None,
    ) -> StudyInfo:
        """Poll until the study leaves ``running``; transient connection errors are waited out."""
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
            if info.status is not StudyStatus.RUNNING:
                return info
            if time.monotonic() > deadline:
                raise ClientError(408, f"study {study_id} still running after {timeout:.0f} s")
            time.sleep(interval)


def _error(response: httpx.Response) -> ClientError:
    try:
        body = response.json()
        return ClientError(response.status_code, str(body.get("error")), body.get("detail"))
    except ValueError:
        return ClientError(response.status_code, response.text[:500])
