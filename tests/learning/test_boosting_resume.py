"""A boosting session that failed mid-training, retried: every site checkpointed its model after each
round in its own directory, the sites agree on the last round all of them completed, and the retried
session continues from it (LightGBM's init_model, XGBoost's xgb_model) to the model of an uninterrupted
run, bit for bit."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedhealth.learning import (
    InMemorySession,
    LightGbmParams,
    RecipeParamsError,
    XGBoostParams,
    resolve_recipe,
    train_pooled,
    train_site,
    train_site_xgboost,
)
from fedhealth.learning._boosting import TreeCheckpoint, agree_resume
from fedhealth.secagg import SessionFailedError

SITES = ["center-0", "center-1", "center-2", "center-3"]


class Crash(RuntimeError):
    pass


def _run(train, params, datasets, dirs=None, crash_at=None, counted=None):
    """The session; ``crash_at``: center-2 dies at its call of that number (a share of ``counted``, the
    calls of a whole run, when a float); ``counted``: a list that gets the number of center-2's calls."""
    session = InMemorySession(SITES, call_timeout_s=60)
    if isinstance(crash_at, float):
        crash_at = round(crash_at * counted[0])

    def program(member):
        if member.site == "center-2":
            original, calls = member.secure_sum, [0]

            def secure_sum(values):
                calls[0] += 1
                if calls[0] == crash_at:
                    raise Crash("center-2's process died")
                return original(values)

            member.secure_sum = secure_sum
            if counted is not None and crash_at is None:
                counted.append(calls)
        directory = dirs[member.site] if dirs is not None else None
        return train(params, datasets[SITES.index(member.site)], member, directory)

    out = session.run(program)
    if counted is not None and crash_at is None:
        counted[:] = [counted[0][0]]
    return out


def _dirs(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for site in SITES:
        (tmp_path / site).mkdir()
        out[site] = tmp_path / site
    return out


@pytest.mark.parametrize(
    ("train", "params", "crash_at"),
    [
        (train_site, LightGbmParams(n_features=13, num_rounds=12, num_leaves=8, retries=1), 0.6),
        (
            train_site,
            LightGbmParams(
                n_features=13,
                num_rounds=40,
                learning_rate=0.5,
                num_leaves=8,
                early_stopping_rounds=3,
                retries=2,
            ),
            0.6,
        ),
        (
            train_site,
            LightGbmParams(
                n_features=13,
                num_rounds=40,
                learning_rate=0.5,
                num_leaves=8,
                early_stopping_rounds=3,
                early_stopping_metric="auc",
                retries=1,
            ),
            0.6,
        ),
        (train_site_xgboost, XGBoostParams(n_features=13, num_rounds=12, max_depth=3, retries=1), 0.6),
        (
            train_site_xgboost,
            XGBoostParams(
                n_features=13, num_rounds=40, learning_rate=0.8, early_stopping_rounds=3, retries=1
            ),
            0.6,
        ),
    ],
    ids=["lightgbm", "lightgbm-early-stopping", "lightgbm-auc-stopping", "xgboost", "xgboost-early-stopping"],
)
def test_a_retried_session_resumes_from_the_last_common_round_to_the_uninterrupted_model(
    centers, tmp_path, train, params, crash_at
):
    counted: list[Any] = []
    uninterrupted = _run(train, params, centers, counted=counted)
    dirs = _dirs(tmp_path)
    with pytest.raises(Crash):
        _run(train, params, centers, dirs, crash_at=crash_at, counted=counted)
    resumed = _run(train, params, centers, dirs)
    (model, calls), *_ = resumed.values()
    assert calls["resumed_from"] >= 1  # the checkpoints were used
    assert {c["resumed_from"] for _, c in resumed.values()} == {calls["resumed_from"]}
    first, _ = uninterrupted[SITES[0]]
    assert model == first  # the same trees and bins, bit for bit
    assert all(m == model for m, _ in resumed.values())


def test_the_resumed_lightgbm_model_is_the_pooled_one(centers, tmp_path):
    params = LightGbmParams(n_features=13, num_rounds=10, num_leaves=8, retries=1)
    dirs = _dirs(tmp_path)
    with pytest.raises(Crash):
        _run(train_site, params, centers, dirs, crash_at=50)
    (model, calls), *_ = _run(train_site, params, centers, dirs).values()
    assert calls["resumed_from"] >= 1
    pooled = train_pooled(params, centers)
    assert model.model_text.split("end of trees")[0] == pooled.model_text.split("end of trees")[0]


def test_sites_resume_from_the_fewest_rounds_any_of_them_completed():
    def agreed(done: dict[str, int]) -> set[int]:
        session = InMemorySession(["a", "b", "c"], call_timeout_s=30)
        return set(session.run(lambda m: agree_resume(m, done[m.site], 10)).values())

    assert agreed({"a": 7, "b": 5, "c": 9}) == {5}
    assert agreed({"a": 10, "b": 10, "c": 10}) == {10}
    assert agreed({"a": 4, "b": 0, "c": 4}) == {0}


def test_a_checkpoint_of_other_params_or_data_is_ignored_and_written_private(tmp_path):
    checkpoint = TreeCheckpoint(tmp_path / "checkpoints" / "study", recipe="lightgbm", key="k1")
    checkpoint.save(3, "model text", [0.5, 0.4, 0.3])
    assert (checkpoint.path.stat().st_mode & 0o777) == 0o600
    for folder in (tmp_path / "checkpoints", tmp_path / "checkpoints" / "study"):
        assert (folder.stat().st_mode & 0o777) == 0o700
    saved = checkpoint.load()
    assert saved is not None
    assert (saved.rounds, saved.model, saved.scores) == (3, "model text", [0.5, 0.4, 0.3])
    assert TreeCheckpoint(checkpoint.path.parent, recipe="lightgbm", key="k2").load() is None
    checkpoint.path.write_text("{not json")
    assert checkpoint.load() is None


_KILLED_WHILE_SAVING = """
import os, signal, sys
from pathlib import Path
from fedhealth.learning._boosting import TreeCheckpoint
os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # killed after writing, before renaming
TreeCheckpoint(Path(sys.argv[1]), recipe="lightgbm", key="k1").save(4, "model of round 4", [0.2])
"""


def test_a_site_killed_while_saving_keeps_its_last_checkpoint_and_the_next_session_clears_the_leftover(
    tmp_path,
):
    folder = tmp_path / "checkpoints" / "study"
    checkpoint = TreeCheckpoint(folder, recipe="lightgbm", key="k1")
    checkpoint.save(3, "model of round 3", [0.3])
    other = folder / ".unrelated.json.abc.tmp"  # not this checkpoint's: left alone
    other.write_text("x")
    run = subprocess.run([sys.executable, "-c", _KILLED_WHILE_SAVING, str(folder)], check=False)
    assert run.returncode == -signal.SIGKILL
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.startswith(".lightgbm-checkpoint.json."))
    assert len(leftovers) == 1
    assert leftovers[0].endswith(".tmp")
    saved = TreeCheckpoint(folder, recipe="lightgbm", key="k1").load()  # the next session opens it
    assert saved is not None
    assert (saved.rounds, saved.model) == (3, "model of round 3")
    assert sorted(p.name for p in folder.iterdir()) == [".unrelated.json.abc.tmp", "lightgbm-checkpoint.json"]


