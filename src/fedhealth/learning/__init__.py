"""Learning: model recipes, server strategies, metrics and the benchmark presets.

Recipes are pure numpy functions of (parameters, data, config, generator); strategies turn the sites' mean
update into the next global model. Nothing here knows about HTTP, the database or the wire format: the
services map ``fedhealth.protocol``'s specs onto :class:`LogRegConfig` / :class:`StrategyConfig`.
"""

from fedhealth.learning._config import LocalOptimizer, LogRegConfig, StrategyConfig, StrategyKind
from fedhealth.learning._dp_presets import (
    HEART_DISEASE_DP_DELTAS,
    HEART_DISEASE_DP_EPSILONS,
    HEART_DISEASE_DP_PRESETS,
    HEART_DISEASE_TRAIN_RECORDS,
    DpPreset,
    dp_noise_multiplier,
)
from fedhealth.learning._errors import TrainingDivergedError
from fedhealth.learning._logreg import (
    bce_with_logits,
    logreg_evaluate,
    logreg_init,
    logreg_objective,
    logreg_param_specs,
    logreg_per_example_gradients,
    logreg_predict_proba,
    logreg_train,
)
from fedhealth.learning._logreg_dp import logreg_train_dp
from fedhealth.learning._metrics import MetricSummary, mean_metrics, weighted_metrics
from fedhealth.learning._presets import BREAST_CANCER_PRESETS, HEART_DISEASE_PRESETS, StudyPreset
from fedhealth.learning._results import EvalResult, TrainResult
from fedhealth.learning._rng import task_rng
from fedhealth.learning._strategies import apply_strategy, strategy_state_specs, weighted_mean
from fedhealth.learning._synthetic import SYNTHETIC_STEP_SCALE, synthetic_init, synthetic_train

__all__ = [
    "BREAST_CANCER_PRESETS",
    "HEART_DISEASE_DP_DELTAS",
    "HEART_DISEASE_DP_EPSILONS",
    "HEART_DISEASE_DP_PRESETS",
    "HEART_DISEASE_PRESETS",
    "HEART_DISEASE_TRAIN_RECORDS",
    "SYNTHETIC_STEP_SCALE",
    "DpPreset",
    "EvalResult",
    "LocalOptimizer",
    "LogRegConfig",
    "MetricSummary",
    "StrategyConfig",
    "StrategyKind",
    "StudyPreset",
    "TrainResult",
    "TrainingDivergedError",
    "apply_strategy",
    "bce_with_logits",
    "dp_noise_multiplier",
    "logreg_evaluate",
    "logreg_init",
    "logreg_objective",
    "logreg_param_specs",
    "logreg_per_example_gradients",
    "logreg_predict_proba",
    "logreg_train",
    "logreg_train_dp",
    "mean_metrics",
    "strategy_state_specs",
    "synthetic_init",
    "synthetic_train",
    "task_rng",
    "weighted_mean",
    "weighted_metrics",
]
