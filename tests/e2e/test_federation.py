"""A real orchestrator and real agents as processes over loopback: results, bad input, limits."""

from __future__ import annotations

import base64
import hashlib

import numpy as np
import pytest

from fedhealth.core import decode_tensors, encode_tensors
from fedhealth.protocol import (
    ResultManifest,
    SiteMetrics,
    StudySpec,
    StudyStatus,
    TaskKind,
    TaskStatus,
)
from fedhealth.runtime import encode_update, run_study_in_memory
from fedhealth.sim import LocalFederation
from support import BREAST_SITES, RogueSite, breast_datasets, breast_spec, synthetic_recipe

pytestmark = pytest.mark.e2e
GOOD = ["hospital-a", "hospital-b", "hospital-c"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("fed"), orchestrator_args=["--max-body-mb", "1"]) as fed:
        fed.start_orchestrator()
        for site in GOOD:
            fed.add_site(site)
            fed.start_agent(site, {"breast-cancer": BREAST_SITES[site]})
        for rogue in ("rogue-1", "rogue-2", "rogue-3", "rogue-4"):
            fed.add_site(rogue)
        yield fed


@pytest.fixture(scope="module")
def reference():
    spec = breast_spec(GOOD, rounds=3)
    return run_study_in_memory(spec, breast_datasets({s: BREAST_SITES[s] for s in GOOD}))


def test_services_train_exactly_the_model_the_in_memory_rounds_compute(fed, reference):
    study = fed.create_study(breast_spec(GOOD, rounds=3))
    final = fed.wait_for_study(study.study_id, timeout=120)
    assert final.status is StudyStatus.COMPLETED, final.reason
    assert [r.number for r in final.rounds] == [1, 2, 3, 4]
    assert final.rounds[-1].kind is TaskKind.EVALUATE
    model, _ = decode_tensors(fed.model_bytes(study.study_id))
    for name, value in reference.params.items():
        np.testing.assert_array_equal(model[name], value)
    evaluation = fed.report(study.study_id)["evaluation"]["per_site"]
    for site, metrics in reference.evaluation.items():
        assert evaluation[site]["accuracy"] == pytest.approx(metrics.accuracy)
        assert evaluation[site]["num_eval_samples"] == metrics.num_eval_samples
    # every training task reported its sample count, loss and validation metrics
    for r in final.rounds[:-1]:
        for t in r.tasks:
            assert t.status is TaskStatus.COMPLETED
            assert t.metrics.num_samples > 0
            assert t.metrics.train_loss is not None
            assert 0 <= t.metrics.accuracy <= 1
            assert t.metrics.auc is not None


def _bad_updates(weights: dict[str, np.ndarray], task_id: str) -> list[tuple[str, bytes, str]]:
    manifest = ResultManifest(task_id=task_id, metrics=SiteMetrics(num_samples=10))
    nan = {k: v.copy() for k, v in weights.items()}
    nan["weight"][3] = np.nan
    inf = {k: v.copy() for k, v in weights.items()}
    inf["bias"][0] = np.inf
    shape = {**weights, "weight": np.zeros(29, np.float32)}
    dtype = {k: v.astype(np.float64) for k, v in weights.items()}
    return [
        ("nan", encode_update(nan, manifest), "'weight' holds NaN or infinite values"),
        ("inf", encode_update(inf, manifest), "'bias' holds NaN or infinite values"),
        ("shape", encode_update(shape, manifest), "'weight': expected shape (30,), got (29,)"),
        ("dtype", encode_update(dtype, manifest), "expected dtype float32, got float64"),
    ]


def test_non_finite_misshaped_or_mistyped_updates_get_422_and_the_round_completes_without_them(fed):
    spec = breast_spec([*GOOD, "rogue-1"], rounds=4, eval_sites=GOOD, min_sites=3)
    study = fed.create_study(spec)
    rogue = RogueSite(fed, "rogue-1")
    try:
        for number in range(1, 5):
            task = rogue.poll()
            assert task.round == number
            label, body, message = _bad_updates(rogue.model(task), task.task_id)[number - 1]
            response = rogue.upload(task.task_id, body)
            assert response.status_code == 422, (label, response.text)
            assert response.json()["error"] == "invalid update"
            assert message in response.json()["detail"], label
            # the task is closed: the same site cannot slip a second answer in
            assert rogue.upload(task.task_id, body).status_code == 409
    finally:
        rogue.close()
    final = fed.wait_for_study(study.study_id, timeout=120)
    assert final.status is StudyStatus.COMPLETED, final.reason
    for r in final.rounds[:-1]:
        by_site = {t.site: t for t in r.tasks}
        assert by_site["rogue-1"].status is TaskStatus.REJECTED
        assert all(by_site[s].status is TaskStatus.COMPLETED for s in GOOD)
    # the rejected updates left no trace: the model is the one the three good sites train alone
    reference = run_study_in_memory(
        breast_spec(GOOD, rounds=4, eval_sites=GOOD, min_sites=3),
        breast_datasets({s: BREAST_SITES[s] for s in GOOD}),
    )
    model, _ = decode_tensors(fed.model_bytes(study.study_id))
    np.testing.assert_array_equal(model["weight"], reference.params["weight"])


