"""Attacks on what docs/boosting.md promises, beside tests/learning/test_boosting_attacks.py and
tests/learning/test_boosting_session_attacks.py:

- "Retries and resuming": a checkpoint is taken up only if it is whole, and "anything else is no checkpoint,
  the site says it holds no round, and every site trains from the first". An edited file whose stopping score
  is an integer too large for a float, or whose JSON nests too deep to parse, made the site's program raise
  (OverflowError, RecursionError) at the start of this session and of every retry; an XGBoost checkpoint whose
  model JSON points out of its own arrays (a child, a parent or a split feature out of range) loaded, and the
  first training round on it crashed the agent's process (a segmentation fault) or looped forever.
- "Feature importance": a released model the library cannot read fails the study's result in one line. An
  XGBoost model JSON of that kind crashed the orchestrator's process when it read the importance off it.

The crashing cases run in a process of their own: before the fix they took the whole process down."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.learning.test_boosting_session_attacks import SITES, _dirs, _model_text, _site_data, _train

from fedhealth.core import ProtocolError
from fedhealth.data import TabularDataset
from fedhealth.learning import LightGbmParams, XGBoostParams, train_site, train_site_xgboost
from fedhealth.learning._boosting import TreeCheckpoint
from fedhealth.learning._xgboost_proxy import SessionProxy


@pytest.fixture(scope="module")
def sites() -> list[TabularDataset]:
    return [_site_data(seed) for seed in range(len(SITES))]


_STOPPING = [
    (
        train_site,
        LightGbmParams(n_features=3, num_rounds=3, num_leaves=4, retries=1, early_stopping_rounds=2),
        "lightgbm",
    ),
    (
        train_site_xgboost,
        XGBoostParams(n_features=3, num_rounds=3, max_depth=2, retries=1, early_stopping_rounds=2),
        "xgboost",
    ),
]


def _huge_score(path: Path) -> None:
    saved = json.loads(path.read_text())
    saved["scores"][0] = 10**400  # a JSON number Python reads as an int no float holds
    path.write_text(json.dumps(saved))


def _nested_too_deep(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


@pytest.mark.parametrize(("train", "params", "recipe"), _STOPPING, ids=["lightgbm", "xgboost"])
@pytest.mark.parametrize("damage", [_huge_score, _nested_too_deep], ids=["huge-score", "nested-too-deep"])
def test_a_checkpoint_python_cannot_read_as_numbers_is_no_checkpoint_and_every_site_trains_from_the_first(
    sites, tmp_path, train, params, recipe, damage
):
    dirs = _dirs(tmp_path)
    first = _train(train, params, sites, dirs)
    model = _model_text(first[SITES[0]][0])
    path = dirs[SITES[1]] / f"{recipe}-checkpoint.json"
    assert json.loads(path.read_text())["scores"]  # early stopping: the file holds a score per round
    damage(path)
    # before: site-b's program raised (OverflowError, RecursionError) on its own file at the start of this
    # session, and of every retry: the study could never complete
    again = _train(train, params, sites, dirs)
    assert {c["resumed_from"] for _, c in again.values()} == {0}
    assert {_model_text(m) for m, _ in again.values()} == {model}


@pytest.mark.parametrize(
    "scores",
    [[10**400], [True], [float("nan")], [[0.5]], ["0.5"]],
    ids=["int-beyond-float", "bool", "nan", "nested", "string"],
)
def test_a_checkpoint_score_that_is_no_finite_number_is_no_checkpoint(tmp_path, scores):
    checkpoint = TreeCheckpoint(tmp_path, recipe="lightgbm", key="k")
    checkpoint.save(1, "model of round 1", [0.25])
    found = checkpoint.resumable(num_rounds=3, stopping=True, model_holds=lambda _m, _r: True)
    assert found is not None  # the honest file is taken up
    assert found.scores == [0.25]
    checkpoint.path.write_text(
        json.dumps({"key": "k", "rounds": 1, "model": "model of round 1", "scores": scores})
    )
    assert checkpoint.resumable(num_rounds=3, stopping=True, model_holds=lambda _m, _r: True) is None


# --- XGBoost model JSON that points out of its own arrays ----------------------------------------------


def _out_of_range(data: dict[str, Any], case: str) -> None:
    """Edit tree 0 of an XGBoost JSON model: its lengths stay right, one index points elsewhere."""
    tree = data["learner"]["gradient_booster"]["model"]["trees"][0]
    if case == "child":
        tree["left_children"][0] = 10**6
    elif case == "feature":
        tree["split_indices"][0] = 10**6
    elif case == "parent":
        tree["parents"][1] = 10**6
    elif case == "cycle":
        tree["left_children"][0] = 0  # the root is its own child
    else:
        raise AssertionError(case)


_XGBOOST_CHECKPOINT = """
import json, sys
from pathlib import Path
from tests.learning.test_boosting_session_attacks import SITES, _CASES, _dirs, _site_data, _train
from tests.learning.test_boosting_doc_attacks import _out_of_range
train, params, recipe = _CASES[1]
sites = [_site_data(seed) for seed in range(len(SITES))]
dirs = _dirs(Path(sys.argv[1]))
first = _train(train, params, sites, dirs)
path = dirs[SITES[1]] / "xgboost-checkpoint.json"
saved = json.loads(path.read_text())
model = json.loads(saved["model"])
_out_of_range(model, sys.argv[2])
saved["model"] = json.dumps(model)
path.write_text(json.dumps(saved))
again = _train(train, params, sites, dirs)
print(json.dumps([
    sorted({c["resumed_from"] for _, c in again.values()}),
    len({m.model_json for m, _ in again.values()} | {first[SITES[0]][0].model_json}),
]))
"""


@pytest.mark.parametrize("case", ["child", "feature", "parent", "cycle"])
def test_an_xgboost_checkpoint_whose_model_points_out_of_its_arrays_does_not_crash_the_site(tmp_path, case):
    run = subprocess.run(
        [sys.executable, "-c", _XGBOOST_CHECKPOINT, str(tmp_path), case],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    # before: a segmentation fault (rc -11) of the process at the first round trained on it, or (cycle) a
    # process that never came back
    assert run.returncode == 0, run.stderr[-2000:]
    resumed, models = json.loads(run.stdout.strip().splitlines()[-1])
    assert resumed == [0]  # no checkpoint: every site trained from the first round ...
    assert models == 1  # ... to the model of the uninterrupted run


_XGBOOST_RELEASE = """
import json, sys
import numpy as np
from tests.learning.test_boosting_session_attacks import SITES, _CASES, _site_data
from tests.learning.test_boosting_doc_attacks import _out_of_range
from fedhealth.learning import XGBOOST_RECIPE, InMemorySession, SessionContext
from fedhealth.learning._xgboost import ModelJsonError
_, params, _ = _CASES[1]
sites = [_site_data(seed) for seed in range(len(SITES))]
session = InMemorySession(SITES, call_timeout_s=60)
def program(m):
    ctx = SessionContext(site=m.site, seed=0, rng=np.random.default_rng(0))
    return XGBOOST_RECIPE.run_site(params, sites[SITES.index(m.site)], m, ctx)
