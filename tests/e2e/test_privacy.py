"""Differential privacy through the real orchestrator and agents: a site refuses a study over its budget
before any data is read, studies on one dataset compose, spend is visible at the orchestrator, DP-SGD
results equal the in-memory computation, and an agent killed while it holds a reservation never
under-counts.

Each test uses a dataset name of its own (all on the same breast-cancer data), so each has its own budgets.
"""

from __future__ import annotations

import re
import signal
import time

import numpy as np
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from fedhealth.cli._privacy import budget_app
from fedhealth.core import decode_tensors
from fedhealth.data import open_dataset
from fedhealth.governance import AuditEventType, read_stored_log
from fedhealth.learning import (
    apply_strategy,
    logreg_evaluate,
    logreg_init,
    logreg_train_dp,
    task_rng,
    weighted_mean,
)
from fedhealth.privacy import DpPlan, DpSgdRelease, GaussianRelease, calibrate_noise, epsilon
from fedhealth.protocol import (
    DpMode,
    FailureCode,
    PrivacySpec,
    SecureAggregationSpec,
    StudyPrivacyInfo,
    StudyStatus,
    Task,
    TaskKind,
    TaskStatus,
)
from fedhealth.runtime import (
    REPRODUCIBLE_NOISE_ENV,
    aggregate,
    initial_model,
    run_study_in_memory,
    train_on_site,
)
from fedhealth.runtime._privacy import distributed_clip_room
from fedhealth.sim import LocalFederation
from support import BREAST_SITES, breast_datasets, breast_spec, heart_data_dir, logreg_recipe

pytestmark = pytest.mark.e2e

A, B, C, D = "hospital-a", "hospital-b", "hospital-c", "hospital-d"
DELTA = 1e-5
Q, STEPS, ROUNDS = 0.1, 5, 3
COMPOSE_BUDGET = 1.5  # one study at epsilon 1 composes with a second to 1.36, with a third to 1.65

runner = CliRunner()


def dp_spec(name: str, dataset: str, sites: list[str], *, target: float | None = 1.0, **overrides: object):
    privacy = PrivacySpec(
        delta=DELTA,
        target_epsilon=target,
        noise_multiplier=overrides.pop("noise_multiplier", None),  # type: ignore[arg-type]
        max_grad_norm=1.0,
        sample_rate=Q,
        steps_per_round=overrides.pop("steps_per_round", STEPS),  # type: ignore[arg-type]
    )
    fields: dict[str, object] = {
        "dataset": dataset,
        "recipe": logreg_recipe(30, learning_rate=0.5),
        "rounds": ROUNDS,
        "privacy": privacy,
        "min_sites": 1,
        "round_deadline_s": 120.0,
    }
    fields.update(overrides)
    return breast_spec(sites, name=name, **fields)


def one_study(target: float = 1.0) -> DpPlan:
    """What a study of ``dp_spec`` releases at one site, computed from the privacy package alone."""
    sigma = calibrate_noise(target, DELTA, Q, STEPS * ROUNDS)
    return DpPlan.of(DpSgdRelease(noise_multiplier=sigma, sample_rate=Q, steps=STEPS * ROUNDS))


def privacy_info(fed: LocalFederation, study_id: str) -> StudyPrivacyInfo:
    return StudyPrivacyInfo.model_validate(
        fed.operator.request("GET", f"/api/v1/studies/{study_id}/privacy").json()
    )


def site_log(fed: LocalFederation, site: str):
    return read_stored_log(sa.create_engine(f"sqlite:///{fed.site_home(site).database_path}")).entries


def wait_until(predicate, timeout=120.0, interval=0.005):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(interval)


