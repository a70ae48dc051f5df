"""The torch recipe stops at the task's deadline (core/_deadline.py; the agent's side is
tests/agent/test_training_deadline.py): it checks at every step, with or without DP-SGD."""

from __future__ import annotations

import time

import numpy as np
import pytest
from imaging_files import square_images

from fedhealth.core import DeadlinePassedError, work_deadline
from fedhealth.learning import RecordDp, resolve_recipe


@pytest.mark.parametrize("dp", [False, True], ids=["sgd", "dp-sgd"])
def test_the_torch_recipe_stops_at_the_deadline(dp):
    params = {"input_size": 16, "batch_size": 4, "learning_rate": 0.01, "optimizer": "sgd", "norm": "group"}
    r = resolve_recipe("torch", "1", {**params, "local_epochs": 1000})
    data = square_images(24)
    release = (
        RecordDp(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps=100_000) if dp else None
    )
    started = time.monotonic()
    with work_deadline(0.5), pytest.raises(DeadlinePassedError):
        r.train(r.init(0), data, np.random.default_rng(0), record_dp=release)
    assert time.monotonic() - started < 30