session.run(program)
result = json.loads(session.relay.released)
XGBOOST_RECIPE.finish(params, session.relay.released)  # the honest release is read
model = json.loads(result["model"])
_out_of_range(model, sys.argv[1])
result["model"] = json.dumps(model)
out = {}
try:
    XGBOOST_RECIPE.finish(params, json.dumps(result).encode())
    out["finish"] = None
except ValueError as exc:
    out["finish"] = str(exc)
try:
    XGBOOST_RECIPE.export(params, result)
    out["export"] = None
except ModelJsonError as exc:
    out["export"] = str(exc)
print(json.dumps(out))
"""


@pytest.mark.parametrize("case", ["child", "feature", "parent", "cycle"])
def test_a_released_xgboost_model_pointing_out_of_its_arrays_fails_the_result_in_one_line(tmp_path, case):
    run = subprocess.run(
        [sys.executable, "-c", _XGBOOST_RELEASE, case],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    # before: the orchestrator's process crashed reading the feature importance off the model (rc -11), or
    # (cycle) never came back
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["finish"] is not None
    assert out["export"] is not None
    assert out["finish"].startswith("the xgboost session released a model XGBoost cannot read: ")
    assert "\n" not in out["finish"]
    assert "tree 0" in out["finish"]


# --- the XGBoost proxy: a gather's lengths come back from the relay ----------------------------------------


class _RelaySum:
    """A two-site session as the proxy of site ``a`` (rank 0) sees it: each secure sum adds what site ``b``
    put in (``b``'s bytes ``other``), and the relay then replaces the first sum (the lengths) by ``forged``
    when given."""

    site = "a"
    sites = ("a", "b")

    def __init__(self, other: bytes, forged: list[float] | None = None) -> None:
        self.other = other
        self.forged = forged
        self.calls = 0

    def secure_sum(self, values: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == 1:
            honest = values + np.array([0.0, len(self.other)])
            return np.array(self.forged, dtype=np.float64) if self.forged is not None else honest
        padded = self.other + b"\0" * (len(self.other) % 2)
        words = np.frombuffer(padded, dtype="<u2").astype(np.float64)
        out = np.array(values, dtype=np.float64)
        out[len(out) - len(words) :] += words
        return out


def test_an_honest_gather_through_the_proxy_returns_every_sites_bytes():
    proxy = SessionProxy(_RelaySum(b"xyz!!"))  # type: ignore[arg-type]
    assert proxy.gather(b"abc") == [b"abc", b"xyz!!"]


@pytest.mark.parametrize(
    "forged",
    [
        [3.0, 1e12],  # another site "sent" a terabyte: the site would size its next sum by it
        [3.0, -8.0],
        [3.0, 2.5],
        [3.0, float("nan")],
        [3.0, float("inf")],
        [7.0, 5.0],  # not this site's own length
        [3.0, float(16 << 20)],  # within a float's whole numbers, past what a gather of XGBoost's holds
    ],
    ids=["huge", "negative", "fraction", "nan", "inf", "not-own", "past-the-bound"],
)
def test_gather_lengths_the_relay_altered_size_no_allocation_and_fail_the_call(forged):
    """docs/boosting.md, XGBoost: a gather is each site's bytes in its own block of a secure sum, the
    lengths first. A relay that alters the lengths' sum must not make the site allocate (and mask, and send)
    what it says: the call fails, as a session failure, before the second sum."""
    session = _RelaySum(b"xyz!!", forged)
    proxy = SessionProxy(session)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="gather's lengths"):
        proxy.gather(b"abc")
    assert session.calls == 1
