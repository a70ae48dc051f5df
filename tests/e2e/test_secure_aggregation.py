"""Secure aggregation through the real services: sites killed at each of the four SecAgg+ stages, a round
below threshold, and heart disease with secure aggregation against plain FedAvg."""

from __future__ import annotations

import base64
import json
import signal
import time

import numpy as np
import pytest

from fedhealth.client import ClientError
from fedhealth.core import decode_tensors, encode_tensors
from fedhealth.data import open_dataset
from fedhealth.learning import HEART_DISEASE_PRESETS
from fedhealth.protocol import (
    ATTESTATION_HEADER,
    MAX_SITE_SAMPLES,
    RESULT_METADATA_KEY,
    ResultManifest,
    RoundStatus,
    SecureAggregationSpec,
    SiteAttestation,
    SiteMetrics,
    StrategySpec,
    StudyStatus,
    Task,
    TaskKind,
    TaskStatus,
)
from fedhealth.runtime import (
    aggregate,
    encode_update,
    initial_model,
    preset_study,
    run_study_in_memory,
    secure_codec,
    train_on_site,
)
from fedhealth.sim import LocalFederation
from support import (
    BREAST_SITES,
    SECURE_STAGES,
    RogueSite,
    SecureRogue,
    breast_datasets,
    breast_spec,
    heart_data_dir,
)

pytestmark = pytest.mark.e2e
REAL = ["hospital-a", "hospital-b", "hospital-c"]
VICTIM = "hospital-c"
ROGUE = "hospital-d"
ALL = [*REAL, ROGUE]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("secure")) as fed:
        fed.start_orchestrator()
        for site in ALL:
            fed.add_site(site)
        for site in REAL:
            fed.start_agent(site, {"breast-cancer": BREAST_SITES[site]})
        fed.wait_for_sites(REAL)
        yield fed


def _spec(fed, name):
    return breast_spec(
        ALL,
        rounds=2,
        name=name,
        min_sites=2,
        eval_sites=["hospital-a", "hospital-b", ROGUE],
        round_deadline_s=120,
        # threshold: 3 of 4 (2t > n + c with c = 1), and 3 of the 3 evaluation sites
        secure_aggregation=SecureAggregationSpec(stage_timeout_s=6.0, site_keys=fed.site_keys(ALL)),
    )


def _wait_for_log(fed, site, text, timeout=60.0):
    log = fed.logs / ("orchestrator.log" if site == "orchestrator" else f"agent-{site}.log")
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"{site} never logged {text!r}"
        time.sleep(0.02)


def _task_id(fed, study_id, number, site):
    deadline = time.monotonic() + 30
    while True:
        for r in fed.study(study_id).rounds:
            if r.number == number:
                return next(t.task_id for t in r.tasks if t.site == site)
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _expected(spec, round_sites, extra=None):
    """The plain FedAvg model when round r aggregates ``round_sites[r - 1]`` (plus ``extra[r]``, a list of
    (samples, delta) made from the round's global model): what the sum must decode to."""
    datasets = breast_datasets(BREAST_SITES)
    params, state = initial_model(spec.recipe, spec.seed), {}
    for number, sites in enumerate(round_sites, start=1):
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
            outcome = train_on_site(task, site, params, datasets[site])
            updates.append((outcome.metrics.num_samples, outcome.delta))
        updates += (extra or {}).get(number, [])
        params, state = aggregate(spec.strategy, params, updates, state)
    return params


def _revive_victim(fed):
    """Make sure the victim agent runs and is polling before a case starts (a stage would not wait for it)."""
    proc = fed.agents.get(VICTIM)
    if proc is not None and proc.poll() is None:
        return
    log = fed.logs / f"agent-{VICTIM}.log"
    before = log.read_text().count("polling") if log.exists() else 0
    fed.start_agent(VICTIM, {"breast-cancer": BREAST_SITES[VICTIM]})
    deadline = time.monotonic() + 120
    while log.read_text().count("polling") <= before:
        assert time.monotonic() < deadline, "the victim agent did not come back"
        time.sleep(0.05)


def _run_rogue_round(rogue, hold_before=None, on_hold=None):
    rogue.join()
    for stage in SECURE_STAGES:
        if stage == hold_before and on_hold is not None:
            on_hold()
        rogue.step(stage)


