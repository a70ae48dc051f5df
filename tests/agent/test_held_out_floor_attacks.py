"""Attacks on the held-out cohort floor (docs/governance.md, step 10; docs/privacy.md, *held-out metrics*):
a site releases no figure computed from fewer than its ``min_cohort_k`` held-out patients after consent. Here
the figure is sought by the other routes to the held-out rows: a collective session (XGBoost's Cox C-index,
released per site by name), a dataset with no held-out row at all (can the failure tell 0 from 1..k-1?), and
differencing two evaluations a withdrawal apart (a documented limit). And what a hospital's engineer
expects still holds: a study whose every site has k held-out patients or more reports what the in-memory
driver computes, and Fed-Heart-Disease's smallest centre releases its metrics at the default k.

The real agent with its real gates on real site homes; a collective session's program runs in memory (real
masks and relay) on the rows the agent's gates hand on.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from site_fixtures import SITE, agent, approve, make_home, task
from test_held_out_withheld_study import run_study

import fedhealth.agent._agent as agent_module
from fedhealth.agent import SiteHome
from fedhealth.agent._governance import SiteGovernance
from fedhealth.core import encode_tensors, sha256_hex
from fedhealth.crypto import IdentityKey
from fedhealth.data import TabularDataset, open_dataset
from fedhealth.governance import AuditEventType, read_stored_log
from fedhealth.learning import (
    XGBOOST_RECIPE,
    InMemorySession,
    SessionContext,
    SiteSessionOutcome,
    XGBoostModel,
    XGBoostParams,
)
from fedhealth.learning._survival import harrell_c
from fedhealth.orchestrator import build_report
from fedhealth.protocol import (
    CollectiveSessionInfo,
    SecureAggregationSpec,
    StudySpec,
    Task,
    TaskKind,
)
from fedhealth.runtime import evaluate_on_site, initial_model, recipe_spec, summarize, train_on_site
from support import heart_data_dir, logreg_recipe

PATIENTS = [f"p{i:04d}" for i in range(40)]
OTHERS = {s: IdentityKey.generate() for s in ("hospital-b", "hospital-c")}
COX = XGBoostParams(
    n_features=2,
    objective="survival:cox",
    num_rounds=4,
    max_depth=2,
    time_range=(0.0, 60.0),
    value_range=(-5.0, 5.0),
)


@pytest.fixture
def home(tmp_path: Path) -> SiteHome:
    return make_home(tmp_path / "site")


def write_cohort(path: Path) -> Path:
    rows = [f"{p},{i % 7 / 3:.3f},{i % 5 - 2},{i % 2}" for i, p in enumerate(PATIENTS)]
    path.write_text("patient_id,age,marker,label\n" + "\n".join(rows) + "\n")
    return path


def cohort_uri(path: Path, test_fraction: float) -> str:
    """40 patients, stratified: 0.3 holds out 12, 0.05 holds out 2, 0 holds out none."""
    return f"file://{path}?label=label&id=patient_id&test_fraction={test_fraction}"


def logreg_study() -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "held-out-floor",
            "dataset": "cohort",
            "recipe": logreg_recipe(2, learning_rate=0.5),
            "rounds": 1,
            "train_sites": [SITE],
        }
    )


# --- a collective session: the Cox C-index each site releases by name --------------------------------------


def write_survival(path: Path, *, seed: int, rows: int = 60) -> Path:
    """Survival rows with patient ids: two features, a time in months and an event indicator."""
    rng = np.random.default_rng(seed)
    lines = ["patient_id,x1,x2,months,event"]
    for i in range(rows):
        x = rng.normal(size=2)
        event_time = rng.exponential(1 / np.exp(0.9 * x[0] - 0.4 * x[1])) * 20
        censor = rng.uniform(0, 60)
        months = max(min(event_time, censor), 0.05)
        lines.append(f"s{seed}-{i:03d},{x[0]:.4f},{x[1]:.4f},{months:.2f},{int(event_time <= censor)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def survival_uri(path: Path, test_fraction: float) -> str:
    return f"file://{path}?label=event&id=patient_id&time=months&test_fraction={test_fraction}"


def cox_study(home: SiteHome) -> StudySpec:
    keys = {SITE: home.identity().public().fingerprint}
    keys |= {s: k.public().fingerprint for s, k in OTHERS.items()}
    return StudySpec(
        name="cox-floor",
        dataset="survival",
        recipe=recipe_spec(XGBOOST_RECIPE, COX),
        rounds=1,
        train_sites=sorted(keys),
        min_sites=3,
        secure_aggregation=SecureAggregationSpec(site_keys=keys),
    )


class _NoTransport:
    """Stands in for the agent's HTTP session: the site program runs in memory after the agent is done."""

    calls = 0
    sites = (SITE, *OTHERS)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def open(self) -> None:
        pass

    def close_with(self, attestation: object) -> None:
        pass

    def release(self) -> None:
        pass