def d_datasets() -> dict[str, str]:
    return {"bc-kill": BREAST_SITES[D], "bc-secure": BREAST_SITES[D]}


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dp")
    with LocalFederation(workdir, env={REPRODUCIBLE_NOISE_ENV: "1"}) as fed:
        fed.start_orchestrator()
        for site in (A, B, C, D):
            fed.add_site(site)
        for site in (A, B):
            fed.set_budget(site, "bc-refuse", 5.0, DELTA)
            fed.set_budget(site, "bc-compose", COMPOSE_BUDGET, DELTA)
            uri = BREAST_SITES[site]
            fed.start_agent(site, {"bc-refuse": uri, "bc-compose": uri, "bc-secure": uri})
        # C's dataset is deleted once its agent has started (site serve checks every dataset at start): a
        # task that opened it could only fail on the missing file
        fed.set_budget(C, "bc-refuse", 0.5, DELTA)
        c_csv = workdir / "c-breast.csv"
        c_csv.write_text("x1,x2,target\n" + "".join(f"{i},{i % 5},{i % 2}\n" for i in range(40)))
        fed.start_agent(C, {"bc-refuse": f"file://{c_csv}?label=target"})
        fed.set_budget(D, "bc-kill", 100.0, DELTA)
        fed.start_agent(D, d_datasets())
        for site in (A, B, D):
            fed.set_budget(site, "bc-secure", 50.0, DELTA)
        fed.wait_for_sites([A, B, C, D])
        c_csv.unlink()
        yield fed


def test_a_study_over_a_sites_budget_is_refused_there_before_any_data_is_read(fed):
    spec = dp_spec("over-budget-at-c", "bc-refuse", [A, B, C], eval_sites=[A, B], min_sites=2)
    study = fed.create_study(spec)
    final = fed.wait_for_study(study.study_id, timeout=240)
    assert final.status is StudyStatus.COMPLETED, final.reason
    needs = epsilon(one_study(), delta=DELTA)
    for r in final.rounds[:-1]:
        by_site = {t.site: t for t in r.tasks}
        assert by_site[A].status is by_site[B].status is TaskStatus.COMPLETED
        refused = by_site[C]
        assert refused.status is TaskStatus.FAILED
        # refused by the budget -- not by the missing file, which it never opened; the orchestrator gets the
        # code and its fixed sentence, the figures stay in C's own log
        assert refused.reason == f"budget_exceeded: {FailureCode.BUDGET_EXCEEDED.message}", refused.reason
    # the refusal is in C's own audit trail with the figures, and C's ledger charged nothing
    refusals = [
        e
        for e in site_log(fed, C)
        if e.type == AuditEventType.TASK_REFUSED and e.payload["study_id"] == study.study_id
    ]
    assert len(refusals) == ROUNDS
    assert all(e.payload["rule"] == "budget_exceeded" for e in refusals)
    assert all("budget epsilon 0.5 at delta 1e-05" in e.payload["reason"] for e in refusals)
    assert all("over the budget" in e.payload["reason"] for e in refusals)
    # at the first round the site refuses the whole study, naming what its 3 rounds would cost
    assert (
        f"3 remaining training rounds need epsilon {needs:.4g} on their own" in refusals[0].payload["reason"]
    )
    assert fed.budget_ledger(C).statement("bc-refuse").spent_epsilon == 0.0
    # A and B paid exactly the study's epsilon, which the orchestrator shows beside C's refusal
    info = privacy_info(fed, study.study_id)
    sites = {s.site: s for s in info.sites}
    for site in (A, B):
        s = sites[site]
        assert s.noise_multiplier == one_study().releases[0].noise_multiplier
        assert s.tasks_charged == ROUNDS
        assert s.spent is not None
        assert s.spent.study_epsilon == pytest.approx(needs, rel=1e-9)
        assert needs <= 1.0
        assert (s.spent.budget_epsilon, s.spent.delta) == (5.0, DELTA)
        assert s.remaining_epsilon == pytest.approx(5.0 - needs, rel=1e-9)
        assert s.spent.reproducible_noise is True
        spent = [e for e in site_log(fed, site) if e.type == AuditEventType.BUDGET_SPENT]
        assert len([e for e in spent if e.payload["study_id"] == study.study_id]) == ROUNDS
    assert sites[C].tasks_charged == 0
    assert sites[C].refusal.startswith("budget_exceeded")
    assert sites[C].spent is not None
    assert sites[C].spent.study_epsilon == 0.0
    assert [s["site"] for s in fed.report(study.study_id)["privacy"]["sites"]] == [A, B, C]
    # and the model is exactly what the in-memory rounds compute with A and B (C contributed nothing)
    model, _ = decode_tensors(fed.model_bytes(study.study_id))
    alone = spec.model_copy(update={"train_sites": [A, B]})
    reference = run_study_in_memory(alone, breast_datasets({s: BREAST_SITES[s] for s in (A, B)}))
    for name, value in reference.params.items():
        np.testing.assert_array_equal(model[name], value)
    # a DP training task reports no training loss (it is computed from the records without noise)
    assert all(t.metrics.train_loss is None for r in final.rounds[:-1] for t in r.tasks if t.metrics)


