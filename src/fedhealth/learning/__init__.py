"""Learning: model recipes and their registry, server strategies, metrics and the benchmark presets.

A recipe is a plug-in (:class:`Recipe`, registered through the entry-point group ``fedhealth.recipes``,
looked up by :func:`resolve_recipe`); the built-in ones are logistic regression (``logreg``, DP-SGD included)
and the data-free ``synthetic`` benchmark model. Their numerics are pure numpy functions of (parameters,
data, config, generator); strategies turn the sites' mean update into the next global model. Nothing here
knows about HTTP, the database or the wire format: fedhealth.runtime maps ``fedhealth.protocol``'s
``RecipeSpec {name, version, params}`` onto a :class:`ResolvedRecipe` and the strategy spec onto
:class:`StrategyConfig`.
"""

from fedhealth.learning._collective_probe import (
    COLLECTIVE_PROBE_RECIPE,
    CollectiveProbeRecipe,
    ProbeParams,
    probe_expected,
    probe_values,
)
from fedhealth.learning._collectives import (
    BenchmarkCollectives,
    Collectives,
    InMemoryCollectives,
    InMemorySession,
    SessionMember,
    run_in_memory,
)
from fedhealth.learning._config import LocalOptimizer, LogRegConfig, StrategyConfig, StrategyKind
from fedhealth.learning._dp_presets import (
    HEART_DISEASE_DP_DELTAS,
    HEART_DISEASE_DP_EPSILONS,
    HEART_DISEASE_DP_PRESETS,
    HEART_DISEASE_TRAIN_RECORDS,
    DpPreset,
    dp_noise_multiplier,
)
from fedhealth.learning._errors import (
    RecipeError,
    RecipeParamsError,
    TrainingDivergedError,
    UnknownRecipeError,
)
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
from fedhealth.learning._logreg_recipe import LOGREG_RECIPE, LogRegParams, LogRegRecipe
from fedhealth.learning._metrics import MetricSummary, mean_metrics, weighted_metrics
from fedhealth.learning._presets import BREAST_CANCER_PRESETS, HEART_DISEASE_PRESETS, StudyPreset
from fedhealth.learning._recipe import (
    CollectiveRecipe,
    CombinationPattern,
    DataSchema,
    DpLevel,
    ModelExport,
    Recipe,
    RecipeCapabilities,
    RecordDp,
    ReferenceStep,
    RoundsRecipe,
    SessionContext,
    SessionDpRecipe,
    SiteSessionOutcome,
    TemplateParam,
)
from fedhealth.learning._registry import (
    RECIPE_ENTRY_POINT_GROUP,
    RecipeRegistry,
    ResolvedRecipe,
    default_registry,
    load_recipe,
    reload_recipes,
    resolve_recipe,
)
from fedhealth.learning._results import EvalResult, TrainResult
from fedhealth.learning._rng import task_rng
from fedhealth.learning._stats import (
    STATS_RECIPE,
    StatsParams,
    StatsRecipe,
    exact_secure_sum,
    run_stats_in_memory,
)
from fedhealth.learning._strategies import apply_strategy, strategy_state_specs, weighted_mean
from fedhealth.learning._synthetic import (
    SYNTHETIC_RECIPE,
    SYNTHETIC_STEP_SCALE,
    SyntheticParams,
    SyntheticRecipe,
    synthetic_init,
    synthetic_train,
)

__all__ = [
    "BREAST_CANCER_PRESETS",
    "COLLECTIVE_PROBE_RECIPE",
    "HEART_DISEASE_DP_DELTAS",
    "HEART_DISEASE_DP_EPSILONS",
    "HEART_DISEASE_DP_PRESETS",
    "HEART_DISEASE_PRESETS",
    "HEART_DISEASE_TRAIN_RECORDS",
    "LOGREG_RECIPE",
    "RECIPE_ENTRY_POINT_GROUP",
    "STATS_RECIPE",
    "SYNTHETIC_RECIPE",
    "SYNTHETIC_STEP_SCALE",
    "BenchmarkCollectives",
    "CollectiveProbeRecipe",
    "CollectiveRecipe",
    "Collectives",
    "CombinationPattern",
    "DataSchema",
    "DpLevel",
    "DpPreset",
    "EvalResult",
    "InMemoryCollectives",
    "InMemorySession",
    "LocalOptimizer",
    "LogRegConfig",
    "LogRegParams",
    "LogRegRecipe",
    "MetricSummary",
    "ModelExport",
    "ProbeParams",
    "Recipe",
    "RecipeCapabilities",
    "RecipeError",
    "RecipeParamsError",
    "RecipeRegistry",
    "RecordDp",
    "ReferenceStep",
    "ResolvedRecipe",
    "RoundsRecipe",
    "SessionContext",
    "SessionDpRecipe",
    "SessionMember",
    "SiteSessionOutcome",
    "StatsParams",
    "StatsRecipe",
    "StrategyConfig",
    "StrategyKind",
    "StudyPreset",
    "SyntheticParams",
    "SyntheticRecipe",
    "TemplateParam",
    "TrainResult",
    "TrainingDivergedError",
    "UnknownRecipeError",
    "apply_strategy",
    "bce_with_logits",
    "default_registry",
    "dp_noise_multiplier",
    "exact_secure_sum",
    "load_recipe",
    "logreg_evaluate",
    "logreg_init",
    "logreg_objective",
    "logreg_param_specs",
    "logreg_per_example_gradients",
    "logreg_predict_proba",
    "logreg_train",
    "logreg_train_dp",
    "mean_metrics",
    "probe_expected",
    "probe_values",
    "reload_recipes",
    "resolve_recipe",
    "run_in_memory",
    "run_stats_in_memory",
    "strategy_state_specs",
    "synthetic_init",
    "synthetic_train",
    "task_rng",
    "weighted_mean",
    "weighted_metrics",
]
