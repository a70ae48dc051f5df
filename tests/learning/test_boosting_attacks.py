"""An attacker's look at the boosting recipes' guarantees (docs/boosting.md, "Retries and resuming", "Bad
input"; docs/secure-aggregation.md, "Collective sessions") that no other test tried to break:

- a site's checkpoint is bound to the study's params, the agreed bins and the site's dataset: a checkpoint of
  anything else is ignored, in the key and in a real session; it is written 0600 in a 0700 directory even
  under a permissive umask; its directory is named by a digest of the study id, never a path the
  orchestrator chose;
- the site accepts collective sessions in rounds 1 to 1 + ``retries`` of the approved spec, no other;
- a site whose start score differs from the others' fails the session instead of training on it;
- a dataset of another width, other feature names or other label classes is refused by the recipe's site
  program before anything is summed, as the code the docs name (never the text)."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fedhealth.agent._agent import SiteAgent, _failure_code
from fedhealth.agent._governance import _mismatch
from fedhealth.crypto import IdentityKey
from fedhealth.data import SchemaError, TabularDataset
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
from fedhealth.learning._boosting import TreeCheckpoint
from fedhealth.learning._lightgbm import Binning
from fedhealth.protocol import (
    CollectiveSessionInfo,
    FailureCode,
    RecipeSpec,
    SecureAggregationSpec,
    StudySpec,
    Task,
    TaskKind,
)
from fedhealth.secagg import SessionFailedError

SITES = ["site-a", "site-b", "site-c"]


def _site_data(seed: int, rows: int = 60, features: int = 4, classes: int = 2) -> TabularDataset:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features))
    y = ((X[:, 0] + 0.5 * rng.normal(size=rows)) > 0).astype(np.int64)
    if classes > 2:
        y = np.digitize(X[:, 0], np.quantile(X[:, 0], np.linspace(0, 1, classes + 1)[1:-1])).astype(np.int64)
    cut = rows * 3 // 4
    return TabularDataset(
        name=f"synthetic-{seed}",
        X_train=X[:cut],
        y_train=y[:cut],
        X_test=X[cut:],
        y_test=y[cut:],
        feature_names=tuple(f"x{j}" for j in range(features)),
        classes=classes,
    )


@pytest.fixture(scope="module")
def sites() -> list[TabularDataset]:
    return [_site_data(seed) for seed in range(len(SITES))]


def _with_test_value_changed(dataset: TabularDataset) -> TabularDataset:
    """The same training rows (so the same bins and the same trees), one held-out value changed: only the
    dataset's fingerprint differs."""
    X_test = dataset.X_test.copy()
    X_test[0, 0] += 1.0
    return TabularDataset(
        name=dataset.name,
        X_train=dataset.X_train,
        y_train=dataset.y_train,
        X_test=X_test,
        y_test=dataset.y_test,
        feature_names=dataset.feature_names,
    )


# --- the checkpoint's key: params, bins, data -------------------------------------------------------------


def test_the_checkpoint_key_changes_with_the_params_the_bins_and_any_value_of_the_sites_data(sites):
    params = LightGbmParams(n_features=4, num_rounds=5, retries=1)
    binning = Binning(low=(-10.0,) * 4, high=(10.0,) * 4, grid_cells=8, starts=((0, 3, 5),) * 4)
    key = TreeCheckpoint.key_of(params, binning, sites[0])
    assert key == TreeCheckpoint.key_of(params, binning, sites[0])  # a function of the three only
    other_params = LightGbmParams(n_features=4, num_rounds=5, retries=1, learning_rate=0.2)
    other_bins = Binning(low=(-10.0,) * 4, high=(10.0,) * 4, grid_cells=8, starts=((0, 3, 6),) * 4)
    labels = sites[0].y_train.copy()
    labels[0] = 1 - labels[0]
    other_label = TabularDataset(
        name=sites[0].name,
        X_train=sites[0].X_train,
        y_train=labels,
        X_test=sites[0].X_test,
        y_test=sites[0].y_test,
        feature_names=sites[0].feature_names,
    )
    others = {
        TreeCheckpoint.key_of(other_params, binning, sites[0]),
        TreeCheckpoint.key_of(params, other_bins, sites[0]),
        TreeCheckpoint.key_of(params, binning, _with_test_value_changed(sites[0])),
        TreeCheckpoint.key_of(params, binning, other_label),
        TreeCheckpoint.key_of(params, binning, sites[1]),
        TreeCheckpoint.key_of(XGBoostParams(n_features=4, num_rounds=5, retries=1), binning, sites[0]),
    }
    assert key not in others
    assert len(others) == 6