@pytest.mark.parametrize("stage", SECURE_STAGES)
def test_a_site_killed_at_each_stage_is_left_out_and_the_round_completes_with_the_survivors_sum(fed, stage):
    _revive_victim(fed)
    spec = _spec(fed, f"drop-at-{stage.replace('_', '-')}")
    study = fed.create_study(spec)
    rogue = SecureRogue(fed, ROGUE, BREAST_SITES[ROGUE])
    try:
        if stage == "advertise_keys":
            # the victim dies between rounds: round 2 starts without it
            def kill_after_round_one():
                tid = _task_id(fed, study.study_id, 1, VICTIM)
                _wait_for_log(fed, VICTIM, f"task {tid}: sent unmask")
                fed.stop_agent(VICTIM, sig=signal.SIGKILL)

            _run_rogue_round(rogue, hold_before="unmask", on_hold=kill_after_round_one)
            _run_rogue_round(rogue)
        else:
            _run_rogue_round(rogue)
            previous = SECURE_STAGES[SECURE_STAGES.index(stage) - 1]

            def kill_in_round_two():
                tid = _task_id(fed, study.study_id, 2, VICTIM)
                # the orchestrator has the victim's message (the victim waits for the stage to close)
                _wait_for_log(fed, "orchestrator", f"task {tid}: {previous} message received")
                fed.stop_agent(VICTIM, sig=signal.SIGKILL)  # it has sent `previous`, never `stage`

            # the rogue holds the previous stage open until the victim has answered it and is dead
            _run_rogue_round(rogue, hold_before=previous, on_hold=kill_in_round_two)
        _run_rogue_round(rogue)  # the evaluation round
        final = fed.wait_for_study(study.study_id, timeout=120)
    finally:
        rogue.close()
    assert final.status is StudyStatus.COMPLETED, final.reason
    second = final.rounds[1]
    victim_task = {t.site: t for t in second.tasks}[VICTIM]
    # a site that sent its masked input is in the sum even if it dies before signing or unmasking (the others
    # reveal its self-mask seed's shares)
    in_sum = stage in ("consistency", "unmask")
    if in_sum:
        assert victim_task.status is TaskStatus.COMPLETED
    else:
        assert victim_task.status is TaskStatus.TIMED_OUT
        assert f"dropped out of secure aggregation at the {stage} stage" in victim_task.reason
    report = fed.report(study.study_id)
    assert report["rounds"][1]["metrics"]["sites"] == (4 if in_sum else 3)
    assert all(t.metrics is None for r in final.rounds for t in r.tasks)  # no per-site figure in clear
    expected = _expected(spec, [ALL, ALL if in_sum else ["hospital-a", "hospital-b", ROGUE]])
    model, _ = decode_tensors(fed.model_bytes(study.study_id))
    np.testing.assert_allclose(model["weight"], expected["weight"], atol=1e-4)
    np.testing.assert_allclose(model["bias"], expected["bias"], atol=1e-4)


def test_a_message_sent_with_wait_is_answered_by_the_next_one_and_a_resent_one_changes_nothing(fed):
    _revive_victim(fed)
    study = fed.create_study(_spec(fed, "send-and-wait"))
    rogue = SecureRogue(fed, ROGUE, BREAST_SITES[ROGUE])
    try:
        rogue.join()
        assert rogue.task is not None
        assert rogue.protocol is not None
        path = f"/api/v1/agent/tasks/{rogue.task.task_id}/secagg/advertise_keys"
        headers = {"Content-Type": "application/octet-stream"}
        body = rogue.protocol.advertise_keys().to_bytes()
        bad = rogue.site.post(path, content=body, headers={**headers, ATTESTATION_HEADER: "not json"})
        assert bad.status_code == 422, bad.text
        assert ATTESTATION_HEADER in bad.json()["error"]
        # the site's attestation rides on its first message
        attestation = SiteAttestation(dataset_fingerprint="ab" * 32)
        attested = base64.b64encode(attestation.model_dump_json().encode()).decode()
        answered = rogue.site.post(
            path, content=body, headers={**headers, ATTESTATION_HEADER: attested}, params={"wait": 30}
        )
        assert answered.status_code == 200, answered.text
        assert answered.headers["content-type"] == "application/octet-stream"
        assert answered.content == rogue.site.get(path, params={"wait": 1}).content  # what GET gives
        # a retry of a message whose stage has closed (its response was lost) is harmless
        again = rogue.site.post(path, content=body, headers=headers, params={"wait": 1})
        assert again.status_code == 200, again.text
        assert again.content == answered.content
        for stage in SECURE_STAGES[1:]:
            rogue.step(stage)
        _run_rogue_round(rogue)  # round 2
        _run_rogue_round(rogue)  # the evaluation round
        final = fed.wait_for_study(study.study_id, timeout=120)
    finally:
        rogue.close()
    assert final.status is StudyStatus.COMPLETED, final.reason
    assert all(t.status is TaskStatus.COMPLETED for r in final.rounds for t in r.tasks)
    # stored with the task when the round closed: round 1's model lists the fingerprint the rogue attested
    first_model = final.rounds[0].model_digest
    provenance = fed.operator.request("GET", f"/api/v1/governance/models/{first_model}/provenance").json()
    fingerprints = provenance["lineage"][0]["dataset_fingerprints"]
    assert fingerprints[ROGUE] == "ab" * 32
    assert all(fingerprints[s] not in ("ab" * 32, "unattested") for s in ALL if s != ROGUE)