def test_two_studies_on_one_dataset_compose_and_a_third_that_would_exceed_the_budget_is_refused(fed):
    ids = []
    for n in (1, 2):
        study = fed.create_study(dp_spec(f"compose-{n}", "bc-compose", [A, B], min_sites=2))
        final = fed.wait_for_study(study.study_id, timeout=240)
        assert final.status is StudyStatus.COMPLETED, final.reason
        ids.append(study.study_id)
    one = epsilon(one_study(), delta=DELTA)
    two = epsilon(one_study() + one_study(), delta=DELTA)
    three = epsilon(one_study() + one_study() + one_study(), delta=DELTA)
    assert one < two <= COMPOSE_BUDGET < three  # composition, and less than the sum
    result = runner.invoke(budget_app, ["show", "bc-compose", "--home", str(fed.site_home(A).root)])
    assert result.exit_code == 0, result.output
    assert f"spent {two:.4g}" in result.stdout
    for study_id in ids:
        assert re.search(rf"{study_id}: epsilon {one:.4g} \({ROUNDS} committed, 0 reserved\)", result.stdout)
    info = privacy_info(fed, ids[1])
    assert {s.site: round(s.spent.total_epsilon, 9) for s in info.sites} == {
        A: round(two, 9),
        B: round(two, 9),
    }
    # the third is refused by both sites at its first round, before either reads data
    third = fed.create_study(dp_spec("compose-3", "bc-compose", [A, B], min_sites=1))
    final = fed.wait_for_study(third.study_id, timeout=120)
    assert final.status is StudyStatus.FAILED
    for task in final.rounds[0].tasks:
        assert task.status is TaskStatus.FAILED
        assert task.reason == f"budget_exceeded: {FailureCode.BUDGET_EXCEEDED.message}"
        [refusal] = [
            e
            for e in site_log(fed, task.site)
            if e.type == AuditEventType.TASK_REFUSED and e.payload["task_id"] == task.task_id
        ]
        assert f"budget epsilon {COMPOSE_BUDGET:g}" in refusal.payload["reason"]
        assert (
            f"with the {two:.4g} already spent or reserved the total would reach {three:.4g}"
            in refusal.payload["reason"]
        )
    assert fed.budget_ledger(A).statement("bc-compose").spent_epsilon == pytest.approx(two, rel=1e-9)


def test_an_agent_killed_while_it_holds_a_reservation_never_under_counts(fed):
    # one long round (20,000 DP-SGD steps, seconds of training) so the kill lands between reserve and commit
    spec = dp_spec(
        "killed", "bc-kill", [D], target=None, noise_multiplier=8.0, steps_per_round=20_000, rounds=1
    )
    ledger = fed.budget_ledger(D)
    study = fed.create_study(spec)
    wait_until(lambda: ledger.pending("bc-kill"))
    fed.stop_agent(D, sig=signal.SIGKILL)
    [pending] = ledger.pending("bc-kill")
    assert pending.study_id == study.study_id
    one_round = epsilon(DpSgdRelease(noise_multiplier=8.0, sample_rate=Q, steps=20_000), delta=DELTA)
    statement = ledger.statement("bc-kill")
    assert statement.spent_epsilon == pytest.approx(one_round, rel=1e-9)  # counted in full
    assert statement.studies[0].reserved_tasks == 1
    # restarted, the agent reports the unsettled reservation and refuses to run the same task again
    fed.start_agent(D, d_datasets())
    final = fed.wait_for_study(study.study_id, timeout=120)
    assert final.status is StudyStatus.FAILED
    [task] = final.rounds[0].tasks
    assert task.status is TaskStatus.FAILED
    assert task.reason.startswith("budget_already_charged: ")
    assert ledger.statement("bc-kill").spent_epsilon == pytest.approx(one_round, rel=1e-9)
    assert [r.reservation_id for r in ledger.pending("bc-kill")] == [pending.reservation_id]
    log_text = (fed.logs / f"agent-{D}.log").read_text()
    assert f"reservation {pending.reservation_id}" in log_text
    assert "never settled" in log_text
    result = runner.invoke(budget_app, ["show", "--home", str(fed.site_home(D).root)])
    assert f"never settled: task {pending.task_id}" in result.stdout