def rows_handed_to_the_session(home: SiteHome, uri: str, monkeypatch: pytest.MonkeyPatch) -> TabularDataset:
    """The dataset the agent's gates hand to a Cox session's site program at ``home``."""
    spec = cox_study(home)
    approve(home, spec)
    handed: list[TabularDataset] = []

    def program(recipe: Any, spec: StudySpec, dataset: TabularDataset, *args: Any, **kw: Any) -> Any:
        handed.append(dataset)
        return SiteSessionOutcome(record={})

    monkeypatch.setattr(agent_module, "HttpCollectives", _NoTransport)
    monkeypatch.setattr(agent_module, "run_site_program", program)
    site, client = agent(home, {"survival": uri})
    peers = {SITE: home.identity().public().raw.hex()} | {s: k.public().raw.hex() for s, k in OTHERS.items()}
    session = CollectiveSessionInfo(sites=sorted(peers), peer_keys=peers, attempt="attempt-1")
    site.handle(
        Task(
            task_id="tk-session",
            study_id="st-1",
            round=1,
            kind=TaskKind.COLLECTIVE,
            dataset=spec.dataset,
            recipe=spec.recipe,
            model_digest="0" * 64,
            seed=spec.seed,
            deadline=datetime.now(UTC) + timedelta(minutes=5),
            spec=spec,
            collective=session,
        )
    )
    assert client.failures == []
    (dataset,) = handed
    return dataset


def cox_session(datasets: Mapping[str, TabularDataset]) -> dict[str, Any]:
    """The Cox session over ``datasets``' sites, in memory; the result as the orchestrator reads it."""
    session = InMemorySession(sorted(datasets), call_timeout_s=60)

    def program(member: Any) -> SiteSessionOutcome:
        ctx = SessionContext(site=member.site, seed=0, rng=np.random.default_rng(0))
        return XGBOOST_RECIPE.run_site(COX, datasets[member.site], member, ctx)

    session.run(program)
    return XGBOOST_RECIPE.finish(COX, session.relay.released)


def others(tmp_path: Path) -> dict[str, TabularDataset]:
    return {
        s: open_dataset(survival_uri(write_survival(tmp_path / f"{s}.csv", seed=i + 1), 0.3))
        for i, s in enumerate(OTHERS)
    }


def test_a_cox_session_releases_no_c_index_of_a_site_with_fewer_than_k_held_out_patients(
    home, tmp_path, monkeypatch
):
    path = write_survival(tmp_path / "a.csv", seed=0)
    uri = survival_uri(path, 0.05)  # 60 patients, 3 held out; k = 10
    handed = rows_handed_to_the_session(home, uri, monkeypatch)
    result = cox_session({SITE: handed, **others(tmp_path)})
    # the figure the site would otherwise release: Harrell's C of its 3 held-out patients, by name
    own = open_dataset(uri)
    assert own.num_test == 3
    assert handed.num_train == own.num_train  # the site takes part with every training row
    would_be = harrell_c(own.time_test, own.y_test, XGBoostModel.from_result(result).margin(own.X_test))
    assert would_be is not None
    assert result["c_index_sites"][SITE] is None
    assert set(result["c_index_sites"]) == {SITE, *OTHERS}
    assert all(result["c_index_sites"][s] is not None for s in OTHERS)
    # nor do its held-out rows count in the session's test sums
    assert result["test_rows"] == sum(d.num_test for d in others(tmp_path).values())
    with SiteGovernance(home) as governance:
        entries = read_stored_log(governance.engine).entries
    (held_out,) = [
        e.payload
        for e in entries
        if e.type == AuditEventType.POLICY_DECISION and e.payload["subject"].get("rows") == "held-out"
    ]
    assert (held_out["rule"], held_out["allowed"]) == ("min_cohort_k", False)


