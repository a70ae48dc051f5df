"""Errors of the learning layer, under fedhealth.core's tree.

FedHealthError
└── TrainingDivergedError   local training produced non-finite parameters (learning rate too high)
"""

from __future__ import annotations

from fedhealth.core import FedHealthError


class TrainingDivergedError(FedHealthError):
    """Local training produced NaN or infinite parameters; nothing may be uploaded from this round."""
