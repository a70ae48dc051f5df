"""Runtime: what a task does, independent of transport (site-side training and evaluation, server-side
initialization and aggregation), composed from learning, data and the protocol's wire types.

It sits between the two services and the domain packages so that the orchestrator and the agent share one
definition of a round, and so that tests can drive a whole round in memory.
"""

from fedhealth.runtime._memory import InMemoryResult, run_study_in_memory
from fedhealth.runtime._privacy import (
    REPRODUCIBLE_NOISE_ENV,
    central_noise_on_mean,
    check_privacy,
    noise_multiplier,
    planned_epsilon,
    privacy_summary,
    reproducible_noise_enabled,
    sample_rate,
    site_level_epsilon,
    study_plan,
    task_plan,
)
from fedhealth.runtime._recipes import (
    check_dataset_fits,
    check_recipe,
    initial_model,
    param_specs,
    recipe_capabilities,
    recipe_spec,
    study_recipe,
)
from fedhealth.runtime._secure import (
    MAX_LOSS,
    SecureSum,
    SecureSumRejected,
    check_sum,
    decode_sum,
    encode_contribution,
    secure_codec,
    site_weight,
)
from fedhealth.runtime._tasks import (
    TrainOutcome,
    aggregate,
    bound_update_norm,
    bounded_updates,
    decode_update,
    encode_update,
    evaluate_on_site,
    preset_study,
    server_step,
    strategy_config,
    strategy_spec,
    summarize,
    train_on_site,
)

__all__ = [
    "MAX_LOSS",
    "REPRODUCIBLE_NOISE_ENV",
    "InMemoryResult",
    "SecureSum",
    "SecureSumRejected",
    "TrainOutcome",
    "aggregate",
    "bound_update_norm",
    "bounded_updates",
    "central_noise_on_mean",
    "check_dataset_fits",
    "check_privacy",
    "check_recipe",
    "check_sum",
    "decode_sum",
    "decode_update",
    "encode_contribution",
    "encode_update",
    "evaluate_on_site",
    "initial_model",
    "noise_multiplier",
    "param_specs",
    "planned_epsilon",
    "preset_study",
    "privacy_summary",
    "recipe_capabilities",
    "recipe_spec",
    "reproducible_noise_enabled",
    "run_study_in_memory",
    "sample_rate",
    "secure_codec",
    "server_step",
    "site_level_epsilon",
    "site_weight",
    "strategy_config",
    "strategy_spec",
    "study_plan",
    "study_recipe",
    "summarize",
    "task_plan",
    "train_on_site",
]
