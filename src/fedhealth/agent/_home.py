"""The site's home folder: its identity key (never leaves the site), the pinned federation CA, settings.

HOME/
  identity.key   Ed25519 private key, PKCS#8 PEM, mode 0600
  ca.pem         the federation CA the site pins: it trusts no other certificate authority
  site.json      site name, orchestrator URL, enrollment time
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx

from fedhealth.agent._client import OrchestratorRefused, TlsVerificationError, connection_problem
from fedhealth.core import ConfigError
from fedhealth.crypto import IdentityKey, pinned_tls_context
from fedhealth.protocol import EnrollResponse


@dataclass(frozen=True, slots=True)
class SiteHome:
    root: Path

    @property
    def identity_path(self) -> Path:
        return self.root / "identity.key"

    @property
    def ca_path(self) -> Path:
        return self.root / "ca.pem"

    @property
    def settings_path(self) -> Path:
        return self.root / "site.json"

    @property
    def database_path(self) -> Path:
        return self.root / "site.sqlite"

    @property
    def policy_path(self) -> Path:
        return self.root / "policy.toml"

    def require(self) -> dict[str, str]:
        if not self.settings_path.exists():
            raise ConfigError(
                f"{self.root} is not an enrolled site; run `fedhealth site enroll --home {self.root} ...`"
            )
        return json.loads(self.settings_path.read_text())  # type: ignore[no-any-return]

    @property
    def name(self) -> str:
        return self.require()["site"]

    @property
    def orchestrator(self) -> str:
        return self.require()["orchestrator"]

    def identity(self) -> IdentityKey:
        return IdentityKey.load(self.identity_path)

    def ca_pem(self) -> bytes | None:
        return self.ca_path.read_bytes() if self.ca_path.exists() else None

    def set_orchestrator(self, url: str) -> None:
        settings = self.require()
        settings["orchestrator"] = url
        self.settings_path.write_text(json.dumps(settings, indent=2))


def enroll_site(
    root: Path,
    *,
    name: str,
    orchestrator: str,
    token: str,
    ca_pem: bytes | None,
    transport: httpx.BaseTransport | None = None,
) -> SiteHome:
    """Generate this site's identity key here, register its public key with the enrollment token, pin the CA.

    The private key is written (0600) only after the orchestrator accepted the public key, so a failed
    enrollment leaves nothing behind.
    """
    home = SiteHome(root)
    key = IdentityKey.generate()
    verify = pinned_tls_context(ca_pem) if orchestrator.startswith("https") and ca_pem else True
    with httpx.Client(
        base_url=orchestrator.rstrip("/"), verify=verify, timeout=30, transport=transport
    ) as http:
        try:
            response = http.post(
                "/api/v1/enroll", json={"site": name, "token": token, "public_key": key.public().raw.hex()}
            )
        except httpx.TransportError as exc:
            problem = connection_problem(exc)
            if isinstance(problem, TlsVerificationError):
                raise problem from exc
            raise ConfigError(f"cannot reach {orchestrator}: {problem}") from exc
    if response.status_code >= 400:
        body = (
            response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        )
        raise OrchestratorRefused(
            response.status_code, str(body.get("error", response.text[:200])), body.get("detail")
        )
    enrolled = EnrollResponse.model_validate(response.json())
    root.mkdir(parents=True, exist_ok=True)
    key.save(home.identity_path)
    if ca_pem is not None:
        home.ca_path.write_bytes(ca_pem)
    home.settings_path.write_text(
        json.dumps(
            {"site": name, "orchestrator": orchestrator, "enrolled_at": enrolled.enrolled_at.isoformat()},
            indent=2,
        )
    )
    return home
