"""An attacker's look at a boosting session from inside it (docs/boosting.md, "Retries and resuming",
"What the orchestrator and each site observe"; docs/secure-aggregation.md, "Collective sessions"), beside
tests/learning/test_boosting_attacks.py:

- a site's checkpoint is read as what it is, a file anyone with the site's account may have edited: a model
  text LightGBM cannot parse does not abort the site's process, and a checkpoint whose model holds fewer
  rounds than the file claims is not resumed from (the site would go on from another model than the sites it
  agreed the resume round with);
- every site checks that the leader released the model it trained itself: a leader that resumed from a model
  the other sites do not hold fails the session instead of releasing it unnoticed;
- the agreed bins are shaped by every site's grid counts: a site can make a bin of one cell that holds one
  row of another site, and read that row's label off the pooled histogram (documented, inherent); a relay
  that forged the grid counts could do the same (a defect: the grid counts are a plain secure sum)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedhealth.data import TabularDataset
from fedhealth.learning import (
    LIGHTGBM_RECIPE,
    XGBOOST_RECIPE,
    InMemorySession,
    LightGbmParams,
    SessionContext,
    XGBoostParams,
    train_site,
    train_site_xgboost,
)
from fedhealth.secagg import SUM_TAGS, SecAggSecurityError, SessionFailedError

SITES = ["site-a", "site-b", "site-c"]  # site-a leads (the first by name): its model is the one released


def _site_data(seed: int, rows: int = 48, features: int = 3) -> TabularDataset:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features))
    y = ((X[:, 0] + 0.5 * rng.normal(size=rows)) > 0).astype(np.int64)
    cut = rows * 3 // 4
    return TabularDataset(
        name=f"synthetic-{seed}",
        X_train=X[:cut],
        y_train=y[:cut],
        X_test=X[cut:],
        y_test=y[cut:],
        feature_names=tuple(f"x{j}" for j in range(features)),
    )


@pytest.fixture(scope="module")
def sites() -> list[TabularDataset]:
    return [_site_data(seed) for seed in range(len(SITES))]


def _dirs(tmp_path: Path) -> dict[str, Path]:
    dirs = {s: tmp_path / s for s in SITES}
    for d in dirs.values():
        d.mkdir()
    return dirs


def _train(train: Any, params: Any, datasets: list[TabularDataset], dirs: dict[str, Path]) -> dict[str, Any]:
    session = InMemorySession(SITES, call_timeout_s=60)
    return session.run(lambda m: train(params, datasets[SITES.index(m.site)], m, dirs[m.site]))


def _model_text(model: Any) -> str:
    return str(getattr(model, "model_text", None) or model.model_json)


def _fewer_rounds(recipe: str, model: str, rounds: int) -> str:
    """The library's own model text of ``model`` cut to its first ``rounds`` rounds: well formed."""
    if recipe == "lightgbm":
        import lightgbm as lgb

        return str(lgb.Booster(model_str=model).model_to_string(num_iteration=rounds))
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(bytearray(model.encode()))
    return bytes(booster[:rounds].save_raw("json")).decode()


def _edit_checkpoint(folder: Path, recipe: str, edit: Any) -> None:
    path = folder / f"{recipe}-checkpoint.json"
    saved = json.loads(path.read_text())
    edit(saved)
    path.write_text(json.dumps(saved))


_CASES = [
    (train_site, LightGbmParams(n_features=3, num_rounds=3, num_leaves=4, retries=1), "lightgbm"),
    (train_site_xgboost, XGBoostParams(n_features=3, num_rounds=3, max_depth=2, retries=1), "xgboost"),
]


