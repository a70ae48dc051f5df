"""The site's home folder: its identity key (never leaves the site), the pinned federation CA, settings.

HOME/            mode 0700, every file in it 0600: no other local account reads it (checked at start-up)
  identity.key   Ed25519 private key, PKCS#8 PEM
  ca.pem         the federation CA the site pins: it trusts no other certificate authority
  site.json      site name, orchestrator URL, enrollment time
  site.sqlite    consent records (patient ids, decisions), approvals, audit log, privacy ledger
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from fedhealth.agent._client import OrchestratorRefused, TlsVerificationError, connection_problem
from fedhealth.core import ConfigError, ServiceUnavailableError, Tightened, make_private_dir, secure_home
from fedhealth.crypto import IdentityKey, client_tls_for_url, create_client_csr, write_private
from fedhealth.protocol import EnrollResponse
from fedhealth.transport import DeadlineTransport, answer_deadline

# how long the orchestrator's answer to an enrollment may take to arrive whole
ENROLL_ANSWER_S = 60.0


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
    def tls_key_path(self) -> Path:
        return self.root / "tls-client.key"

    @property
    def tls_cert_path(self) -> Path:
        return self.root / "tls-client.pem"

    def client_cert(self) -> tuple[bytes, bytes] | None:
        """(certificate, key) PEM for mutual TLS, if the orchestrator issued one at enrollment."""
        if self.tls_cert_path.exists() and self.tls_key_path.exists():
            return self.tls_cert_path.read_bytes(), self.tls_key_path.read_bytes()
        return None

    @property
    def database_path(self) -> Path:
        return self.root / "site.sqlite"

    @property
    def recipe_state_path(self) -> Path:
        """Where recipes keep state between a study's rounds (agent._site_state)."""
        return self.root / "recipe-state"

    @property
    def policy_path(self) -> Path:
        return self.root / "policy.toml"

    def secure(self) -> Tightened:
        """Make the home 0700 and its files 0600 if they are looser (what changed, for one log line);
        :class:`ConfigError` for a home another account owns."""
        return secure_home(self.root, what="site home")

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
        write_private(self.settings_path, json.dumps(settings, indent=2).encode())


def enroll_site(
    root: Path,
    *,
    name: str,
    orchestrator: str,
    token: str,
    ca_pem: bytes | None,
    serve_url: str | None = None,
    transport: httpx.BaseTransport | None = None,
    insecure: bool = False,
) -> SiteHome:
    """Generate this site's identity key here, register its public key with the enrollment token, pin the CA.

    The private key is written (0600) only after the orchestrator accepted the public key, so a failed
    enrollment leaves nothing behind. Under mutual TLS, ``orchestrator`` is the enrollment listener and
    ``serve_url`` the main one (what the agent will use); the site also sends a CSR for a TLS client key
    generated here, and keeps the certificate the orchestrator returns.

    An ``https://`` orchestrator needs ``ca_pem``: without it the system's authorities would vouch for the
    server, and the token would go to whoever one of them issued a certificate for that name. A redirect is
    not followed (the token would go with it) and, like any answer other than 2xx, is a refusal.
    """
    if transport is None and not ca_pem and orchestrator.strip().lower().startswith("https:"):
        raise ConfigError(
            f"no federation CA to pin for {orchestrator}: give the CA file from the orchestrator's operator "
            "(--ca); the system's certificate authorities are not trusted"
        )
    home = SiteHome(root)
    key = IdentityKey.generate()
    tls_key, tls_csr = create_client_csr(name)
    verify = client_tls_for_url(orchestrator, ca_pem, insecure=insecure)  # http:// only if insecure
    with (
        httpx.Client(
            base_url=orchestrator.strip().rstrip("/"),
            timeout=30,
            transport=transport if transport is not None else DeadlineTransport(verify=verify),
            follow_redirects=False,
            trust_env=False,
        ) as http,
        answer_deadline(time.monotonic() + ENROLL_ANSWER_S),  # headers that trickle included
    ):
        try:
            response = http.post(
                "/api/v1/enroll",
                json={
                    "site": name,
                    "token": token,
                    "public_key": key.public().raw.hex(),
                    "tls_csr": tls_csr.decode(),
                },
            )
        except httpx.TransportError as exc:
            problem = connection_problem(exc)
            if isinstance(problem, TlsVerificationError):
                raise problem from exc
            raise ConfigError(f"cannot reach {orchestrator}: {problem}") from exc
    if not response.is_success:  # a refusal, or a redirect (not followed: the token would go with it)
        try:
            body = response.json()
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict):
            body = {}
        raise OrchestratorRefused(
            response.status_code, str(body.get("error", response.text[:200]))[:500], body.get("detail")
        )
    try:
        enrolled = EnrollResponse.model_validate_json(response.content)
    except ValueError as exc:  # pydantic's ValidationError: not an enrollment answer
        raise ServiceUnavailableError(
            f"enrolling at {orchestrator}: the answer is not an enrollment ({type(exc).__name__})"
        ) from exc
    make_private_dir(root)
    key.save(home.identity_path)
    if enrolled.tls_certificate is not None:
        write_private(home.tls_key_path, tls_key)
        write_private(home.tls_cert_path, enrolled.tls_certificate.encode())
    if ca_pem is not None:
        write_private(home.ca_path, ca_pem)
    write_private(
        home.settings_path,
        json.dumps(
            {
                "site": name,
                "orchestrator": serve_url or orchestrator,  # under mutual TLS the agent uses the main URL
                "enrolled_at": enrolled.enrolled_at.isoformat(),
            },
            indent=2,
        ).encode(),
    )
    return home
