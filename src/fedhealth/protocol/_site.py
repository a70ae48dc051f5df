"""Wire messages between a site and the orchestrator outside tasks: study approvals and pilot readiness.

A submitted study waits (``awaiting_approval``) until every site it names has reported its data steward's
approval of the spec hash. Sites learn of the specs awaiting them from ``GET /api/v1/agent/approvals`` and
report each decision with ``POST /api/v1/agent/approvals``. A site's ``fedhealth site check`` result travels
as :class:`SiteReadiness`: figures only, never data, file paths or column names.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import Field

from fedhealth.protocol._models import ApprovalState, FiniteFloat, Message, Name, StudySpec

SpecHash = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the spec's canonical JSON")]


class ApprovalReport(Message):
    """A site's data steward decided on a spec hash (the reason stays at the site)."""

    spec_hash: SpecHash
    state: ApprovalState


class PendingSpec(Message):
    """A study spec that awaits this site's decision, with its owner's signature when it was signed."""

    study_id: str
    spec_hash: SpecHash
    spec: StudySpec
    spec_signature: str | None = None
    owner_public_key: str | None = None
    approval_deadline: datetime | None = None


class PendingSpecs(Message):
    specs: list[PendingSpec]


class CheckStatus(StrEnum):
    """One line of a readiness check."""

    OK = "ok"
    WARN = "warn"  # works, but below what a study is likely to need
    FAIL = "fail"  # this site cannot take part until it is fixed
    SKIPPED = "skipped"  # could not be measured (an earlier check failed)


class ReadinessCheck(Message):
    """One measured item: a name from a fixed vocabulary, its status, a figure and its unit."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9_.:-]{1,80}$")]
    status: CheckStatus
    value: FiniteFloat | None = None
    unit: Annotated[str, Field(max_length=16)] = ""
    # a sentence of fixed wording chosen by the agent's code (never a file path, column or patient value)
    note: Annotated[str, Field(max_length=200)] = ""


class SiteReadiness(Message):
    """What ``fedhealth site check`` measured at a site, as sent to the orchestrator."""

    site: Name
    checked_at: datetime
    # a version string, not text: `fedhealth site readiness` prints it in a tab-separated line per site, where
    # a newline forged another site's line and an escape sequence reached the operator's terminal
    # (tests/orchestrator/test_site_report_poisoning_attacks.py)
    software_version: Annotated[str, Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,39}$")]
    protocol_version: int = Field(ge=1)
    ready: bool
    checks: list[ReadinessCheck] = Field(max_length=200)


class SiteReadinessInfo(Message):
    """The operator's view: each site's latest readiness report (None: it never sent one)."""

    site: str
    readiness: SiteReadiness | None


class ProbeEcho(Message):
    """Answer to a bandwidth probe upload: how many bytes the orchestrator received."""

    received_bytes: int = Field(ge=0)
