"""The features the orchestrator runs with by default, each an :class:`Extension` (routes and state)."""

from __future__ import annotations

from fedhealth.orchestrator._governance import GovernanceExtension
from fedhealth.orchestrator._privacy import PrivacyExtension
from fedhealth.orchestrator._service import Extension


def default_extensions() -> list[Extension]:
    """Every built-in extension, in the order their observers are called."""
    return [GovernanceExtension(), PrivacyExtension()]