@pytest.mark.parametrize(("train", "params", "recipe"), _CASES, ids=["lightgbm", "xgboost"])
def test_a_checkpoint_claiming_more_rounds_than_its_model_holds_is_not_resumed_from(
    sites, tmp_path, train, params, recipe
):
    dirs = _dirs(tmp_path)
    first = _train(train, params, sites, dirs)
    model = _model_text(first[SITES[0]][0])
    assert {_model_text(m) for m, _ in first.values()} == {model}

    # the leader's file still says 3 rounds; its model is the library's own text of the first round only
    def one_round(saved: dict[str, Any]) -> None:
        saved["model"] = _fewer_rounds(recipe, saved["model"], 1)

    _edit_checkpoint(dirs[SITES[0]], recipe, one_round)
    again = _train(train, params, sites, dirs)
    # the leader says it holds no round, so every site trains from the first, to the model of the first run:
    # no site goes on from a model of one round while the others go on from three
    assert {c["resumed_from"] for _, c in again.values()} == {0}
    assert {_model_text(m) for m, _ in again.values()} == {model}


@pytest.mark.parametrize(("train", "params", "recipe"), _CASES, ids=["lightgbm", "xgboost"])
@pytest.mark.parametrize(
    "damage",
    [
        lambda saved: saved.pop("model"),
        lambda saved: saved.update(scores=5),
        lambda saved: saved.update(model=saved["model"][: len(saved["model"]) // 2]),  # cut short
    ],
    ids=["no-model", "scores-not-a-list", "model-cut-short"],
)
def test_a_damaged_checkpoint_is_no_checkpoint_and_every_site_trains_from_the_first_round(
    sites, tmp_path, train, params, recipe, damage
):
    dirs = _dirs(tmp_path)
    model = _model_text(_train(train, params, sites, dirs)[SITES[0]][0])
    _edit_checkpoint(dirs[SITES[1]], recipe, damage)
    # before: site-b raised on its checkpoint (KeyError, TypeError, the library's parse error) at the start
    # of this session and of every retry, so the study could never complete
    again = _train(train, params, sites, dirs)
    assert {c["resumed_from"] for _, c in again.values()} == {0}
    assert {_model_text(m) for m, _ in again.values()} == {model}


# In a process of its own: before the fix, LightGBM's parser aborted the whole process (SIGABRT, "Model format
# error") on this checkpoint, the agent with it, and at every retry again.
_UNPARSEABLE_CHECKPOINT = """
import json, re, sys
from pathlib import Path
from tests.learning.test_boosting_session_attacks import SITES, _CASES, _dirs, _site_data, _train
train, params, recipe = _CASES[0]
sites = [_site_data(seed) for seed in range(len(SITES))]
dirs = _dirs(Path(sys.argv[1]))
_train(train, params, sites, dirs)
path = dirs[SITES[1]] / "lightgbm-checkpoint.json"
saved = json.loads(path.read_text())
# a tree_sizes that points into the middle of the next tree: LightGBM reads a tree at that offset
saved["model"] = re.sub(r"tree_sizes=(\\d+)", lambda m: f"tree_sizes={int(m.group(1)) + 400}", saved["model"])
path.write_text(json.dumps(saved))
again = _train(train, params, sites, dirs)
print(json.dumps(sorted({c["resumed_from"] for _, c in again.values()})))
"""


def test_a_checkpoint_whose_model_text_lightgbm_cannot_parse_does_not_abort_the_site(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", _UNPARSEABLE_CHECKPOINT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[0]"  # ignored: every site trained from the first round


# --- the released model is the one every site trained -------------------------------------------------


def _edit_a_leaf_value(recipe: str, model: str) -> str:
    """``model`` with one leaf value changed, still laid out as the library writes a model of as many
    rounds."""
    if recipe == "lightgbm":
        at = model.index("leaf_value=") + len("leaf_value=")
        at += model[at] == "-"
        digit = model[at]
        return model[:at] + ("1" if digit != "1" else "2") + model[at + 1 :]
    data = json.loads(model)
    tree = data["learner"]["gradient_booster"]["model"]["trees"][0]
    leaf = tree["left_children"].index(-1)
    tree["split_conditions"][leaf] += 0.25
    tree["base_weights"][leaf] += 0.25
    return json.dumps(data)


@pytest.mark.parametrize(
    ("recipe_object", "params", "recipe"),
    [(LIGHTGBM_RECIPE, _CASES[0][1], "lightgbm"), (XGBOOST_RECIPE, _CASES[1][1], "xgboost")],
    ids=["lightgbm", "xgboost"],
)
def test_a_leader_resuming_from_a_model_the_other_sites_do_not_hold_fails_the_session_instead_of_releasing_it(
    sites, tmp_path, recipe_object, params, recipe
):
    dirs = _dirs(tmp_path)

    def run_sites() -> tuple[InMemorySession, dict[str, Any]]:
        session = InMemorySession(SITES, call_timeout_s=60)
        outcomes: dict[str, Any] = {}

        def program(member: Any) -> Any:
            ctx = SessionContext(
                site=member.site, seed=0, rng=np.random.default_rng(0), checkpoints=dirs[member.site]
            )
            try:
                outcomes[member.site] = recipe_object.run_site(
                    params, sites[SITES.index(member.site)], member, ctx
                )
            except BaseException as exc:
                outcomes[member.site] = exc
                raise
            return outcomes[member.site]

        try:
            session.run(program)
        except (SecAggSecurityError, SessionFailedError) as exc:
            outcomes["session"] = exc  # the session ended failed, the closing calls included
        return session, outcomes

    session, first = run_sites()
    assert "session" not in first, first  # the control: the honest session completes
    honest = json.loads(session.relay.released or b"{}")["model"]
    # the leader's checkpoint: all 3 rounds, a model the library reads, one leaf value not the one trained
    _edit_checkpoint(
        dirs[SITES[0]], recipe, lambda saved: saved.update(model=_edit_a_leaf_value(recipe, saved["model"]))
    )
    session, outcomes = run_sites()
    # every site resumed from round 3 (nothing left to train): the leader's model is its edited checkpoint,
    # which it broadcast
    # the other sites check the broadcast against their own model: the first to refuse it ends the session
    # (the other may be ended by that refusal first), and the session does not complete
    assert "session" in outcomes, outcomes
    others = [outcomes[s] for s in SITES[1:]]
    assert all(isinstance(o, SecAggSecurityError | SessionFailedError) for o in others), outcomes
    refusals = [outcomes[s] for s in SITES[1:] if isinstance(outcomes[s], SecAggSecurityError)]
    assert refusals
    assert all("released another model" in str(r) for r in refusals)
    released = json.loads(session.relay.released or b"{}")
    assert released["model"] != honest  # what the leader broadcast: not the sites' model ...
    assert released["resumed_from"] == 3  # ... and the session it ended in failed at the other sites


# --- the agreed bins: shaped by what each site puts into the grid counts -----------------------------------

_GRID = LightGbmParams(
    n_features=2, num_rounds=1, num_leaves=2, max_bin=4, grid_cells=64, value_range=(-4, 4)
)
_HIGH_CELL = 63  # [3.875, 4): the cell the other site's one patient with x0 = 3.95 falls in
_FORGED = 1e5  # rows added to cell 62 of x0: every quantile cut lands after it, at the next occupied cell


def _grid_rows(seed: int, victim_label: int | None = None) -> TabularDataset:
    rng = np.random.default_rng(seed)
    X = np.clip(rng.normal(size=(30, 2)), -3, 3)  # nobody's x0 reaches cell 62 or 63 ...
    y = (X[:, 0] > 0).astype(np.int64)
    if victim_label is not None:  # ... but this one patient's
        X[0, 0], y[0] = 3.95, victim_label
    return TabularDataset(
        name=f"grid-{seed}", X_train=X, y_train=y, X_test=X[:0], y_test=y[:0], feature_names=("x0", "x1")
    )


class _ShapingSite:
    """site-a's session as its own program sees it: it adds ``_FORGED`` rows to cell 62 of x0 in its grid
    counts (its own input: no check can tell them from rows it has) and keeps every sum it receives."""

    def __init__(self, member: Any) -> None:
        self._member = member
        self.received: list[np.ndarray] = []

    @property
    def site(self) -> str:
        return str(self._member.site)

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self._member.sites)

    def secure_sum(self, values: Any) -> np.ndarray:
        values = np.array(values, dtype=np.float64)
        if not self.received:  # the first sum: the grid counts, x0's 64 cells first
            values[_HIGH_CELL - 1] += _FORGED
        total = self._member.secure_sum(values)
        self.received.append(np.array(total))
        return total

    def checked_sum(self, values: Any) -> np.ndarray:
        """The same for a checked sum: its own input, which no check can tell from rows it has."""
        values = np.array(values, dtype=np.float64)
        if not self.received:
            values[_HIGH_CELL - 1] += _FORGED
        total = self._member.checked_sum(values)
        self.received.append(np.array(total))
        return total

    def broadcast(self, data: bytes | None) -> bytes:
        return bytes(self._member.broadcast(data))

    def barrier(self) -> None:
        self._member.barrier()


@pytest.mark.parametrize("victim_label", [0, 1])
def test_a_site_shaping_the_bins_with_its_grid_counts_reads_a_lone_patients_label_as_documented(victim_label):
    datasets = [_grid_rows(0), _grid_rows(1), _grid_rows(2, victim_label)]
    honest = InMemorySession(SITES).run(lambda m: train_site(_GRID, datasets[SITES.index(m.site)], m))
    shaping: dict[str, _ShapingSite] = {}

    def program(member: Any) -> Any:
        if member.site == "site-a":
            shaping["site-a"] = _ShapingSite(member)
            return train_site(_GRID, datasets[0], shaping["site-a"])
        return train_site(_GRID, datasets[SITES.index(member.site)], member)

    shaped = InMemorySession(SITES).run(program)
    # the control: the bins of the honest counts put the patient's cell in a bin with other rows
    assert _HIGH_CELL not in honest["site-a"][0].binning.starts[0]
    # shaped: every site agreed on a bin of that one cell, whose pooled grid count (less site-a's own) is 1
    received = shaping["site-a"].received
    assert shaped["site-b"][0].binning.starts[0] == (0, _HIGH_CELL)
    assert received[0][_HIGH_CELL] == 1
    # the first split search sums the root's histogram: x0's bin 1 (LightGBM leaves out bin 0) comes first,
    # its gradient and hessian, here the lone patient's only (site-a has no row there). Its gradient is
    # p0 - y: its sign is the patient's label
    [root] = [r for r in received if r.size == 2 * (1 + 3) + 2]  # x0: 1 bin, x1: 3 bins; counts; flag
    gradient, hessian = root[0], root[1]
    assert 0 < hessian < 0.25
    assert int(gradient < 0) == victim_label


class _ForgingRelay(InMemorySession):
    """A relay that answers every site the grid counts' sum with ``_FORGED`` rows added to cell 62 of x0:
    the same forged result for every site, so no chain tells it (``forged`` counts the answers forged)."""

    forged = 0

    def exchange(self, site: str, index: int, body: bytes) -> bytes | memoryview:
        result = super().exchange(site, index, body)
        cells = _GRID.n_features * _GRID.grid_cells
        if len(result) not in (8 * cells, 8 * (cells + SUM_TAGS)):  # the grid counts, plain or checked
            return result
        self.forged += 1
        ring = np.frombuffer(bytes(result), dtype="<u8").copy()
        ring[_HIGH_CELL - 1] += np.uint64(round(_FORGED * 2.0**40))
        return ring.tobytes()


def test_a_relay_forging_the_grid_counts_for_every_site_cannot_choose_the_bins():
    datasets = [_grid_rows(0), _grid_rows(1), _grid_rows(2, 1)]
    session = _ForgingRelay(SITES)
    try:
        models = session.run(lambda m: train_site(_GRID, datasets[SITES.index(m.site)], m))
    except (SecAggSecurityError, SessionFailedError):
        assert session.forged >= 1  # it did forge the answer, and a site found it out
        return  # the session ended: no bin was chosen for it
    # the session ended with a model: on the bins the relay chose (the lone patient's cell alone)
    assert models["site-b"][0].binning.starts[0] != (0, _HIGH_CELL), "the relay chose the bins"
