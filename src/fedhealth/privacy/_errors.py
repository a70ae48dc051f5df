"""Errors of the privacy package, each under the branch of fedhealth's tree it refines.

ConfigError
└── DpParameterError          a DP parameter (noise, sampling rate, steps, delta, budget) is unusable
ConflictError
└── ReservationStateError     a reservation is committed or released twice, or a task reserves twice
PrivacyError
├── BudgetNotSetError         the site has set no budget for the dataset, so nothing may be spent
├── CalibrationError          no noise multiplier in range reaches the target epsilon
└── BudgetExceededError
    └── TaskOverBudgetError   this task's release would take the dataset over its budget (carries the check)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedhealth.core import BudgetExceededError, ConfigError, ConflictError, PrivacyError

if TYPE_CHECKING:
    from fedhealth.privacy._ledger import BudgetCheck


class DpParameterError(ConfigError):
    """A differential-privacy parameter is outside its valid range."""


class ReservationStateError(ConflictError):
    """The reservation is not in a state that allows the operation (e.g. committed twice)."""


class BudgetNotSetError(PrivacyError):
    """No budget is set for the dataset; the ledger refuses to spend from an undefined budget."""


class CalibrationError(PrivacyError):
    """No noise multiplier within the searched range reaches the target epsilon."""


class TaskOverBudgetError(BudgetExceededError):
    """The planned release would take the dataset over its budget. ``check`` holds the figures."""

    def __init__(self, check: BudgetCheck) -> None:
        super().__init__(check.reason)
        self.check = check
