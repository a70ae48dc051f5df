"""Runtime: what a task does, independent of transport (site-side training and evaluation, server-side
initialization and aggregation), composed from learning, data and the protocol's wire types.

It sits between the two services and the domain packages so that the orchestrator and the agent share one
definition of a round, and so that tests can drive a whole round in memory.
"""

from fedhealth.runtime._memory import InMemoryResult, run_study_in_memory
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
    strategy_config,
    strategy_spec,
    summarize,
    train_on_site,
)

__all__ = [
    "InMemoryResult",
    "TrainOutcome",
    "aggregate",
    "check_dataset_fits",
    "decode_update",
    "encode_update",
    "evaluate_on_site",
    "initial_model",
    "logreg_config",
    "param_specs",
    "preset_study",
    "recipe_spec",
    "run_study_in_memory",
    "strategy_config",
    "strategy_spec",
    "summarize",
    "train_on_site",
]