def test_below_threshold_after_the_masked_inputs_the_round_fails_and_no_site_reveals_a_share(fed):
    """Every site's masked input is at the server (there is something to reveal); then the victim dies and
    the rogue withholds its signature: 2 of 4 sites sign the survivor set, 3 are needed. The round fails at
    the consistency stage, and no site answers an unmask request (none was sent)."""
    _revive_victim(fed)
    study = fed.create_study(_spec(fed, "below-threshold"))
    rogue = SecureRogue(fed, ROGUE, BREAST_SITES[ROGUE])
    try:
        rogue.join()
        rogue.step("advertise_keys")
        rogue.step("share_keys")
        tid = _task_id(fed, study.study_id, 1, VICTIM)
        _wait_for_log(fed, "orchestrator", f"task {tid}: masked_input message received")
        fed.stop_agent(VICTIM, sig=signal.SIGKILL)  # it sent its masked input, it never signs
        rogue.step("masked_input")  # the last masked input: the stage closes with all four inputs
        # the rogue stays silent from here: the consistency stage closes at its timeout with 2 signers
        final = fed.wait_for_study(study.study_id, timeout=120)
    finally:
        rogue.close()
    assert final.status is StudyStatus.FAILED
    assert "too_few_sites: 2 sites signed the survivor set, 3 needed" in final.reason
    assert final.rounds[0].status is RoundStatus.FAILED
    assert final.rounds[0].model_digest is None
    orchestrator_log = (fed.logs / "orchestrator.log").read_text()
    for site in ("hospital-a", "hospital-b"):
        task_id = _task_id(fed, study.study_id, 1, site)
        assert f"task {task_id}: consistency message received" in orchestrator_log  # they got that far
        assert f"task {task_id}: unmask message received" not in orchestrator_log
        assert f"task {task_id}: sent unmask" not in (fed.logs / f"agent-{site}.log").read_text()


def test_heart_disease_with_secure_aggregation_matches_plain_fedavg(tmp_path):
    data_dir = heart_data_dir()
    centers = [f"center-{k}" for k in range(4)]
    with LocalFederation(tmp_path, env={"FEDHEALTH_DATA_DIR": str(data_dir)}) as fed:
        fed.start_orchestrator()
        for k, site in enumerate(centers):
            fed.add_site(site)
            fed.start_agent(site, {"heart-disease": f"builtin://heart-disease/{k}"})
        fed.wait_for_sites(centers)
        plain = preset_study(
            HEART_DISEASE_PRESETS["fedavg"],
            name="hd-plain",
            dataset="heart-disease",
            train_sites=centers,
            min_sites=4,
        )
        secure = plain.model_copy(
            update={
                "name": "hd-secure",
                "secure_aggregation": SecureAggregationSpec(site_keys=fed.site_keys(centers)),
            }
        )
        final = fed.wait_for_study(fed.create_study(secure).study_id, timeout=300)
        assert final.status is StudyStatus.COMPLETED, final.reason
        secure_accuracy = fed.report(final.study_id)["evaluation"]["accuracy"]
    reference = run_study_in_memory(
        plain, {c: open_dataset(f"builtin://heart-disease/{k}", data_dir) for k, c in enumerate(centers)}
    )
    plain_accuracy = float(np.mean([m.accuracy for m in reference.evaluation.values()]))
    assert abs(secure_accuracy - plain_accuracy) <= 0.005, (secure_accuracy, plain_accuracy)


# --- finding 6: a site poisoning the sum ------------------------------------------------------------------


