"""Attacks on the federated scaling pre-step (``standardize = "federated"``, round 0) at the site agent: a
crash between the pre-step's closing call and the site's record of its release, or mid-session; a lying
orchestrator's scaling for a training site that holds no release (skipped, replayed from another study), a
second pre-step session, a pre-step that released a refusal; participants whose sums no rows could give;
scalings no pre-step could release (docs/statistics.md, Federated standardization).

Three real agents with their real gates and homes run the pre-step's session in this process: the
session's transport (``HttpCollectives``) is swapped for an in-memory one with the real keys, masks and
relay, so each agent runs its own ``_run_collective`` as it does against an orchestrator."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
from site_fixtures import SITE, agent, approve, make_home, task

import fedhealth.agent._agent as agent_module
from fedhealth.agent import SiteHome
from fedhealth.core import InputError
from fedhealth.data import HEART_DISEASE_FEATURES, TabularDataset
from fedhealth.learning import LOGREG_RECIPE, LogRegParams, RecipeError, read_scaling, run_scaling_site
from fedhealth.learning._collectives import InMemoryCollectives, InMemorySession
from fedhealth.learning._federated_scaling import ScalingRefusedError, ScalingSumsError, scaling_sums
from fedhealth.learning._stats import split_limbs
from fedhealth.protocol import (
    CollectiveSessionInfo,
    FailureCode,
    ReleasedScaling,
    SecureAggregationSpec,
    StudySpec,
    Task,
    TaskKind,
)
from fedhealth.runtime import check_recipe, recipe_spec
from fedhealth.secagg import SessionFailure

SITES = (SITE, "hospital-b", "hospital-c")  # SITE leads the session


class Killed(BaseException):
    """The agent's process dies here (a kill, a power cut): nothing after this point of it runs."""


def homes(tmp_path: Any) -> dict[str, SiteHome]:
    return {s: make_home(tmp_path / s, s) for s in SITES}


def study(
    site_homes: Mapping[str, SiteHome], names: tuple[str, ...] = tuple(HEART_DISEASE_FEATURES), **extra: Any
) -> StudySpec:
    keys = {s: h.identity().public().fingerprint for s, h in site_homes.items()}
    params = LogRegParams.model_validate(
        {
            "n_features": len(names),
            "feature_names": list(names),
            "preprocessing": {"standardize": "federated"},
        }
    )
    spec = StudySpec(
        name="hd-federated",
        dataset="heart-disease",
        recipe=recipe_spec(LOGREG_RECIPE, params),
        rounds=1,
        train_sites=sorted(site_homes),
        min_sites=3,
        secure_aggregation=SecureAggregationSpec(site_keys=keys),
        **extra,
    )
    for home in site_homes.values():
        approve(home, spec)
    return spec


def pre_step_task(spec: StudySpec, site_homes: Mapping[str, SiteHome]) -> Task:
    peers = {s: h.identity().public().raw.hex() for s, h in site_homes.items()}
    session = CollectiveSessionInfo(sites=sorted(peers), peer_keys=peers, attempt="attempt-1")
    return task(spec, kind=TaskKind.COLLECTIVE, round=0, task_id="tk-scaling", collective=session)


