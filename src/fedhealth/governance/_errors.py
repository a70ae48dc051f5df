"""Governance errors, derived from fedhealth.core's tree.

GovernanceError (core)
├── TaskRefusedError          a task was refused; carries the refusing Decision
└── AuditIntegrityError       an audit log failed verification; carries the BadEntry
InputError (core)
├── ConsentImportError        a consent file has a bad row or resource (the message names it)
└── AuditFormatError          an audit export file is not one fedhealth wrote
ConfigError (core)
└── PolicyError               a site policy file is unusable (the message names the key)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedhealth.core import ConfigError, GovernanceError, InputError

if TYPE_CHECKING:
    from fedhealth.governance._audit import BadEntry
    from fedhealth.governance._decision import Decision


class TaskRefusedError(GovernanceError):
    """A governance rule refused a task. ``decision`` says which rule and why."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(f"{decision.rule}: {decision.reason}")
        self.decision = decision


class AuditIntegrityError(GovernanceError):
    """An audit log failed verification. ``bad`` names the first bad entry."""

    def __init__(self, bad: BadEntry) -> None:
        super().__init__(bad.describe())
        self.bad = bad


class ConsentImportError(InputError):
    """A consent file has a bad row or resource; the message names the line or resource."""


class AuditFormatError(InputError):
    """An audit export file is not in the format fedhealth writes."""


class PolicyError(ConfigError):
    """A site policy is unusable; the message names the offending key."""