def test_a_small_model_travels_inside_its_task_and_a_large_one_is_downloaded(fed):
    rogue = RogueSite(fed, "rogue-4")
    try:
        for params, inline in ((1_000, True), (100_000, False)):
            spec = StudySpec(
                name=f"inline-{params}",
                dataset="none",
                recipe=synthetic_recipe(params),
                rounds=1,
                train_sites=["rogue-4"],
            )
            study = fed.create_study(spec)
            task = rogue.poll()
            downloaded = rogue.get(f"/api/v1/agent/models/{task.model_digest}").content
            assert hashlib.sha256(downloaded).hexdigest() == task.model_digest
            if inline:
                assert base64.b64decode(task.model_inline) == downloaded
            else:
                assert task.model_inline is None  # 400 kB: over the inline limit
            fed.operator.cancel_study(study.study_id)
    finally:
        rogue.close()


def test_a_retried_upload_is_stored_once_and_a_different_second_upload_is_refused(fed):
    study = fed.create_study(breast_spec(["rogue-2"], rounds=1, name="retry"))
    rogue = RogueSite(fed, "rogue-2")
    try:
        task = rogue.poll()
        weights = rogue.model(task)
        manifest = ResultManifest(task_id=task.task_id, metrics=SiteMetrics(num_samples=10))
        body = encode_update({k: np.zeros_like(v) for k, v in weights.items()}, manifest)
        first = rogue.upload(task.task_id, body)
        assert first.status_code == 200
        assert first.json()["detail"] is None
        again = rogue.upload(task.task_id, body)
        assert again.status_code == 200
        assert again.json()["detail"] == "already stored"
        other = encode_update({k: np.ones_like(v) for k, v in weights.items()}, manifest)
        conflict = rogue.upload(task.task_id, other)
        assert conflict.status_code == 409
        assert "different result" in conflict.json()["error"]
    finally:
        rogue.close()
    final = fed.study(study.study_id)
    assert final.rounds[0].tasks[0].status is TaskStatus.COMPLETED


def _study(**overrides):
    body = {
        "name": "x",
        "dataset": "d",
        "recipe": {"name": "logreg", "params": {"n_features": 3}},
        "rounds": 1,
        "train_sites": ["hospital-a"],
    }
    return {"auth": "admin", "json": {**body, **overrides}}


