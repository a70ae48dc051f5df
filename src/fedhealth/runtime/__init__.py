"""Runtime: what a task does, independent of transport (site-side training and evaluation, server-side
initialization and aggregation), composed from learning, data and the protocol's wire types.

It sits between the two services and the domain packages so that the orchestrator and the agent share one
definition of a round, and so that tests can drive a whole round in memory.
"""

from fedhealth.runtime._memory import InMemoryResult, run_study_in_memory
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
    "InMemoryResult",
    "SecureSum",
    "TrainOutcome",
    "aggregate",
    "check_dataset_fits",
    "decode_sum",
    "decode_update",
    "encode_contribution",
    "encode_update",
    "evaluate_on_site",
    "initial_model",
    "logreg_config",
    "param_specs",
    "preset_study",
    "recipe_spec",
    "run_study_in_memory",
    "secure_codec",
    "secure_threshold",
    "server_step",
    "strategy_config",
    "strategy_spec",
    "summarize",
    "train_on_site",
]