def test_control_a_cox_session_releases_the_c_index_of_a_site_with_k_held_out_patients_or_more(
    home, tmp_path, monkeypatch
):
    uri = survival_uri(write_survival(tmp_path / "a.csv", seed=0), 0.3)  # 18 held out
    handed = rows_handed_to_the_session(home, uri, monkeypatch)
    assert handed.num_test == 18
    result = cox_session({SITE: handed, **others(tmp_path)})
    exact = harrell_c(handed.time_test, handed.y_test, XGBoostModel.from_result(result).margin(handed.X_test))
    assert result["c_index_sites"][SITE] == pytest.approx(exact, abs=1e-9)


# --- no held-out row at all: told apart from 1..k-1 by nothing the orchestrator receives --------------------


def test_an_evaluation_is_answered_alike_whether_the_site_holds_out_no_patient_or_fewer_than_k(
    home, tmp_path
):
    spec = logreg_study()
    approve(home, spec)
    data = write_cohort(tmp_path / "cohort.csv")
    received = []
    for fraction in (0.0, 0.05):  # no held-out row; 2 held-out patients
        assert open_dataset(cohort_uri(data, fraction)).num_test == {0.0: 0, 0.05: 2}[fraction]
        site, client = agent(home, {"cohort": cohort_uri(data, fraction)})
        site.handle(task(spec, kind=TaskKind.EVALUATE, round=2, task_id=f"tk-{fraction}"))
        assert client.failures == []
        (answer,) = client.evaluations
        m = answer.metrics
        received.append((m.num_samples, m.num_eval_samples, m.eval_loss, m.accuracy, m.auc))
    assert received[0] == received[1] == (0, 0, None, None, None)


def test_a_training_round_on_a_dataset_without_held_out_rows_releases_no_held_out_figure(home, tmp_path):
    spec = logreg_study()
    approve(home, spec)
    site, client = agent(home, {"cohort": cohort_uri(write_cohort(tmp_path / "cohort.csv"), 0.0)})
    site.handle(task(spec))
    assert client.failures == []
    (result,) = client.results
    assert result.metrics is not None
    assert result.metrics.num_samples == 40
    assert result.metrics.num_eval_samples == 0
    assert (result.metrics.eval_loss, result.metrics.accuracy, result.metrics.auc) == (None, None, None)


# --- differencing across a withdrawal: a documented limit ---------------------------------------------------


def crafted_model(spec: StudySpec) -> dict[str, np.ndarray]:
    """A model the orchestrator chose: weights that make each held-out row's loss its own."""
    params = {k: np.asarray(v).copy() for k, v in initial_model(spec.recipe, spec.seed).items()}
    for value in params.values():
        value[...] = np.linspace(0.7, -0.4, value.size).reshape(value.shape)
    return params


def evaluation_of(spec: StudySpec, params: Mapping[str, np.ndarray], task_id: str) -> Task:
    blob = encode_tensors(dict(params))
    wire = task(spec, kind=TaskKind.EVALUATE, round=spec.rounds + 1, task_id=task_id)
    return wire.model_copy(
        update={"model_digest": sha256_hex(blob), "model_inline": base64.b64encode(blob).decode()}
    )


