"""A site agent with its real gates on a ``standardize = "federated"`` study: the scaling pre-step obeys the
cohort rule before the session opens; a training task needs the released scaling, and one whose scaling
differs from the release this site took part in is refused (training with it is checked end to end in
tests/e2e/test_stats_services.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from site_fixtures import SITE, agent, approve, make_home, task

from fedhealth.crypto import IdentityKey
from fedhealth.data import HEART_DISEASE_FEATURES
from fedhealth.learning import LOGREG_RECIPE, LogRegParams
from fedhealth.protocol import (
    CollectiveSessionInfo,
    FailureCode,
    ReleasedScaling,
    SecureAggregationSpec,
    StudySpec,
    TaskKind,
)
from fedhealth.runtime import recipe_spec

OTHERS = {s: IdentityKey.generate() for s in ("hospital-b", "hospital-c")}
DATASETS = {"heart-disease": "builtin://heart-disease/0"}
SCALING = ReleasedScaling(mean=[0.5] * 13, scale=[2.0] * 13, rows=500)


@pytest.fixture
def home(tmp_path):
    return make_home(tmp_path / "home")


def spec_of(home: Any) -> StudySpec:
    keys = {SITE: home.identity().public().fingerprint}
    keys |= {s: k.public().fingerprint for s, k in OTHERS.items()}
    params = LogRegParams.model_validate(
        {
            "n_features": 13,
            "feature_names": list(HEART_DISEASE_FEATURES),
            "preprocessing": {"standardize": "federated"},
        }
    )
    return StudySpec(
        name="hd-federated",
        dataset="heart-disease",
        recipe=recipe_spec(LOGREG_RECIPE, params),
        rounds=1,
        train_sites=sorted(keys),
        min_sites=3,
        secure_aggregation=SecureAggregationSpec(site_keys=keys),
    )


def test_a_site_under_its_cohort_minimum_refuses_the_scaling_pre_step_before_the_session(home):
    home.policy_path.write_text("min_cohort_k = 100000\n")
    spec = spec_of(home)
    approve(home, spec)
    site, client = agent(home, DATASETS)
    peers = {SITE: home.identity().public().raw.hex()} | {s: k.public().raw.hex() for s, k in OTHERS.items()}
    session = CollectiveSessionInfo(sites=sorted(peers), peer_keys=peers, attempt="attempt-1")
    # the recording client has no collective calls: reaching the session would fail the test
    site.handle(task(spec, kind=TaskKind.COLLECTIVE, round=0, collective=session))
    assert [f.code for f in client.failures] == [FailureCode.MIN_COHORT]
    assert client.results == []


# A federated study is a secure one: a training task that passes the scaling checks goes on to the secure
# round's checks, which these tasks (without a secure round) then fail: proof that the scaling was accepted.


def test_a_training_task_without_the_released_scaling_is_refused(home):
    spec = spec_of(home)
    approve(home, spec)
    site, client = agent(home, DATASETS)
    # a training site took part in the pre-step: it takes only the scaling its own record holds (without
    # one it refuses every scaling, tests/agent/test_scaling_crash_attacks.py)
    release = {"kind": "federated-scaling", "mean": [0.5] * 13, "scale": [2.0] * 13, "rows": 500}
    entry = {"study_id": "st-1", "round": 0, "kind": "collective", "metrics": {"federated_scaling": release}}
    (home.root / "results.jsonl").write_text(json.dumps(entry) + "\n")
    site.handle(task(spec, task_id="tk-bare"))
    assert [f.code for f in client.failures] == [FailureCode.INVALID_TASK]
    site.handle(task(spec, task_id="tk-scaled", scaling=SCALING))
    assert client.failures[-1].code is FailureCode.SECURE_ROUND_MISSING


def test_a_scaling_other_than_the_one_this_site_released_is_refused(home):
    spec = spec_of(home)
    approve(home, spec)
    site, client = agent(home, DATASETS)
    # what this site's own pre-step session released for the study, as its results record keeps it (the
    # agent reads it back after a restart)
    release = {"kind": "federated-scaling", "mean": [0.5] * 13, "scale": [2.0] * 13, "rows": 500}
    entry = {"study_id": "st-1", "round": 0, "kind": "collective", "metrics": {"federated_scaling": release}}
    (home.root / "results.jsonl").write_text(json.dumps(entry) + "\n")
    lied = SCALING.model_copy(update={"mean": [0.5] * 12 + [9.0]})
    site.handle(task(spec, task_id="tk-lied", scaling=lied))
    assert [f.code for f in client.failures] == [FailureCode.INVALID_TASK]
    assert client.results == []
    site.handle(task(spec, task_id="tk-honest", scaling=SCALING))
    assert client.failures[-1].code is FailureCode.SECURE_ROUND_MISSING