def test_site_distributed_noise_is_added_at_each_site_and_carried_by_the_secure_sum(fed):
    sigma, clip, quorum = 1.0, 0.5, 2
    keys = fed.site_keys([A, B, D])
    draft = breast_spec(
        [A, B, D],
        name="distributed",
        dataset="bc-secure",
        rounds=2,
        min_sites=quorum,
        round_deadline_s=120.0,
        secure_aggregation=SecureAggregationSpec(stage_timeout_s=30.0, site_keys=keys),
        privacy=PrivacySpec(
            mode=DpMode.SITE_DISTRIBUTED, delta=DELTA, noise_multiplier=sigma, max_grad_norm=clip
        ),
    )
    # the codec's clip leaves the room that keeps every noisy value of the study unclipped but for delta/100
    room, _ = distributed_clip_room(draft)
    secure = SecureAggregationSpec(update_clip=room + 0.01, stage_timeout_s=30.0, site_keys=keys)
    spec = draft.model_copy(update={"secure_aggregation": secure})
    study = fed.create_study(spec)
    final = fed.wait_for_study(study.study_id, timeout=300)
    assert final.status is StudyStatus.COMPLETED, final.reason
    assert [r.status.value for r in final.rounds] == ["completed"] * 3  # two training rounds, one evaluation
    # every site clipped its update and added its share (reproducible here): the orchestrator only ever
    # decoded the sum, which equals the sum of the same noisy updates up to the codec's rounding
    contributors = [[t.site for t in r.tasks if t.status is TaskStatus.COMPLETED] for r in final.rounds[:2]]
    assert all(len(sites) >= quorum for sites in contributors)
    datasets = breast_datasets({s: BREAST_SITES[s] for s in (A, B, D)})
    params, state = initial_model(spec.recipe, spec.seed), {}
    for number, sites in enumerate(contributors, start=1):
        task = Task(
            task_id="x",
            study_id="x",
            round=number,
            kind=TaskKind.TRAIN,
            dataset=spec.dataset,
            recipe=spec.recipe,
            model_digest="0" * 64,
            seed=spec.seed,
            deadline="2030-01-01T00:00:00Z",
            spec=spec,
        )
        updates = []
        for site in sorted(sites):
            outcome = train_on_site(task, site, params, datasets[site], reproducible_noise=True)
            updates.append((outcome.metrics.num_samples, outcome.delta))
        params, state = aggregate(spec.strategy, params, updates, state, spec=spec)
    model, _ = decode_tensors(fed.model_bytes(study.study_id))
    for name, value in params.items():
        np.testing.assert_allclose(model[name], value, atol=1e-5)
    # each site's ledger paid a Gaussian release at sigma / 2 per round (one patient moves the clipped
    # update by up to twice the clip), and the study's site-level guarantee is the one at sigma
    info = privacy_info(fed, study.study_id)
    patients = epsilon(GaussianRelease(noise_multiplier=sigma / 2, count=2), delta=DELTA)
    assert info.site_level_epsilon == pytest.approx(
        epsilon(GaussianRelease(noise_multiplier=sigma, count=2), delta=DELTA), rel=1e-9
    )
    for s in info.sites:
        assert s.spent is not None
        assert s.spent.study_epsilon == pytest.approx(patients, rel=1e-9)
        assert s.tasks_charged == 2


@pytest.mark.parametrize(
    ("study", "privacy", "message"),
    [
        ({"recipe": logreg_recipe(30, optimizer="adam")}, {}, "optimizer must be 'sgd'"),
        ({}, {"target_epsilon": 1e-9}, "no noise multiplier up to"),
        ({}, {"mode": DpMode.SITE_DISTRIBUTED}, "without secure aggregation"),
        ({}, {"site_sample_rates": {"hospital-z": 0.5}}, "site_sample_rates names sites that do not train"),
    ],
)
def test_the_orchestrator_refuses_a_privacy_spec_the_sites_could_not_honour(fed, study, privacy, message):
    spec = dp_spec("bad", "bc-refuse", [A, B])
    bad = spec.model_copy(update={"privacy": spec.privacy.model_copy(update=privacy), **study})
    response = fed.http.post("/api/v1/studies", json=bad.model_dump(mode="json"), headers=fed.admin_headers())
    assert response.status_code == 422, response.text
    assert message in response.text
    plan = fed.http.post(
        "/api/v1/privacy/plan", json=bad.model_dump(mode="json"), headers=fed.admin_headers()
    )
    assert plan.status_code == 422
    assert message in plan.text


