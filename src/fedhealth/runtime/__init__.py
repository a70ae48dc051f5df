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
from fedhealth.runtime._secure import (
    SecureSum,
    decode_sum,
    encode_contribution,
    secure_codec,
    secure_threshold,
)
from fedhealth.runtime._tasks import (
    TrainOutcome,
    aggregate,
    check_dataset_fits,
    decode_update,
    encode_update,
    evaluate_on_site,
    initial_model,
    logreg_config,
    param_specs,
    preset_study,
    recipe_spec,
    server_step,
    strategy_config,
    strategy_spec,
    summarize,
    train_on_site,
)

__all__ = [
    "REPRODUCIBLE_NOISE_ENV",
    "InMemoryResult",
    "SecureSum",
    "TrainOutcome",
    "aggregate",
    "central_noise_on_mean",
    "check_dataset_fits",
    "check_privacy",
    "decode_sum",
    "decode_update",
    "encode_contribution",
    "encode_update",
    "evaluate_on_site",
    "initial_model",
    "logreg_config",
    "noise_multiplier",
    "param_specs",
    "planned_epsilon",
    "preset_study",
    "privacy_summary",
    "recipe_spec",
    "reproducible_noise_enabled",
    "run_study_in_memory",
    "sample_rate",
    "secure_codec",
    "secure_threshold",
    "server_step",
    "site_level_epsilon",
    "strategy_config",
    "strategy_spec",
    "study_plan",
    "summarize",
    "task_plan",
    "train_on_site",
]