def run_pre_step(
    monkeypatch: pytest.MonkeyPatch,
    spec: StudySpec,
    site_homes: Mapping[str, SiteHome],
    *,
    rig: Mapping[str, Callable[[InMemoryCollectives], None]] = {},
) -> tuple[InMemorySession, dict[str, Any]]:
    """Every site's agent handles its round-0 task at once over one in-memory session; ``rig[site]`` may
    change that site's session (to kill its agent at some call). Returns the session and each agent's
    recording client."""
    session = InMemorySession(SITES, study_id="st-1", round=0, call_timeout_s=20.0)

    def transport(client: Any, task: Task, checked: Any, *, site: str, **_: Any) -> InMemoryCollectives:
        member = session.member(site)
        member.close_with = lambda attestation: member.close()  # type: ignore[attr-defined]
        member.release = lambda: None  # type: ignore[attr-defined]
        rig.get(site, lambda m: None)(member)
        return member

    monkeypatch.setattr(agent_module, "HttpCollectives", transport)
    clients: dict[str, Any] = {}
    round_0 = pre_step_task(spec, site_homes)

    def one(site: str) -> None:
        site_agent, clients[site] = agent(site_homes[site], datasets(site))
        try:
            site_agent.handle(round_0)
        except Killed:  # the dead process calls no more: the others learn it from the session
            session.fail(SessionFailure.SITE_LOST, f"{site} died")

    threads = [threading.Thread(target=one, args=(s,)) for s in SITES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return session, clients


def datasets(site: str) -> dict[str, str]:
    return {"heart-disease": f"builtin://heart-disease/{SITES.index(site)}"}


def close_then_die(member: InMemoryCollectives) -> None:
    def closing(attestation: object) -> None:
        member.close()  # the closing call went out: the session concluded at every site
        raise Killed

    member.close_with = closing  # type: ignore[attr-defined]


def die_at_broadcast(member: InMemoryCollectives) -> None:
    def broadcast(data: bytes | None) -> bytes:
        raise Killed  # the sums are in, the release not yet computed here

    member.broadcast = broadcast  # type: ignore[method-assign]


def training(spec: StudySpec, scaling: ReleasedScaling, task_id: str = "tk-train") -> Task:
    return task(spec, task_id=task_id, scaling=scaling)


def released(session: InMemorySession) -> ReleasedScaling:
    s = read_scaling(session.relay.released)
    return ReleasedScaling(mean=list(s.mean), scale=list(s.scale), rows=s.rows)


def lie(scaling: ReleasedScaling) -> ReleasedScaling:
    return scaling.model_copy(update={"scale": [v * 10 for v in scaling.scale]})


# A federated study is a secure one: a training task that passes the scaling checks goes on to the secure
# round's checks, which these tasks (without a secure round) then fail: proof that the scaling was accepted.


def test_an_agent_killed_right_after_the_pre_steps_closing_call_still_checks_the_scaling(
    monkeypatch, tmp_path
):
    site_homes = homes(tmp_path)
    spec = study(site_homes)
    session, clients = run_pre_step(monkeypatch, spec, site_homes, rig={SITE: close_then_die})
    assert session.relay.done  # the session concluded: the orchestrator has the release
    honest = released(session)
    assert all(c.failures == [] for c in clients.values())
    # the restarted agent still knows what its own session released: the lie is refused, the release taken
    restarted, client = agent(site_homes[SITE], datasets(SITE))
    restarted.handle(training(spec, lie(honest), "tk-lied"))
    assert [f.code for f in client.failures] == [FailureCode.INVALID_TASK]
    restarted.handle(training(spec, honest, "tk-honest"))
    assert client.failures[-1].code is FailureCode.SECURE_ROUND_MISSING
    assert client.results == []


def test_an_agent_killed_mid_pre_step_refuses_the_scaling_a_lying_orchestrator_sends_anyway(
    monkeypatch, tmp_path, caplog
):
    site_homes = homes(tmp_path)
    spec = study(site_homes)
    session, _ = run_pre_step(monkeypatch, spec, site_homes, rig={SITE: die_at_broadcast})
    assert session.relay.failure is not None  # nothing was released
    # a lying orchestrator starts training all the same, with a scaling of its own
    honest = ReleasedScaling(mean=[50.0] * 13, scale=[10.0] * 13, rows=600)
    restarted, client = agent(site_homes[SITE], datasets(SITE))
    caplog.set_level(logging.WARNING, logger="fedhealth.agent")
    restarted.handle(training(spec, honest))
    assert [f.code for f in client.failures] == [FailureCode.INVALID_TASK]
    assert "joined the study's pre-step session and recorded no release" in caplog.text
    # upstream only the code: the local reason names the site home
    assert str(tmp_path) not in json.dumps([f.model_dump(mode="json") for f in client.failures])


def test_a_second_pre_step_session_for_the_same_study_is_refused_before_anything_is_sent(
    monkeypatch, tmp_path
):
    site_homes = homes(tmp_path)
    spec = study(site_homes)
    run_pre_step(monkeypatch, spec, site_homes)

    def transport(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the site joined a second pre-step session")

    monkeypatch.setattr(agent_module, "HttpCollectives", transport)
    # the orchestrator runs round 0 again (after a patient withdrew consent, say): the difference of the two
    # sessions' sums would be that patient's values
    restarted, client = agent(site_homes[SITE], datasets(SITE))
    again = pre_step_task(spec, site_homes).model_copy(update={"task_id": "tk-scaling-again"})
    restarted.handle(again)
    assert [f.code for f in client.failures] == [FailureCode.INVALID_TASK]


def test_a_training_site_whose_release_record_is_gone_refuses_every_scaling(monkeypatch, tmp_path, caplog):
    site_homes = homes(tmp_path)
    spec = study(site_homes)
    session, clients = run_pre_step(monkeypatch, spec, site_homes)
    honest = released(session)
    assert all(c.failures == [] for c in clients.values())
    (site_homes[SITE].root / "results.jsonl").unlink()  # removed by hand, or never written
    restarted, client = agent(site_homes[SITE], datasets(SITE))
    caplog.set_level(logging.WARNING, logger="fedhealth.agent")
    restarted.handle(training(spec, honest))
    assert [f.code for f in client.failures] == [FailureCode.INVALID_TASK]
    assert "results.jsonl" in caplog.text


def test_a_training_site_that_never_ran_the_pre_step_refuses_a_scaling_replayed_from_another_study(
    monkeypatch, tmp_path
):
    site_homes = homes(tmp_path)
    spec = study(site_homes)
    session, _ = run_pre_step(monkeypatch, spec, site_homes)
    other_study = released(session)
    # a second study of the same sites: the orchestrator skips its pre-step and replays the first's release
    second = study(site_homes, seed=7)
    restarted, client = agent(site_homes[SITE], datasets(SITE))
    replayed = task(second, task_id="tk-replayed", scaling=other_study).model_copy(
        update={"study_id": "st-2"}
    )
    restarted.handle(replayed)
    assert [f.code for f in client.failures] == [FailureCode.INVALID_TASK]
    # an evaluation-only site took no part in the pre-step: it takes the orchestrator's word, as for the model
    evaluator, client, evaluated = evaluation_only_site(tmp_path, spec, site_homes)
    evaluator.handle(task(evaluated, kind=TaskKind.EVALUATE, round=2, scaling=other_study))
    assert client.failures[-1].code is FailureCode.SECURE_ROUND_MISSING


def evaluation_only_site(
    tmp_path: Any, spec: StudySpec, site_homes: Mapping[str, SiteHome]
) -> tuple[Any, Any, StudySpec]:
    """A fourth site, hospital-d, that only evaluates: its agent, its recording client, and ``spec`` with it
    among the evaluation sites (approved there)."""
    outsider = make_home(tmp_path / "hospital-d", "hospital-d")
    keys = {s: h.identity().public().fingerprint for s, h in {**site_homes, "hospital-d": outsider}.items()}
    sa = SecureAggregationSpec(site_keys=keys)
    with_outsider = StudySpec.model_validate(
        {**spec.model_dump(), "eval_sites": sorted(keys), "secure_aggregation": sa.model_dump()}
    )
    approve(outsider, with_outsider)
    evaluator, client = agent(outsider, datasets(SITE))
    return evaluator, client, with_outsider


def test_a_pre_step_that_released_a_refusal_closes_the_session_and_refuses_any_scaling_after(
    monkeypatch, tmp_path, caplog
):
    names = ("age", "flag", "chol")
    rng = np.random.default_rng(0)

    def rows(i: int) -> TabularDataset:
        X = rng.normal(size=(40, 3))
        X[:, 1] = 1.0  # the same value at every site: std 0 over the federation
        return TabularDataset(
            name="heart-disease",
            X_train=X,
            y_train=(np.arange(40) % 2).astype(np.int64),
            X_test=X[:8],
            y_test=(np.arange(8) % 2).astype(np.int64),
            feature_names=names,
        )

    data = {f"builtin://heart-disease/{i}": rows(i) for i in range(len(SITES))}
    monkeypatch.setattr(agent_module, "open_dataset", lambda uri, data_dir: data[uri])
    site_homes = homes(tmp_path)
    spec = study(site_homes, names)
    caplog.set_level(logging.WARNING, logger="fedhealth.agent")
    session, clients = run_pre_step(monkeypatch, spec, site_homes)
    # every site closed the session on the refusal: the orchestrator fails the study with its one line
    with pytest.raises(ScalingRefusedError, match="'flag' is constant"):
        read_scaling(session.relay.released)
    assert session.relay.done
    assert session.relay.failure is None
    assert all(c.failures == [] for c in clients.values())
    assert "'flag' is constant" in caplog.text
    # a lying orchestrator trains the study anyway: the site released no scaling, so it takes none
    scaling = ReleasedScaling(mean=[0.0] * 3, scale=[1.0] * 3, rows=120)
    restarted, client = agent(site_homes[SITE], datasets(SITE))
    restarted.handle(training(spec, scaling))
    assert [f.code for f in client.failures] == [FailureCode.INVALID_TASK]


# --- participants whose sums no rows could give -------------------------------------------------------------


class OthersSent:
    """This site's session as the leader, where the two other participants together sent ``others``."""

    site = "a"
    sites = ("a", "b", "c")

    def __init__(self, others: np.ndarray) -> None:
        self.others = others

    def checked_sum(self, limbs: np.ndarray) -> np.ndarray:
        return np.asarray(limbs + split_limbs(self.others, len(self.sites)))

    def broadcast(self, data: bytes | None) -> bytes:
        assert data is not None
        return data


def own_rows() -> TabularDataset:
    rng = np.random.default_rng(1)
    X = rng.normal(loc=50.0, scale=10.0, size=(30, 3))
    return TabularDataset(
        name="d",
        X_train=X,
        y_train=(np.arange(30) % 2).astype(np.int64),
        X_test=X[:4],
        y_test=np.array([0, 1, 0, 1], dtype=np.int64),
        feature_names=("x0", "x1", "x2"),
    )


def honest_others() -> np.ndarray:
    rng = np.random.default_rng(2)
    return scaling_sums(rng.normal(loc=48.0, scale=12.0, size=(60, 3)), 3)


def _count(values: np.ndarray, by: list[float]) -> np.ndarray:
    out = values.copy()
    out[:3] += np.asarray(by)
    return out


@pytest.mark.parametrize(
    ("others", "problem"),
    [
        # one feature counted over more rows than the others: a mean and a scale of rows that do not exist
        (lambda o: _count(o, [0.0, 500.0, 0.0]), "the row count differs between features"),
        (lambda o: _count(o, [0.5, 0.5, 0.5]), "the row count is not a whole number of rows"),
        # fewer rows over the federation than this site alone holds: the others sent a negative count
        (lambda o: _count(o, [-90.0, -90.0, -90.0]), "the federation counts fewer rows than this site holds"),
        # a sum of squares below what the sums allow: no rows give a negative variance
        (lambda o: np.concatenate([o[:6], o[6:] - 1e9]), "feature 'x0' has a negative variance"),
    ],
    ids=["uneven-counts", "fractional-count", "negative-rows", "negative-variance"],
)
def test_sums_no_rows_could_give_refuse_the_session_before_anything_is_released(others, problem):
    session = OthersSent(others(honest_others()))
    with pytest.raises(ScalingSumsError, match=problem) as caught:
        run_scaling_site(session, own_rows(), ("x0", "x1", "x2"))  # type: ignore[arg-type]
    assert isinstance(caught.value, InputError)
    assert "\n" not in str(caught.value)


def test_honest_sums_from_the_other_sites_give_the_pooled_release():
    others = honest_others()
    release = json.loads(run_scaling_site(OthersSent(others), own_rows(), ("x0", "x1", "x2")))  # type: ignore[arg-type]
    rng = np.random.default_rng(2)
    pooled = np.concatenate([own_rows().X_train, rng.normal(loc=48.0, scale=12.0, size=(60, 3))])
    np.testing.assert_allclose(release["mean"], pooled.mean(axis=0), rtol=1e-12)
    assert release["rows"] == 90


# --- what a task may carry ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scaling",
    [
        {"mean": [0.0] * 13, "scale": [1.0] * 12 + [0.0], "rows": 9},
        {"mean": [0.0] * 13, "scale": [1.0] * 12 + [-2.0], "rows": 9},
        {"mean": [0.0] * 12 + [float("nan")], "scale": [1.0] * 13, "rows": 9},
        {"mean": [0.0] * 13, "scale": [1.0] * 12 + [float("inf")], "rows": 9},
    ],
    ids=["zero-scale", "negative-scale", "nan-mean", "inf-scale"],
)
def test_a_task_whose_scaling_no_pre_step_could_release_is_no_task_at_all(tmp_path, scaling):
    site_homes = homes(tmp_path)
    spec = study(site_homes)
    body = json.loads(task(spec).model_dump_json())
    body["scaling"] = scaling
    with pytest.raises(ValueError, match="scaling"):
        Task.model_validate_json(json.dumps(body, allow_nan=True))


def test_an_evaluation_site_refuses_a_scaling_of_the_wrong_width(tmp_path):
    site_homes = homes(tmp_path)
    spec = study(site_homes)
    evaluator, client, evaluated = evaluation_only_site(tmp_path, spec, site_homes)
    narrow = ReleasedScaling(mean=[0.0] * 12, scale=[1.0] * 12, rows=9)
    evaluator.handle(task(evaluated, kind=TaskKind.EVALUATE, round=2, scaling=narrow))
    assert [f.code for f in client.failures] == [FailureCode.INVALID_TASK]
    assert client.evaluations == []


def test_a_scaling_on_a_study_that_does_not_standardize_federated_is_refused(tmp_path):
    home = make_home(tmp_path / "home")
    params = LogRegParams.model_validate({"n_features": 13, "feature_names": list(HEART_DISEASE_FEATURES)})
    spec = StudySpec(
        name="plain",
        dataset="heart-disease",
        recipe=recipe_spec(LOGREG_RECIPE, params),
        rounds=1,
        train_sites=[SITE],
    )
    approve(home, spec)
    site_agent, client = agent(home, datasets(SITE))
    site_agent.handle(task(spec, scaling=ReleasedScaling(mean=[0.0] * 13, scale=[1.0] * 13, rows=9)))
    assert [f.code for f in client.failures] == [FailureCode.INVALID_TASK]
    assert client.results == []


def test_a_federated_scaling_study_of_two_sites_is_refused_before_any_sum(tmp_path):
    # with two sites the totals less one site's own figures are the other site's: no session is held
    two = {s: make_home(tmp_path / s, s) for s in SITES[:2]}
    keys = {s: h.identity().public().fingerprint for s, h in two.items()}
    spec = study(homes(tmp_path / "three")).model_copy(
        update={"train_sites": sorted(two), "min_sites": 2, "secure_aggregation": None}
    )
    spec = StudySpec.model_validate(
        {**spec.model_dump(), "secure_aggregation": SecureAggregationSpec(site_keys=keys).model_dump()}
    )
    with pytest.raises(RecipeError, match="at least 3 sites"):
        check_recipe(spec)