def _session(
    train: Any, params: Any, datasets: list[TabularDataset], dirs: dict[str, Path]
) -> dict[str, Any]:
    session = InMemorySession(SITES, call_timeout_s=60)
    return session.run(lambda m: train(params, datasets[SITES.index(m.site)], m, dirs[m.site]))


@pytest.mark.parametrize(
    ("train", "params", "other_params"),
    [
        (
            train_site,
            LightGbmParams(n_features=4, num_rounds=4, num_leaves=4, retries=1),
            LightGbmParams(n_features=4, num_rounds=4, num_leaves=4, retries=1, learning_rate=0.3),
        ),
        (
            train_site_xgboost,
            XGBoostParams(n_features=4, num_rounds=4, max_depth=2, retries=1),
            XGBoostParams(n_features=4, num_rounds=4, max_depth=2, retries=1, learning_rate=0.5),
        ),
    ],
    ids=["lightgbm", "xgboost"],
)
def test_a_session_ignores_checkpoints_of_other_params_or_other_data(
    sites, tmp_path, train, params, other_params
):
    dirs = {s: tmp_path / s for s in SITES}
    for d in dirs.values():
        d.mkdir()
    first = _session(train, params, sites, dirs)
    assert {c["resumed_from"] for _, c in first.values()} == {0}
    # the control: the same study over the same data takes up every checkpointed round
    again = _session(train, params, sites, dirs)
    assert {c["resumed_from"] for _, c in again.values()} == {params.num_rounds}
    # one site's data differs (one held-out value: the same bins, the same trees): its checkpoint is not
    # that data's, so it holds no round and every site starts from the first
    changed = [sites[0], _with_test_value_changed(sites[1]), sites[2]]
    runs = _session(train, params, changed, dirs)
    assert {c["resumed_from"] for _, c in runs.values()} == {0}
    # the data as before again (site-b's checkpoint is now the changed data's): still from the first round
    runs = _session(train, params, sites, dirs)
    assert {c["resumed_from"] for _, c in runs.values()} == {0}
    # other params over the checkpoints of these params: from the first round, to the other params' model
    resumed = _session(train, other_params, sites, dirs)
    assert {c["resumed_from"] for _, c in resumed.values()} == {0}
    fresh_dirs = {s: tmp_path / "fresh" / s for s in SITES}
    for d in fresh_dirs.values():
        d.mkdir(parents=True)
    fresh = _session(train, other_params, sites, fresh_dirs)
    assert resumed[SITES[0]][0] == fresh[SITES[0]][0]


def test_a_checkpoint_is_private_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        checkpoint = TreeCheckpoint(tmp_path / "home" / "checkpoints" / "study", recipe="xgboost", key="k")
        checkpoint.save(1, "model", [])
        checkpoint.save(2, "model", [0.5])  # rewritten through the temporary file
    finally:
        os.umask(old)
    assert checkpoint.path.stat().st_mode & 0o777 == 0o600
    for folder in (checkpoint.path.parent, checkpoint.path.parent.parent):
        assert folder.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in checkpoint.path.parent.iterdir()] == ["xgboost-checkpoint.json"]


@pytest.mark.parametrize("study_id", ["../../../etc", "/tmp/elsewhere", "st-1/../../x", "a" * 300])
def test_the_checkpoint_folder_is_a_digest_of_the_study_id_inside_the_site_home(tmp_path, study_id):
    agent = SimpleNamespace(settings=SimpleNamespace(home=tmp_path))
    task = SimpleNamespace(study_id=study_id)
    folder = SiteAgent._checkpoints(agent, task)  # type: ignore[arg-type]
    assert folder is not None
    assert folder.parent == tmp_path / "checkpoints"
    assert len(folder.name) == 32
    assert all(c in "0123456789abcdef" for c in folder.name)
    other = SiteAgent._checkpoints(agent, SimpleNamespace(study_id=study_id + "x"))  # type: ignore[arg-type]
    assert other != folder  # one folder per study


# --- the session rounds a site accepts ------------------------------------------------------------------


def _collective_task(retries: int, round_number: int) -> Task:
    keys = {s: IdentityKey.generate() for s in SITES}
    spec = StudySpec(
        name="gbdt",
        dataset="heart",
        recipe=RecipeSpec(name="lightgbm", params={"n_features": 4, "retries": retries}),
        rounds=1,
        train_sites=SITES,
        secure_aggregation=SecureAggregationSpec(
            site_keys={s: k.public().fingerprint for s, k in keys.items()}
        ),
    )
    return Task(
        task_id="tk-1",
        study_id="st-1",
        round=round_number,
        kind=TaskKind.COLLECTIVE,
        dataset=spec.dataset,
        recipe=spec.recipe,
        model_digest="0" * 64,
        seed=spec.seed,
        deadline=datetime.now(UTC) + timedelta(minutes=5),
        spec=spec,
        collective=CollectiveSessionInfo(
            sites=SITES, peer_keys={s: k.public().raw.hex() for s, k in keys.items()}, attempt="attempt-1"
        ),
    )


