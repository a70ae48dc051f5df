"""Crashes: sites that die mid-study, an orchestrator killed with SIGKILL, a corrupt dataset file."""

from __future__ import annotations

import shutil
import signal
import time

import numpy as np
import pytest

from fedhealth.core import decode_tensors
from fedhealth.orchestrator import Store, make_engine
from fedhealth.protocol import (
    FailureCode,
    RoundStatus,
    StudySpec,
    StudyStatus,
    TaskKind,
    TaskStatus,
)
from fedhealth.runtime import run_study_in_memory
from fedhealth.sim import LocalFederation
from support import (
    BREAST_SITES,
    ChokeProxy,
    breast_datasets,
    breast_spec,
    heart_data_dir,
    logreg_recipe,
    postgres_schema,
    synthetic_recipe,
)

pytestmark = pytest.mark.e2e
SITES = ["hospital-a", "hospital-b", "hospital-c"]


def _wait_until(predicate, timeout=60.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(interval)


def test_a_site_killed_mid_study_is_counted_out_at_the_deadline_and_quorum_decides(tmp_path):
    with LocalFederation(tmp_path) as fed:
        fed.start_orchestrator()
        for site in SITES:
            fed.add_site(site)
            fed.start_agent(site, {"breast-cancer": BREAST_SITES[site]})
        fed.wait_for_sites(SITES)
        # quorum 2 of 3: the study survives the loss of one site
        study = fed.create_study(breast_spec(SITES, rounds=4, min_sites=2, round_deadline_s=3.0))
        _wait_until(lambda: fed.study(study.study_id).completed_rounds >= 1)
        fed.stop_agent("hospital-c", sig=signal.SIGKILL)
        final = fed.wait_for_study(study.study_id, timeout=120)
        assert final.status is StudyStatus.COMPLETED, final.reason
        lost = [
            r
            for r in final.rounds
            if r.kind is TaskKind.TRAIN
            and r.status is RoundStatus.COMPLETED
            and {t.site: t.status for t in r.tasks}["hospital-c"] is TaskStatus.TIMED_OUT
        ]
        assert lost, "some round should have counted hospital-c out"
        for r in lost:
            statuses = {t.site: t.status for t in r.tasks}
            assert statuses["hospital-a"] is statuses["hospital-b"] is TaskStatus.COMPLETED
            # counted out at the deadline, not before
            assert (r.ended_at - r.started_at).total_seconds() >= 2.9
        # quorum 3 of 3 with a dead site: the study fails cleanly, with the reason
        strict = fed.create_study(
            breast_spec(SITES, rounds=2, min_sites=3, round_deadline_s=2.0, name="strict")
        )
        failed = fed.wait_for_study(strict.study_id, timeout=60)
        assert failed.status is StudyStatus.FAILED
        assert "round 1: quorum not met: 2 valid update(s), 3 required" in failed.reason
        assert "hospital-c: timed_out" in failed.reason
        assert failed.rounds[0].status is RoundStatus.FAILED
        report = fed.report(strict.study_id)
        assert report["status"] == "failed"
        assert "quorum not met" in report["reason"]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request):
    if request.param == "sqlite":
        yield None
    else:
        with postgres_schema() as url:
            yield url


def test_orchestrator_killed_mid_study_resumes_from_its_last_completed_round(tmp_path, database_url):
    spec = breast_spec(
        SITES,
        rounds=12,
        name="durable",
        recipe=logreg_recipe(30, local_epochs=3, learning_rate=0.05, batch_size=8),
    )
    with LocalFederation(tmp_path, database_url=database_url) as fed:
        fed.start_orchestrator()
        for site in SITES:
            fed.add_site(site)
            fed.start_agent(site, {"breast-cancer": BREAST_SITES[site]})
        study = fed.create_study(spec)
        _wait_until(lambda: fed.study(study.study_id).completed_rounds >= 3, interval=0.01)
        fed.stop_orchestrator(sig=signal.SIGKILL)
        store = Store(make_engine(fed.home.database_url()))
        at_crash = store.get_study(study.study_id).completed_rounds
        store.engine.dispose()
        assert 3 <= at_crash < spec.rounds, "the crash should fall mid-study"
        fed.start_orchestrator()  # same port, same database; the agents reconnect with backoff
        final = fed.wait_for_study(study.study_id, timeout=180)
    assert final.status is StudyStatus.COMPLETED, final.reason
    train = [r for r in final.rounds if r.kind is TaskKind.TRAIN]
    assert [r.number for r in train] == list(range(1, 13))
    assert all(r.status is RoundStatus.COMPLETED for r in train)
    assert all(len(r.tasks) == 3 and all(t.status is TaskStatus.COMPLETED for t in r.tasks) for r in train)
    # nothing lost, nothing counted twice: the model equals an uninterrupted in-memory run
    reference = run_study_in_memory(spec, breast_datasets({s: BREAST_SITES[s] for s in SITES}))
    model, _ = decode_tensors(
        (fed.state_dir / "blobs" / final.model_digest[:2] / final.model_digest).read_bytes()
    )
    np.testing.assert_array_equal(model["weight"], reference.params["weight"])
    np.testing.assert_array_equal(model["bias"], reference.params["bias"])