SITE = {"auth": "site"}


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "needle"),
    [
        (
            "POST",
            "/api/v1/studies",
            {"auth": "admin", "content": b"{not json", "headers": {"Content-Type": "application/json"}},
            422,
            "JSON",
        ),
        ("POST", "/api/v1/studies", {"auth": "admin", "json": []}, 422, "valid dictionary"),
        ("POST", "/api/v1/studies", {"auth": "admin", "json": {"name": "x"}}, 422, "Field required"),
        ("POST", "/api/v1/studies", _study(name="Bad Name!"), 422, "pattern"),
        ("POST", "/api/v1/studies", _study(rounds=0), 422, "greater than or equal to 1"),
        ("POST", "/api/v1/studies", _study(min_sites=2), 422, "exceeds"),
        (
            "POST",
            "/api/v1/studies",
            _study(recipe={"name": "logreg", "params": {"n_features": 3, "learning_rate": "NaN"}}),
            422,
            "recipe.params.learning_rate: Input should be a finite number",
        ),
        (
            "POST",
            "/api/v1/studies",
            _study(recipe={"name": "catboost", "params": {}}),
            422,
            "recipe.name: no recipe 'catboost' is installed",
        ),
        (
            "POST",
            "/api/v1/studies",
            _study(recipe={"name": "logreg", "version": "7", "params": {"n_features": 3}}),
            422,
            "recipe.version: recipe 'logreg' has no version '7'",
        ),
        (
            "POST",
            "/api/v1/studies",
            _study(recipe={"name": "logreg", "params": {"n_feature": 3}}),
            422,
            "recipe.params.n_features: Field required; recipe.params.n_feature: Extra inputs",
        ),
        ("POST", "/api/v1/studies", _study(train_sites=["nowhere"]), 422, "unknown sites: nowhere"),
        ("POST", "/api/v1/studies", _study(surprise=1), 422, "Extra inputs"),
        ("POST", "/api/v1/studies", {"json": {"name": "x"}}, 401, "missing credentials"),
        ("POST", "/api/v1/sites", {"auth": "admin", "json": {"name": "UPPER CASE"}}, 422, "pattern"),
        ("POST", "/api/v1/sites", {"auth": "admin", "json": {"name": "hospital-a"}}, 409, "already exists"),
        ("GET", "/api/v1/studies/st_nope", {"auth": "admin"}, 404, "does not exist"),
        ("GET", "/api/v1/studies", {"headers": {"Authorization": "Basic abc"}}, 401, "bearer"),
        ("GET", "/api/v1/agent/tasks/next?wait=0", {}, 401, "missing credentials"),
        (
            "GET",
            "/api/v1/agent/tasks/next?wait=0",
            {"headers": {"Authorization": "Bearer x.y.z"}},
            401,
            "invalid token",
        ),
        ("GET", "/api/v1/agent/tasks/next?wait=-1", SITE, 422, "greater than or equal to 0"),
        ("GET", "/api/v1/agent/models/../../etc/passwd", SITE, 404, ""),
        ("GET", "/api/v1/agent/models/xyz", SITE, 422, "not a sha256 digest"),
        (
            "POST",
            "/api/v1/agent/tasks/tk_nope/failure",
            {**SITE, "json": {"code": "internal_error"}},
            404,
            "does not exist",
        ),
        (
            "POST",
            "/api/v1/agent/tasks/tk_nope/failure",
            {**SITE, "json": {"code": "BAD CODE"}},
            422,
            "Input should be",
        ),
        (
            "POST",
            "/api/v1/agent/tasks/tk_nope/failure",
            {**SITE, "json": {"code": "internal_error", "reason": "/data/ward.csv: 'p0000'"}},
            422,
            "Extra inputs",
        ),
        (
            "POST",
            "/api/v1/agent/tasks/tk_nope/result",
            {**SITE, "content": b"\0" * (2 << 20)},
            413,
            "exceeds the limit",
        ),
        ("POST", "/api/v1/enroll", {"json": {"site": "x", "token": "short"}}, 422, "at least 16"),
        (
            "POST",
            "/api/v1/agent/token",
            {"json": {"site": "hospital-a", "challenge": "zz", "signature": "00"}},
            422,
            "pattern",
        ),
    ],
)
def test_malformed_requests_get_a_clear_4xx_never_a_500(fed, method, path, kwargs, status, needle):
    kwargs = dict(kwargs)
    auth = kwargs.pop("auth", None)
    if auth == "admin":
        kwargs["headers"] = {**kwargs.get("headers", {}), **fed.admin_headers()}
    elif auth == "site":
        rogue = RogueSite(fed, "rogue-2")
        kwargs["headers"] = {**kwargs.get("headers", {}), **rogue.client.auth_headers()}
        rogue.close()
    response = fed.http.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert needle in response.text


def test_garbage_bytes_upload_is_rejected_and_named(fed):
    study = fed.create_study(breast_spec(["rogue-3"], rounds=1, name="garbage"))
    rogue = RogueSite(fed, "rogue-3")
    try:
        task = rogue.poll()
        response = rogue.upload(task.task_id, b"this is not a safetensors file")
        assert response.status_code == 422
        assert "not a safetensors file" in response.json()["detail"]
        intruder = RogueSite(fed, "rogue-1")
        other_site = intruder.upload(task.task_id, encode_tensors({"weight": np.zeros(30, np.float32)}))
        intruder.close()
        assert other_site.status_code == 403
    finally:
        rogue.close()
    final = fed.wait_for_study(study.study_id, timeout=60)
    assert final.status is StudyStatus.FAILED
    assert "quorum not met: 0 valid update(s), 1 required" in final.reason
    assert "rogue-3: rejected" in final.reason