@pytest.mark.parametrize(("retries", "accepted"), [(0, {1}), (1, {1, 2}), (3, {1, 2, 3, 4})])
def test_a_site_accepts_collective_sessions_in_rounds_one_to_one_plus_retries_only(retries, accepted):
    for round_number in range(-1, 7):
        problem = _mismatch(_collective_task(retries, round_number), SITES[0])
        if round_number in accepted:
            assert problem is None, (round_number, problem)
        else:
            assert problem is not None, round_number
            assert f"a collective session in round {round_number}" in problem


# --- the start score every site must hold -----------------------------------------------------------------


class _Sums:
    """Site "a" of three: the session's fixed-point sum as if the other two sites put in this site's values,
    plus ``shift``."""

    site, sites = "a", ("a", "b", "c")

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = shift
        self.summed: list[np.ndarray] = []

    def secure_sum(self, values: Any) -> np.ndarray:
        self.summed.append(np.array(values, dtype=np.float64))
        return np.rint(np.array(values, dtype=np.float64) * 2.0**40) * 3 / 2.0**40 + self.shift


def _init_score_allgather(session: _Sums, value: float) -> list[Any]:
    """Both ranks of the site answer LightGBM's start-score allgather (``GlobalSyncUpByMean``)."""
    import struct

    from fedhealth.learning._lightgbm_network import RankGroup, SessionNetwork

    group = RankGroup(session)  # type: ignore[arg-type]
    networks = [
        SessionNetwork(group, rank, local_rows=10, init_schedule=["mean"], init_score=lambda _i: None)
        for rank in group.ranks
    ]
    out: list[Any] = [None] * len(networks)

    def one(rank: int) -> None:
        networks[rank].phase = "init"
        try:
            out[rank] = networks[rank]._allgather(struct.pack("<d", value), [8, 8])
        except Exception as exc:
            out[rank] = exc
            group.fail(exc)

    threads = [threading.Thread(target=one, args=(r,)) for r in group.ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_a_site_whose_start_score_differs_from_the_others_fails_the_session():
    from fedhealth.learning._lightgbm_network import UnprotectedCollectiveError

    value = -0.4231  # LightGBM's start score at this site (binary: from the summed label statistics)
    honest = _init_score_allgather(_Sums(), value)
    assert all(isinstance(r, list) for r in honest), honest  # every site holds the same: it goes on
    # another site put in another start score (by one step of the session's fixed point)
    lying = _init_score_allgather(_Sums(shift=2.0**-40), value)
    assert all(isinstance(r, UnprotectedCollectiveError) for r in lying), lying
    assert any("do not agree on the initial score" in str(r) for r in lying)


# --- refusals before anything is summed, as their codes ---------------------------------------------------


class _NoCalls:
    site, sites = "site-a", tuple(SITES)

    def secure_sum(self, values: Any) -> Any:
        raise AssertionError("nothing may be summed before the dataset is checked")

    def broadcast(self, data: Any) -> Any:
        raise AssertionError("nothing may be broadcast before the dataset is checked")

    def barrier(self) -> None:
        raise AssertionError("no barrier before the dataset is checked")


def _ctx() -> SessionContext:
    return SessionContext(site="site-a", seed=0, rng=np.random.default_rng(0))


@pytest.mark.parametrize(
    ("recipe", "params", "dataset", "problem"),
    [
        (LIGHTGBM_RECIPE, LightGbmParams(n_features=5), _site_data(0), "has 4 features"),
        (XGBOOST_RECIPE, XGBoostParams(n_features=5), _site_data(0), "has 4 features"),
        (
            LIGHTGBM_RECIPE,
            LightGbmParams(n_features=4, feature_names=("x0", "x1", "age", "x3")),
            _site_data(0),
            "feature 2 is 'x2'; the study expects 'age'",
        ),
        (
            XGBOOST_RECIPE,
            XGBoostParams(n_features=4, feature_names=("x0", "x1", "age", "x3")),
            _site_data(0),
            "feature 2 is 'x2'; the study expects 'age'",
        ),
        (LIGHTGBM_RECIPE, LightGbmParams(n_features=4), _site_data(0, classes=3), "label classes"),
        (XGBOOST_RECIPE, XGBoostParams(n_features=4), _site_data(0, classes=3), "label classes"),
        (
            LIGHTGBM_RECIPE,
            LightGbmParams(n_features=4, objective="multiclass", num_class=3),
            _site_data(0),
            "label classes",
        ),
    ],
    ids=[
        "lightgbm-width",
        "xgboost-width",
        "lightgbm-names",
        "xgboost-names",
        "lightgbm-three-classes-in-a-binary-study",
        "xgboost-three-classes-in-a-binary-study",
        "lightgbm-binary-data-in-a-three-class-study",
    ],
)
def test_a_dataset_that_does_not_fit_is_refused_by_the_site_program_before_any_sum(
    recipe, params, dataset, problem
):
    with pytest.raises(SchemaError) as err:
        recipe.run_site(params, dataset, _NoCalls(), _ctx())  # type: ignore[arg-type]
    assert problem in str(err.value)
    assert "\n" not in str(err.value)
    assert _failure_code(err.value) is FailureCode.DATASET_INVALID  # the code, never the text, goes up


@pytest.mark.parametrize(
    ("train", "params"),
    [
        (train_site, LightGbmParams(n_features=4, early_stopping_rounds=2)),
        (train_site_xgboost, XGBoostParams(n_features=4, early_stopping_rounds=2)),
    ],
    ids=["lightgbm", "xgboost"],
)
def test_stopping_without_validation_rows_is_refused_as_dataset_invalid_before_any_tree(train, params):
    data = _site_data(0)
    empty = TabularDataset(
        name="no-test",
        X_train=data.X_train,
        y_train=data.y_train,
        X_test=np.zeros((0, 4)),
        y_test=np.zeros(0, dtype=np.int64),
        feature_names=data.feature_names,
    )
    session = InMemorySession(SITES, call_timeout_s=30)
    errors: dict[str, BaseException] = {}

    def program(member: Any) -> Any:
        try:
            return train(params, empty, member)
        except BaseException as exc:
            errors[member.site] = exc
            raise

    with pytest.raises(SchemaError):
        session.run(program)
    # every site refuses at the session's first sum (dataset_invalid, the code alone goes up), or has its
    # session ended by the first refusal (the orchestrator closed its task)
    assert set(errors) == set(SITES)
    assert all(isinstance(e, SchemaError | SessionFailedError) for e in errors.values()), errors
    refusals = [e for e in errors.values() if isinstance(e, SchemaError)]
    assert refusals
    assert {_failure_code(e) for e in refusals} == {FailureCode.DATASET_INVALID}
    assert session.relay.released is None
    assert session.relay.calls == 1  # after the set-up, the one sum of test-row counts: no tree


# --- a lying orchestrator: one site sent another result -----------------------------------------------------


class _Equivocating(InMemorySession):
    """An in-memory session whose relay answers ``victim`` with a changed result when ``forge`` says so."""

    def __init__(self, sites: list[str], victim: str, forge: Any) -> None:
        super().__init__(sites, call_timeout_s=60)
        self.victim, self.forge, self.forged = victim, forge, 0
        self.closed: dict[str, BaseException | None] = {}  # each site's closing check: None if it passed

    def member(self, site: str) -> Any:
        member = super().member(site)
        close = member.close

        def checked_close() -> None:
            try:
                close()
            except BaseException as exc:
                self.closed[site] = exc
                raise
            self.closed[site] = None

        member.close = checked_close  # type: ignore[method-assign]
        return member

    def exchange(self, site: str, index: int, body: bytes) -> bytes | memoryview:
        result = super().exchange(site, index, body)
        if site == self.victim:
            changed = self.forge(index, bytes(result))
            if changed is not None:
                self.forged += 1
                return changed
        return result


def _run_all(session: InMemorySession, train: Any, params: Any, datasets: list[TabularDataset]) -> Any:
    outcomes: dict[str, Any] = {}

    def program(member: Any) -> Any:
        try:
            outcomes[member.site] = train(params, datasets[SITES.index(member.site)], member)
        except BaseException as exc:
            outcomes[member.site] = exc
            raise
        return outcomes[member.site]

    with pytest.raises(BaseException) as err:
        session.run(program)
    return err.value, outcomes


@pytest.mark.parametrize(
    ("train", "params"),
    [
        (train_site, LightGbmParams(n_features=4, num_rounds=6, num_leaves=4)),
        (train_site_xgboost, XGBoostParams(n_features=4, num_rounds=6, max_depth=2)),
    ],
    ids=["lightgbm", "xgboost"],
)
def test_one_site_sent_a_sum_one_step_off_never_ends_with_a_model(sites, train, params):
    from fedhealth.secagg import SecAggSecurityError

    # mid-training (call 12: a histogram or gradient sum), site-b gets the sum with its first value changed
    # by one step of the fixed point: nothing it could tell from a sum of the others' values
    def one_step(index: int, result: bytes) -> bytes | None:
        if index != 12:
            return None
        forged = bytearray(result)
        forged[8] ^= 1
        return bytes(forged)

    session = _Equivocating(SITES, "site-b", one_step)
    error, outcomes = _run_all(session, train, params, sites)
    assert session.forged == 1
    # the chains of site-b and every other site differ from then on: no site's session ends cleanly. Every
    # later sum is noise to everyone (training fails on it), or the closing check of the sites that got to
    # the end finds the different results (collective_refused at the agent)
    assert not any(v is None for v in session.closed.values()), session.closed
    for site, outcome in outcomes.items():
        if isinstance(outcome, tuple):  # trained on noise without noticing: its session did not end
            closing = session.closed.get(site)
            assert isinstance(closing, SecAggSecurityError | SessionFailedError), (site, session.closed)
    if session.closed:  # the first site at the end refused it (the others: the session it failed)
        assert any(isinstance(e, SecAggSecurityError) for e in session.closed.values()), session.closed
    assert isinstance(error, BaseException)


def test_a_forged_model_broadcast_is_refused_by_the_site_it_was_sent_to(sites):
    from fedhealth.secagg import SecAggSecurityError

    def other_model(index: int, result: bytes) -> bytes | None:
        if b'"model"' not in result:  # the leader's broadcast of the released model
            return None
        return result.replace(b'"sites": 3', b'"sites": 4', 1)

    params = LightGbmParams(n_features=4, num_rounds=3, num_leaves=4)
    session = _Equivocating(SITES, "site-b", other_model)
    program = lambda m: LIGHTGBM_RECIPE.run_site(params, sites[SITES.index(m.site)], m, _ctx())  # noqa: E731
    outcomes: dict[str, Any] = {}

    def recorded(member: Any) -> Any:
        try:
            outcomes[member.site] = program(member)
        except BaseException as exc:
            outcomes[member.site] = exc
            raise
        return outcomes[member.site]

    with pytest.raises((SecAggSecurityError, SessionFailedError)):
        session.run(recorded)
    assert session.forged == 1
    assert isinstance(outcomes["site-b"], SecAggSecurityError), outcomes["site-b"]


# --- the resume step: a forged count of checkpointed rounds -------------------------------------------


class _ForgedSum:
    """A three-site session whose one secure sum (the resume step's) answers what the attacker chose."""

    site, sites = "site-b", ("site-a", "site-b", "site-c")

    def __init__(self, answer: list[float]) -> None:
        self.answer = np.array(answer, dtype=np.float64)

    def secure_sum(self, values: Any) -> np.ndarray:
        return self.answer


@pytest.mark.parametrize(
    ("local", "answer"),
    [
        (0, [3, 3, 3, 3, 3]),  # every site "reached" round 5; this one has no checkpoint at all
        (2, [3, 3, 3, 3, 0]),  # this one stopped at round 2, yet round 3 counts all three sites
        (5, [3, 3, 4, 3, 3]),  # more sites than there are
        (5, [3, 2, 3, 3, 3]),  # a site that reached round 3 but not round 2
        (5, [3, 3, 3, 2.5, 2]),  # not a count
        (3, [-1, 3, 3, 0, 0]),
        (3, [3, 3, 3, 0]),  # another length
    ],
)
def test_a_forged_count_of_checkpointed_rounds_stops_the_site_instead_of_resuming(local, answer):
    from fedhealth.learning._boosting import agree_resume
    from fedhealth.secagg import SecAggSecurityError

    with pytest.raises(SecAggSecurityError, match="not a count of the sites"):
        agree_resume(_ForgedSum(answer), local, 5)


@pytest.mark.parametrize(
    ("local", "answer", "resume"),
    [(5, [3, 3, 3, 3, 3], 5), (3, [3, 3, 2, 1, 1], 2), (0, [2, 2, 1, 0, 0], 0), (4, [3, 3, 3, 3, 2], 4)],
)
def test_an_honest_count_of_checkpointed_rounds_resumes_from_the_last_round_every_site_reached(
    local, answer, resume
):
    from fedhealth.learning._boosting import agree_resume

    assert agree_resume(_ForgedSum(answer), local, 5) == resume