def test_a_site_wrapping_the_secure_weight_fails_the_round_with_the_reason(fed):
    _revive_victim(fed)
    spec = _spec(fed, "wrapped-weight").model_copy(update={"rounds": 1})
    study = fed.create_study(spec)
    rogue = SecureRogue(fed, ROGUE, BREAST_SITES[ROGUE])
    try:
        rogue.join()
        assert rogue.task is not None
        assert rogue.vector is not None
        codec = secure_codec(rogue.task.spec, TaskKind.TRAIN)
        weight_at = sum(
            seg.length for seg in codec.segments[: [g.name for g in codec.segments].index("weight")]
        )
        honest = sum(open_dataset(BREAST_SITES[s]).num_train for s in REAL)
        # raw ring value instead of an encoded weight: the summed weight wraps to 1 (the documented attack)
        rogue.vector[weight_at] = np.uint32((1 - honest) % (1 << 32))
        for stage in SECURE_STAGES:
            rogue.step(stage)
        final = fed.wait_for_study(study.study_id, timeout=120)
    finally:
        rogue.close()
    assert final.status is StudyStatus.FAILED
    assert final.rounds[0].model_digest is None
    assert "secure sum rejected" in final.reason
    assert "a total weight of 1 from 4 sites" in final.reason


def _manifest_with(task_id: str, num_samples: int) -> bytes:
    """A result manifest claiming ``num_samples``, written by hand (the protocol model would refuse it)."""
    return json.dumps({"task_id": task_id, "metrics": {"num_samples": num_samples}}).encode()


def test_a_plain_site_claiming_huge_sample_counts_is_rejected_or_capped_never_decisive(fed):
    _revive_victim(fed)
    spec = breast_spec(
        ALL,
        rounds=3,
        name="sample-count-poisoning",
        min_sites=3,
        eval_sites=REAL,
        strategy=StrategySpec(weight_cap=200),
    )
    study = fed.create_study(spec)
    rogue = RogueSite(fed, ROGUE)
    poison = None
    try:
        for claimed in (2**62, 2**63):  # rounds 1 and 2: beyond any hospital, and beyond int64
            task = rogue.poll()
            delta = {k: np.full_like(v, 5.0) for k, v in rogue.model(task).items()}
            body = encode_tensors(
                delta, {RESULT_METADATA_KEY: _manifest_with(task.task_id, claimed).decode()}
            )
            response = rogue.upload(task.task_id, body)
            assert response.status_code == 422, response.text
            assert "malformed result manifest" in response.json()["detail"]
        task = rogue.poll()  # round 3: a count the protocol allows, capped by the study at 200
        poison = {k: np.full_like(v, 5.0) for k, v in rogue.model(task).items()}
        manifest = ResultManifest(task_id=task.task_id, metrics=SiteMetrics(num_samples=MAX_SITE_SAMPLES))
        assert rogue.upload(task.task_id, encode_update(poison, manifest)).status_code == 200
    finally:
        rogue.close()
    final = fed.wait_for_study(study.study_id, timeout=120)
    assert final.status is StudyStatus.COMPLETED, final.reason
    statuses = [{t.site: t.status for t in r.tasks}[ROGUE] for r in final.rounds[:3]]
    assert statuses == [TaskStatus.REJECTED, TaskStatus.REJECTED, TaskStatus.COMPLETED]
    model, _ = decode_tensors(fed.model_bytes(study.study_id))
    expected = _expected(spec, [REAL, REAL, REAL], extra={3: [(MAX_SITE_SAMPLES, poison)]})
    np.testing.assert_allclose(model["weight"], expected["weight"], atol=1e-5)
    # had the billion counted, the rogue's update would be the model's step: it is not
    uncapped = _expected(
        spec.model_copy(update={"strategy": StrategySpec(weight_cap=MAX_SITE_SAMPLES)}),
        [REAL, REAL, REAL],
        extra={3: [(MAX_SITE_SAMPLES, poison)]},
    )
    assert np.max(np.abs(uncapped["weight"] - expected["weight"])) > 1.0


# --- finding 5: unmask once per round, across attempts and restarts ---------------------------------------


