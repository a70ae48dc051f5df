"""Who may download which blob (threat-model finding 10), against a real HTTPS orchestrator.

A site's raw update is named by its sha256, and that digest is in the orchestrator's audit log. Knowing a
digest must open nothing: an agent downloads only the input model of one of its own open tasks, no route
serves what sites uploaded, and operators download released model versions only (an admin any, a researcher
those of their own studies, an auditor none).
"""

from __future__ import annotations

import hashlib

import pytest
from support_services import (
    KeyHolder,
    audit_entries,
    operator,
    poll_task,
    round_model,
    synthetic_spec,
    valid_update,
)

from fedhealth.client import ClientError
from fedhealth.sim import LocalFederation

pytestmark = pytest.mark.e2e
SITES = ["blob-a", "blob-b"]


def approved(fed, spec):
    """Every site the spec names approves it first (its steward's part), so the study starts at once."""
    for site in dict.fromkeys([*spec.train_sites, *spec.evaluation_sites]):
        fed.approve(site, spec)
    return spec


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("blobs")) as fed:
        fed.start_orchestrator()
        for site in SITES:
            fed.add_site(site)
        yield fed


@pytest.fixture(scope="module")
def sites(fed):
    holders = {s: KeyHolder(fed, s, fed.site_home(s).identity()) for s in SITES}
    yield {s: (h, h.token_headers()) for s, h in holders.items()}
    for h in holders.values():
        h.close()


def _model(holder, headers, digest):
    return holder.http.get(f"/api/v1/agent/models/{digest}", headers=headers)


def _upload(holder, headers, task):
    body = valid_update(task)
    response = holder.http.post(
        f"/api/v1/agent/tasks/{task.task_id}/result",
        content=body,
        headers={**headers, "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    return body


def test_sites_download_only_the_input_models_of_their_own_open_tasks_and_never_an_upload(fed, sites):
    (a, a_auth), (b, b_auth) = sites["blob-a"], sites["blob-b"]
    shared = fed.operator.create_study(approved(fed, synthetic_spec("shared", SITES, seed=1)))
    task_a, task_b = poll_task(a.http, a_auth), poll_task(b.http, b_auth)
    update = _upload(a, a_auth, task_a)
    digest = hashlib.sha256(update).hexdigest()
    # the digest of a's raw update is in the log every reader of the audit sees
    completed = [e for e in audit_entries(fed) if e["type"] == "task.completed"]
    assert digest in [e["payload"].get("result_digest") for e in completed]

    stolen = _model(b, b_auth, digest)
    assert stolen.status_code == 404, "site b downloaded site a's raw update"
    assert update not in stolen.content
    assert _model(a, a_auth, digest).status_code == 404  # uploads are never served, not even back
    nothing = _model(b, b_auth, "0" * 64)
    assert (nothing.status_code, nothing.json()) == (stolen.status_code, stolen.json())  # no oracle

    # a model of a task that is a's only (another study, another seed: another initial model)
    only_a = fed.operator.create_study(approved(fed, synthetic_spec("only-a", ["blob-a"], seed=2)))
    task_a2 = poll_task(a.http, a_auth)
    assert task_a2.study_id == only_a.study_id
    assert task_a2.model_digest != task_b.model_digest
    assert _model(b, b_auth, task_a2.model_digest).status_code == 404
    mine = _model(a, a_auth, task_a2.model_digest)
    assert mine.status_code == 200
    assert hashlib.sha256(mine.content).hexdigest() == task_a2.model_digest
    assert _model(b, b_auth, task_b.model_digest).status_code == 200
    fed.operator.cancel_study(only_a.study_id)
    # once its task is closed, a may not fetch that model either
    assert _model(a, a_auth, task_a2.model_digest).status_code == 404

    fed.operator.cancel_study(shared.study_id)
    # the upload is stored apart from the models on disk
    blobs = fed.state_dir / "blobs"
    assert (blobs / "updates" / digest[:2] / digest).exists()
    assert not (blobs / digest[:2] / digest).exists()


def test_operators_download_released_models_only_and_by_role(fed, sites):
    a, a_auth = sites["blob-a"]
    study = fed.operator.create_study(approved(fed, synthetic_spec("released", ["blob-a"], seed=5)))
    task = poll_task(a.http, a_auth)
    initial = task.model_digest
    update = hashlib.sha256(_upload(a, a_auth, task)).hexdigest()
    released = round_model(fed.operator, study.study_id, 1)

    audrey = operator(fed, "audrey", "auditor")
    for path in (f"/api/v1/studies/{study.study_id}/model", f"/api/v1/models/{released}"):
        with pytest.raises(ClientError) as refused:
            audrey.request("GET", path)
        assert refused.value.status == 403
    audrey.close()

    rita = operator(fed, "rita", "researcher")
    with pytest.raises(ClientError) as others:
        rita.model_bytes(study.study_id)  # the admin's study
    assert others.value.status == 403
    with pytest.raises(ClientError) as others_version:
        rita.released_model(released)
    assert others_version.value.status == 403
    for digest in (initial, update, "f" * 64):  # the unreleased initial model, a raw update, nothing
        with pytest.raises(ClientError) as unreleased:
            rita.released_model(digest)
        assert unreleased.value.status == 404
        assert unreleased.value.error == "no released model has this digest"

    # the admin gets released versions, never an update
    assert hashlib.sha256(fed.operator.released_model(released)).hexdigest() == released
    assert fed.operator.model_bytes(study.study_id) == fed.operator.released_model(released)
    for digest in (update, initial):
        with pytest.raises(ClientError) as refused:
            fed.operator.released_model(digest)
        assert refused.value.status == 404
    fed.operator.cancel_study(study.study_id)

    # a researcher's own study: nothing until a round released a model, then that model
    own = rita.create_study(
        approved(fed, synthetic_spec("ritas", ["blob-a"], seed=3, owner="rita", rounds=1))
    )
    with pytest.raises(ClientError) as early:
        rita.model_bytes(own.study_id)
    assert early.value.status == 404
    assert early.value.error == "no model of this study has been released yet"
    task = poll_task(a.http, a_auth)
    assert task.study_id == own.study_id
    _upload(a, a_auth, task)
    version = round_model(rita, own.study_id, 1)
    model = rita.model_bytes(own.study_id)
    assert hashlib.sha256(model).hexdigest() == version
    assert rita.released_model(version) == model
    rita.close()