def test_an_agent_killed_mid_upload_and_restarted_is_counted_exactly_once(tmp_path):
    # 200k float32 parameters: each upload is ~800 KB, so the proxy can cut one off in the middle
    spec = StudySpec(
        name="mid-upload",
        dataset="none",
        recipe=synthetic_recipe(200_000),
        rounds=3,
        train_sites=["steady", "victim"],
        min_sites=2,
        round_deadline_s=120.0,
        seed=3,
    )
    with LocalFederation(tmp_path) as fed:
        fed.start_orchestrator()
        proxy = ChokeProxy(fed.url)
        try:
            fed.add_site("steady")
            fed.add_site("victim")
            fed.start_agent("steady", {})
            fed.start_agent("victim", {}, extra_args=["--orchestrator", proxy.url()])
            fed.wait_for_sites(["steady", "victim"])
            proxy.choke_at = 300_000
            study = fed.create_study(spec)
            assert proxy.choked.wait(60), "the victim's upload never started"
            fed.stop_agent("victim", sig=signal.SIGKILL)
            assert fed.study(study.study_id).completed_rounds == 0
            fed.start_agent("victim", {}, extra_args=["--orchestrator", proxy.url()])
            final = fed.wait_for_study(study.study_id, timeout=180)
        finally:
            proxy.close()
    assert final.status is StudyStatus.COMPLETED, final.reason
    for r in final.rounds[:-1]:
        assert sorted((t.site, t.status) for t in r.tasks) == [
            ("steady", TaskStatus.COMPLETED),
            ("victim", TaskStatus.COMPLETED),
        ]
    reference = run_study_in_memory(spec, {"steady": None, "victim": None})
    model, _ = decode_tensors(
        (fed.state_dir / "blobs" / final.model_digest[:2] / final.model_digest).read_bytes()
    )
    np.testing.assert_array_equal(model["weight"], reference.params["weight"])


def test_a_corrupt_dataset_file_fails_that_site_with_its_code_and_names_the_file_only_in_its_own_log(
    tmp_path,
):
    good_dir = heart_data_dir()
    bad_dir = tmp_path / "bad-data"
    shutil.copytree(good_dir / "heart_disease", bad_dir / "heart_disease")
    target = bad_dir / "heart_disease" / "processed.hungarian.data"
    spec = StudySpec(
        name="corrupt",
        dataset="heart-disease",
        recipe=logreg_recipe(13),
        rounds=1,
        train_sites=["cleveland", "hungary"],
        min_sites=1,
    )
    with LocalFederation(tmp_path / "fed") as fed:
        fed.start_orchestrator()
        fed.add_site("cleveland")
        fed.add_site("hungary")
        fed.start_agent(
            "cleveland",
            {"heart-disease": "builtin://heart-disease/0"},
            extra_args=["--data-dir", str(good_dir)],
        )
        fed.start_agent(
            "hungary", {"heart-disease": "builtin://heart-disease/1"}, extra_args=["--data-dir", str(bad_dir)]
        )
        fed.wait_for_sites(["cleveland", "hungary"])
        # corrupted after hungary's agent started: `site serve` checks its datasets when it starts (the test
        # below), so only a file that changes later reaches a task
        target.write_bytes(target.read_bytes().replace(b"1", b"2", 1))
        final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=120)
    assert final.status is StudyStatus.COMPLETED, final.reason
    hungary = {t.site: t for t in final.rounds[0].tasks}["hungary"]
    assert hungary.status is TaskStatus.FAILED
    # the orchestrator learns the code; the file's path and the checksum detail stay at the site
    assert hungary.reason == f"dataset_unavailable: {FailureCode.DATASET_UNAVAILABLE.message}"
    assert str(target) not in hungary.reason
    site_log = (tmp_path / "fed" / "logs" / "agent-hungary.log").read_text()
    assert str(target) in site_log
    assert "md5" in site_log


def test_an_agent_whose_dataset_is_corrupt_refuses_to_start_with_one_line_naming_the_file(tmp_path):
    bad_dir = tmp_path / "bad-data"
    shutil.copytree(heart_data_dir() / "heart_disease", bad_dir / "heart_disease")
    target = bad_dir / "heart_disease" / "processed.hungarian.data"
    target.write_bytes(target.read_bytes().replace(b"1", b"2", 1))
    with LocalFederation(tmp_path / "fed") as fed:
        fed.start_orchestrator()
        fed.add_site("hungary")
        fed.start_agent(
            "hungary", {"heart-disease": "builtin://heart-disease/1"}, extra_args=["--data-dir", str(bad_dir)]
        )
        assert fed.agents["hungary"].wait(timeout=60) == 1
        log = (fed.logs / "agent-hungary.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: dataset 'heart-disease': ")
    assert str(target) in errors[0]
    assert "md5" in errors[0]
    assert "Traceback" not in log