def test_after_an_orchestrator_restart_no_site_unmasks_the_same_round_again(tmp_path):
    """Attempt A of round 1: the three real sites answer the unmask stage (the rogue holds it open); the
    orchestrator is killed and restarted (and one agent with it), and round 1 starts again as attempt B,
    where the sites retrain the same update deterministically. Had they unmasked again, the orchestrator
    could subtract a sum over fewer sites. Each refuses at the unmask stage with its durable record, and the
    round fails."""
    with LocalFederation(tmp_path) as fed:
        fed.start_orchestrator()
        for site in ALL:
            fed.add_site(site)
        for site in REAL:
            fed.start_agent(site, {"breast-cancer": BREAST_SITES[site]})
        fed.wait_for_sites(REAL)
        spec = breast_spec(
            ALL,
            rounds=1,
            name="unmask-once",
            min_sites=2,
            eval_sites=REAL,
            round_deadline_s=120,
            secure_aggregation=SecureAggregationSpec(stage_timeout_s=15.0, site_keys=fed.site_keys(ALL)),
        )
        study = fed.create_study(spec)
        rogue = SecureRogue(fed, ROGUE, BREAST_SITES[ROGUE])
        try:
            rogue.join()
            for stage in SECURE_STAGES[:-1]:
                rogue.step(stage)
            task_ids = {site: _task_id(fed, study.study_id, 1, site) for site in REAL}
            for site, tid in task_ids.items():  # attempt A: every real site unmasked
                _wait_for_log(fed, "orchestrator", f"task {tid}: unmask message received")
                # and knows it was answered (it logs that after the orchestrator's answer: killed before,
                # the site would not have logged it, whatever it then does in attempt B)
                _wait_for_log(fed, site, f"task {tid}: sent unmask")
        finally:
            rogue.close()
        fed.stop_orchestrator(sig=signal.SIGKILL)
        # hospital-a's agent restarts too: only its database remembers that it unmasked. It starts while the
        # orchestrator is down (it retries until it answers), so that its start-up, which on a loaded host
        # took longer than attempt B's 15 s advertise stage, does not decide the test
        fed.stop_agent("hospital-a", sig=signal.SIGKILL)
        started = (fed.logs / "agent-hospital-a.log").read_text().count("site hospital-a polling")
        fed.start_agent("hospital-a", {"breast-cancer": BREAST_SITES["hospital-a"]})
        deadline = time.monotonic() + 120  # a bound on a broken test
        while (fed.logs / "agent-hospital-a.log").read_text().count("site hospital-a polling") == started:
            assert time.monotonic() < deadline, "hospital-a's agent never started polling again"
            time.sleep(0.05)
        fed.start_orchestrator()
        rogue = SecureRogue(fed, ROGUE, BREAST_SITES[ROGUE])
        try:
            rogue.join()  # attempt B of the same round
            for stage in SECURE_STAGES[:-1]:
                rogue.step(stage)
            final = fed.wait_for_study(study.study_id, timeout=120)
        finally:
            rogue.close()
    assert final.status is StudyStatus.FAILED
    tasks = {t.site: t for t in final.rounds[0].tasks}
    for site, tid in task_ids.items():
        assert tasks[site].status is TaskStatus.FAILED
        assert tasks[site].reason.startswith("already_unmasked: "), tasks[site].reason
        # the site got as far as attempt B's unmask request, and answered it no more
        agent_log = (fed.logs / f"agent-{site}.log").read_text()
        assert agent_log.count(f"task {tid}: sent consistency") == 2
        assert agent_log.count(f"task {tid}: sent unmask") == 1


# --- findings 3 and 4 at submission ----------------------------------------------------------------------


def test_an_unsafe_threshold_or_a_spec_naming_other_keys_is_refused_at_submission(fed):
    body = _spec(fed, "refused-at-submission").model_dump(mode="json")
    unsafe = {**body, "secure_aggregation": {**body["secure_aggregation"], "threshold": 2}}  # 4 sites, c = 1
    with pytest.raises(ClientError) as caught:
        fed.operator.request("POST", "/api/v1/studies", json=unsafe)
    assert caught.value.status == 422
    assert "needs 2t > n + c: 4 > 5 is false; use t >= 3" in str(caught.value.detail)
    keys = {**body["secure_aggregation"]["site_keys"], VICTIM: "ab" * 32}  # not hospital-c's enrolled key
    wrong = {**body, "secure_aggregation": {**body["secure_aggregation"], "site_keys": keys}}
    with pytest.raises(ClientError) as caught:
        fed.operator.request("POST", "/api/v1/studies", json=wrong)
    assert caught.value.status == 422
    assert f"does not match the enrolled identity keys of {VICTIM}" in str(caught.value.detail)
    listed = {s.name: s.fingerprint for s in fed.operator.sites()}
    assert listed == fed.site_keys(ALL)  # the operator's view of the keys: what a steward compares