def test_without_a_checkpoint_the_failed_session_fails_every_site_and_restarts_from_zero(centers, tmp_path):
    params = LightGbmParams(n_features=13, num_rounds=6, num_leaves=4, retries=1)
    errors: list[BaseException] = []
    try:
        _run(train_site, params, centers, None, crash_at=20)
    except Crash as exc:
        errors.append(exc)
    assert errors
    (_, calls), *_ = _run(train_site, params, centers, None).values()
    assert calls["resumed_from"] == 0


@pytest.mark.parametrize("recipe", ["lightgbm", "xgboost"])
@pytest.mark.parametrize("retries", [-1, 4])
def test_retries_out_of_range_are_one_line(recipe, retries):
    with pytest.raises(RecipeParamsError, match=r"recipe\.params\.retries: Input should be") as err:
        resolve_recipe(recipe, "1", {"n_features": 13, "retries": retries})
    assert "\n" not in str(err.value)


def test_the_retries_are_part_of_the_recipe_and_the_rules(centers):
    assert resolve_recipe("xgboost", "1", {"n_features": 13, "retries": 2}).session_retries() == 2
    assert resolve_recipe("lightgbm", "1", {"n_features": 13}).session_retries() == 0
    assert SessionFailedError  # the other sites' error when one site dies (tests/learning/test_lightgbm.py)


@pytest.mark.parametrize("recipe", ["lightgbm", "xgboost"])
def test_the_description_a_steward_approves_names_early_stopping_and_retries(recipe):
    plain = resolve_recipe(recipe, "1", {"n_features": 13}).describe()
    both = resolve_recipe(
        recipe, "1", {"n_features": 13, "early_stopping_rounds": 5, "retries": 2}
    ).describe()
    assert "validation" not in plain
    assert "in its own home" not in plain
    assert "validation (test-set) loss sum and row count inside a secure sum" in both
    assert "stopping after 5 rounds without improvement" in both
    assert "keeps the model after each round in its own home" in both
    assert "up to 2 time(s)" in both
    auc = resolve_recipe(
        recipe, "1", {"n_features": 13, "early_stopping_rounds": 5, "early_stopping_metric": "auc"}
    ).describe()
    assert "loss sum" not in auc
    assert "counted per label and per cell of a public grid of 2000 cells of the raw score" in auc
    assert "stopping after 5 rounds without improvement" in auc
