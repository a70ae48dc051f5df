"""The gates a site agent runs every task through by default (see ``_pipeline``)."""

from __future__ import annotations

from fedhealth.agent._governance import GovernanceGate
from fedhealth.agent._home import SiteHome
from fedhealth.agent._pipeline import SiteGate
from fedhealth.agent._privacy import PrivacyGate


def default_gates(home: SiteHome) -> list[SiteGate]:
    """The built-in gates for the site at ``home``, in order: governance first (approval and policy before
    anything else), then privacy (the budget is reserved only for tasks the steward allows)."""
    return [GovernanceGate.from_home(home), PrivacyGate.from_home(home)]
