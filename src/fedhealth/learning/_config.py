"""Settings of the built-in recipe and of the server strategies, as immutable values.

These mirror ``fedhealth.protocol``'s ``RecipeSpec`` / ``StrategySpec`` field for field; the learning
layer may not import the protocol layer (they are siblings), so the services map one onto the other.
Validation here repeats the protocol's bounds that matter for the arithmetic, so a config built in-process
fails as early as one that came over the wire.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from fedhealth.core import ConfigError


class LocalOptimizer(StrEnum):
    """The optimizer a site runs on its own data during one round."""

    SGD = "sgd"
    ADAM = "adam"


class StrategyKind(StrEnum):
    """How the orchestrator turns the sites' mean update into the next global model."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    SCAFFOLD = "scaffold"  # Karimi et al. 2020: FedAvg's server step plus the control-variate update


def _is_int(value: object) -> bool:
    """A true integer (Python or numpy), not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _positive_finite(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")


def _non_negative_finite(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a non-negative finite number, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LogRegConfig:
    """Local training of binary logistic regression for one round.

    The local objective is ``mean BCE + l2/2 * ||weight||^2 + proximal_mu/2 * ||theta - theta_global||^2``:
    L2 leaves the bias alone (as scikit-learn does), the FedProx term covers every parameter (Li et al. 2020).
    With ``local_steps`` set a round is exactly that many minibatch steps, walking through freshly shuffled
    epochs and wrapping around; otherwise it is ``local_epochs`` full passes (the last batch of a pass may be
    smaller, like a PyTorch ``DataLoader`` without ``drop_last``).
    """

    n_features: int
    local_epochs: int = 1
    local_steps: int | None = None
    learning_rate: float = 0.05
    batch_size: int = 16
    optimizer: LocalOptimizer = LocalOptimizer.SGD
    l2: float = 0.0
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        if not _is_int(self.n_features) or self.n_features < 1:
            raise ConfigError(f"n_features must be a positive integer, got {self.n_features!r}")
        if not _is_int(self.local_epochs) or self.local_epochs < 0:
            raise ConfigError(f"local_epochs must be a non-negative integer, got {self.local_epochs!r}")
        if self.local_steps is not None and (not _is_int(self.local_steps) or self.local_steps < 1):
            raise ConfigError(f"local_steps must be a positive integer or None, got {self.local_steps!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.optimizer, LocalOptimizer):
            raise ConfigError(f"optimizer must be a LocalOptimizer, got {self.optimizer!r}")
        _positive_finite("learning_rate", self.learning_rate)
        _non_negative_finite("l2", self.l2)
        _non_negative_finite("proximal_mu", self.proximal_mu)


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategyConfig:
    """A server strategy and its hyperparameters (Reddi et al. 2021, "Adaptive Federated Optimization").

    ``server_learning_rate`` is eta; ``beta1``/``beta2`` the first- and second-moment decays (``beta2`` is
    unused by FedAdagrad, whose second moment is a plain running sum); ``tau`` the adaptivity floor.
    """

    kind: StrategyKind = StrategyKind.FEDAVG
    server_learning_rate: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if not isinstance(self.kind, StrategyKind):
            raise ConfigError(f"kind must be a StrategyKind, got {self.kind!r}")
        _positive_finite("server_learning_rate", self.server_learning_rate)
        _positive_finite("tau", self.tau)
        for name, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not math.isfinite(beta) or not 0.0 <= beta < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1), got {beta!r}")

    @property
    def is_adaptive(self) -> bool:
        """Whether the strategy keeps moment state between rounds."""
        return self.kind in (StrategyKind.FEDADAM, StrategyKind.FEDYOGI, StrategyKind.FEDADAGRAD)