def test_a_planned_study_gets_the_noise_calibrated_for_its_target(fed):
    spec = dp_spec("plan", "bc-refuse", [A, B])
    response = fed.http.post(
        "/api/v1/privacy/plan", json=spec.model_dump(mode="json"), headers=fed.admin_headers()
    )
    assert response.status_code == 200, response.text
    plan = StudyPrivacyInfo.model_validate(response.json())
    sigma = calibrate_noise(1.0, DELTA, Q, STEPS * ROUNDS)
    assert plan.study_id is None
    assert [s.site for s in plan.sites] == [A, B]
    for s in plan.sites:
        assert s.noise_multiplier == sigma
        assert s.sample_rate == Q
        assert s.planned_epsilon == epsilon(one_study(), delta=DELTA) <= 1.0


def test_dp_presets_through_the_services_equal_an_independent_in_process_loop(tmp_path):
    """Fed-Heart-Disease at (epsilon 1, delta 1e-5): the services' final model equals, bit for bit, the
    in-process benchmark's loop (written out here with the learning and privacy packages only), and each
    site's ledger attests the accounted epsilon of its 15 DP-SGD steps."""
    data_dir = heart_data_dir()
    from fedhealth.learning import HEART_DISEASE_DP_PRESETS, dp_noise_multiplier
    from fedhealth.sim._privacy_bench import dp_preset_study

    preset = HEART_DISEASE_DP_PRESETS[(1.0, 1e-5)]
    centers = [f"center-{k}" for k in range(4)]
    uris = {c: f"builtin://heart-disease/{k}" for k, c in enumerate(centers)}
    env = {REPRODUCIBLE_NOISE_ENV: "1", "FEDHEALTH_DATA_DIR": str(data_dir)}
    with LocalFederation(tmp_path, env=env, log_level="warning") as fed:
        fed.start_orchestrator()
        for c, uri in uris.items():
            fed.add_site(c)
            fed.set_budget(c, "heart-disease", 1.0, 1e-5)
            fed.start_agent(c, {"heart-disease": uri})
        fed.wait_for_sites(centers)
        spec = dp_preset_study(preset, name="hd-dp", dataset="heart-disease", train_sites=centers, seed=4)
        study = fed.create_study(spec)
        final = fed.wait_for_study(study.study_id, timeout=600)
        assert final.status is StudyStatus.COMPLETED, final.reason
        model, _ = decode_tensors(fed.model_bytes(study.study_id))
        info = privacy_info(fed, study.study_id)
    sigma = dp_noise_multiplier(preset)  # the services calibrated the spec's target_epsilon themselves
    # The recorded table agrees to floating-point noise: the PLD accountant's FFTs differ in the last digits
    # between numpy builds, which is why the services and this loop both use the freshly calibrated value.
    assert sigma == pytest.approx(preset.noise_multiplier, rel=1e-9)
    data = {c: open_dataset(uri, data_dir) for c, uri in uris.items()}
    params = logreg_init(preset.n_features, 4)
    for rnd in range(1, preset.rounds + 1):
        updates = []
        for c in centers:
            local, _ = logreg_train_dp(
                params,
                data[c].X_train,
                data[c].y_train,
                noise_multiplier=sigma,
                max_grad_norm=preset.max_grad_norm,
                sample_rate=preset.sample_rate,
                steps=preset.local_steps,
                learning_rate=preset.learning_rate,
                rng=task_rng(4, rnd, c),
            )
            updates.append((data[c].num_train, {k: local[k] - params[k] for k in params}))
        params, _ = apply_strategy(preset.strategy, params, weighted_mean(updates), {})
    for name in params:
        np.testing.assert_array_equal(model[name], params[name])
    accounted = epsilon(preset.study_release(), delta=1e-5)
    assert accounted <= 1.0
    for s in info.sites:
        assert s.spent.study_epsilon == pytest.approx(accounted, rel=1e-9)
        assert s.tasks_charged == preset.rounds
    assert np.mean([logreg_evaluate(params, d.X_test, d.y_test).accuracy for d in data.values()]) > 0.6
