"""Wire messages for enrollment and authentication (version 1)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AwareDatetime, Field

from fedhealth.protocol._models import Message, Name

Hex = Annotated[str, Field(pattern=r"^[0-9a-f]+$", max_length=256)]


class Role(StrEnum):
    """Who may do what. ``site`` is for agents; the others are people using the operator API."""

    ADMIN = "admin"  # everything, including sites, users and revocation
    RESEARCHER = "researcher"  # submit, watch and cancel studies; read results
    AUDITOR = "auditor"  # read-only: studies, reports, audit
    SITE = "site"


OPERATOR_ROLES = (Role.ADMIN, Role.RESEARCHER, Role.AUDITOR)


class SiteCreated(Message):
    """Answer to ``POST /api/v1/sites``: the one-time enrollment token to hand to the site, out of band."""

    name: str
    enrollment_token: str
    expires_at: datetime


class EnrollRequest(Message):
    site: Name
    token: Annotated[str, Field(min_length=16, max_length=200)]
    public_key: Annotated[Hex, Field(min_length=64, max_length=64, description="raw Ed25519 public key, hex")]
    tls_csr: Annotated[
        str | None, Field(max_length=8000, description="PEM CSR for a TLS client certificate")
    ] = None


class EnrollResponse(Message):
    site: str
    enrolled_at: datetime
    tls_certificate: str | None = Field(default=None, description="PEM client certificate (for mutual TLS)")


class ChallengeRequest(Message):
    site: Name


class ChallengeResponse(Message):
    challenge: Hex
    expires_at: datetime


class AgentTokenRequest(Message):
    site: Name
    challenge: Hex
    signature: Annotated[Hex, Field(min_length=128, max_length=128, description="Ed25519 signature, hex")]


class OperatorTokenRequest(Message):
    user: Name
    api_key: Annotated[str, Field(min_length=16, max_length=200)]


class TokenResponse(Message):
    access_token: str
    token_type: str = "bearer"  # noqa: S105 - the OAuth token type, not a secret
    # with its offset: the agent and the operator client compare it with their own clock, and a naive
    # one made that comparison raise out of every call (tests/agent/test_time_attacks.py)
    expires_at: AwareDatetime
    role: Role


class UserCreate(Message):
    name: Name
    role: Role


class UserCreated(Message):
    """The API key is shown once; the orchestrator keeps only its hash."""

    name: str
    role: Role
    api_key: str


class UserInfo(Message):
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None


class OperatorCredential(Message):
    """What an operator CLI needs to reach the orchestrator; ``orchestrator init`` writes it (mode 0600)."""

    orchestrator: str = Field(description="base URL, e.g. https://orchestrator.example:8443")
    ca_pem: str = Field(description="the federation CA certificate, PEM")
    user: Name
    api_key: str
    tls_certificate: str | None = Field(default=None, description="PEM client certificate (mutual TLS)")
    tls_key: str | None = Field(default=None, description="PEM key of the client certificate")


def agent_login_message(site: str, challenge: str) -> dict[str, object]:
    """What a site signs to log in: bound to its name, the server's fresh challenge and the purpose."""
    return {"purpose": "fedhealth-agent-login", "protocol": 1, "site": site, "challenge": challenge}