def test_known_limit_two_released_evaluations_a_withdrawal_apart_give_that_patients_loss_by_subtraction(
    home, tmp_path
):
    """k + 1 then k held-out patients (one withdrew in between): both evaluations are released, and their
    summed losses differ by the withdrawn patient's own loss under the crafted model. The floor bounds the
    size of each figure, not the difference of two (docs/privacy.md: held-out metrics are not covered)."""
    spec = logreg_study()
    approve(home, spec)
    home.policy_path.write_text('min_cohort_k = 11\nconsent_model = "opt-out"\n')
    uri = cohort_uri(write_cohort(tmp_path / "cohort.csv"), 0.3)  # 12 held out
    site, client = agent(home, {"cohort": uri})
    model = crafted_model(spec)
    site.handle(evaluation_of(spec, model, "tk-before"))
    whole = open_dataset(uri)
    assert whole.patient_ids_test is not None
    leaver = whole.patient_ids_test[0]
    with SiteGovernance(home) as governance:
        governance.consent().withdraw(leaver, "research")
    site.handle(evaluation_of(spec, model, "tk-after"))
    assert client.failures == []
    before, after = (e.metrics for e in client.evaluations)
    assert before is not None
    assert after is not None
    assert (before.num_eval_samples, after.num_eval_samples) == (12, 11)
    assert before.eval_loss is not None
    assert after.eval_loss is not None
    difference = 12 * before.eval_loss - 11 * after.eval_loss
    # the leaver's loss alone, computed on that one row as the site computes it
    one = whole.select(np.ones(whole.num_train, dtype=bool), np.arange(whole.num_test) == 0)
    alone = evaluate_on_site(evaluation_of(spec, model, "tk-ref"), model, one)
    assert alone.num_eval_samples == 1
    assert alone.eval_loss is not None
    assert difference == pytest.approx(alone.eval_loss, abs=1e-9)


# --- what a hospital's engineer expects still holds ---------------------------------------------------------


def test_a_study_whose_every_site_has_k_held_out_patients_reports_what_the_runtime_computes_without_gates(
    tmp_path,
):
    """Through the agents' gates and the round engine (tests/agent/test_held_out_withheld_study.py's driver,
    which hands every task the initial model), against the runtime's own functions on the same rows with no
    gate: the same training and evaluation figures, and nothing marked withheld."""
    fractions = {"north": 0.3, "south": 0.3}  # 12 held out each, k = 10
    store, study_id = run_study(tmp_path, fractions)
    report = build_report(store, study_id)
    assert report["status"] == "completed", report["reason"]
    (training,) = report["rounds"]
    assert "held_out_withheld" not in training["metrics"]
    assert "held_out_withheld" not in report["evaluation"]
    spec = StudySpec.model_validate(
        {
            "name": "held-out-study",
            "dataset": "cohort",
            "recipe": logreg_recipe(2, learning_rate=0.5),
            "rounds": 1,
            "train_sites": sorted(fractions),
            "min_sites": len(fractions),
        }
    )
    params = initial_model(spec.recipe, spec.seed)
    rows = {s: open_dataset(cohort_uri(tmp_path / "cohort.csv", f)) for s, f in fractions.items()}
    trained = [train_on_site(task(spec), s, params, rows[s]).metrics for s in sorted(rows)]
    expected = summarize(spec.strategy, trained)
    assert set(expected) <= set(training["metrics"])
    assert {"accuracy", "auc", "eval_loss"} <= set(expected)
    for key, value in expected.items():
        assert training["metrics"][key] == pytest.approx(value, abs=1e-12), key
    evaluation = task(spec, kind=TaskKind.EVALUATE, round=2)
    for site, data in rows.items():
        metrics = evaluate_on_site(evaluation, params, data)
        shown = report["evaluation"]["per_site"][site]
        assert shown["num_eval_samples"] == metrics.num_eval_samples == 12
        for key in ("eval_loss", "accuracy", "auc"):
            assert shown[key] == pytest.approx(getattr(metrics, key), abs=1e-12), (site, key)


def test_fed_heart_disease_s_smallest_centre_releases_its_metrics_at_the_default_k(home):
    """Switzerland (centre 2) holds out 16 patients: at k = 10 its training round and its evaluation report
    their held-out figures, as before the floor."""
    spec = StudySpec.model_validate(
        {
            "name": "switzerland",
            "dataset": "heart-disease",
            "recipe": logreg_recipe(13),
            "rounds": 1,
            "train_sites": [SITE],
        }
    )
    heart_data_dir()
    approve(home, spec)
    uri = "builtin://heart-disease/2"
    site, client = agent(home, {"heart-disease": uri})
    site.handle(task(spec))
    site.handle(task(spec, kind=TaskKind.EVALUATE, round=2, task_id="tk-eval"))
    assert client.failures == []
    (result,) = client.results
    (evaluated,) = client.evaluations
    for metrics in (result.metrics, evaluated.metrics):
        assert metrics is not None
        assert metrics.num_eval_samples == open_dataset(uri).num_test == 16
        assert None not in (metrics.eval_loss, metrics.accuracy, metrics.auc)
