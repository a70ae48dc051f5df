"""Imaging through the real services: BreastMNIST sites (from the .npz) and a hospital whose images are
DICOM files (written here with pydicom from its BreastMNIST images) train the small CNN together; when that
DICOM folder later holds a file that cannot be used, the hospital's next task is refused with
``dataset_invalid`` alone (the file is named only in the site's own log) and charges no privacy budget."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from imaging_files import write_dicom, write_labels

from fedhealth.core import decode_tensors
from fedhealth.data import breastmnist_federation
from fedhealth.protocol import FailureCode, PrivacySpec, RecipeSpec, StudySpec, StudyStatus, TaskStatus
from fedhealth.runtime import param_specs
from fedhealth.sim import LocalFederation
from support import heart_data_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LIMIT = 24  # images per part and site: a quick run
NPZ_SITES = {"hospital-a": 0, "hospital-b": 1}
DICOM_SITE = "hospital-dicom"
DELTA = 1e-4
BUDGET = 4.0
CNN = {"architecture": "cnn", "input_size": 28, "batch_size": 16, "local_epochs": 1}


def datasets_dir():
    folder = heart_data_dir()  # FEDHEALTH_DATA_DIR, failing when required and absent
    if not (folder / "breastmnist" / "breastmnist.npz").is_file():
        pytest.fail(f"{folder} lacks breastmnist/breastmnist.npz")
    return folder


def dicom_site_folder(root, data_dir):
    """Site 2's BreastMNIST images (train and held-out alike) as 8-bit DICOM files with a labels CSV."""
    site = breastmnist_federation(4, 0, data_dir)[2]
    folder = root / "dicom"
    folder.mkdir()
    rows = []
    X = np.concatenate([site.X_train[:LIMIT], site.X_test[:LIMIT]])
    y = np.concatenate([site.y_train[:LIMIT], site.y_test[:LIMIT]])
    for i, (image, label) in enumerate(zip(X, y, strict=True)):
        pixels = np.rint(image.reshape(28, 28) * 255).astype(np.uint16)
        write_dicom(folder / f"us{i:03d}.dcm", pixels, bits=8, window=(127.5, 255.0))
        rows.append((f"dicom-patient-{i}", f"us{i:03d}.dcm", str(int(label))))
    write_labels(folder / "labels.csv", rows)
    return folder


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[tuple[LocalFederation, object]]:
    data_dir = datasets_dir()
    root = tmp_path_factory.mktemp("imaging-federation")
    dicom = dicom_site_folder(root, data_dir)
    with LocalFederation(root / "fed", log_level="info") as fed:
        fed.start_orchestrator()
        uris = {s: f"builtin://breastmnist/{i}?sites=4&seed=0&limit={LIMIT}" for s, i in NPZ_SITES.items()}
        uris[DICOM_SITE] = f"dicom://{dicom}?size=28&test_fraction=0.5"
        for site in uris:
            fed.add_site(site)
        fed.set_budget(DICOM_SITE, "breastmnist-dp", BUDGET, DELTA)  # the same folder, under a DP budget
        for site, uri in uris.items():
            extra = {"breastmnist-dp": uri} if site == DICOM_SITE else {}
            fed.start_agent(site, {"breastmnist": uri, **extra})
        fed.wait_for_sites(list(uris))
        yield fed, dicom


def test_the_cnn_trains_across_npz_and_dicom_hospitals_through_the_services(federation):
    fed, _ = federation
    spec = StudySpec(
        name="breastmnist-e2e",
        dataset="breastmnist",
        recipe=RecipeSpec(name="torch", params=CNN),
        rounds=2,
        train_sites=sorted([*NPZ_SITES, DICOM_SITE]),
        min_sites=3,
        round_deadline_s=300.0,
        seed=4,
    )
    final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=600)
    assert final.status is StudyStatus.COMPLETED, final
    assert all(t.status is TaskStatus.COMPLETED for r in final.rounds for t in r.tasks)
    params, _ = decode_tensors(fed.model_bytes(final.study_id), param_specs(spec.recipe))
    assert "head.3.weight" in params
    assert all(np.isfinite(v).all() for v in params.values())
    report = fed.report(final.study_id)
    assert report["evaluation"]["accuracy"] is not None


def dp_spec(name: str, **privacy: float) -> StudySpec:
    """A DP-SGD study of the DICOM hospital alone, on its dataset under a budget."""
    return StudySpec(
        name=name,
        dataset="breastmnist-dp",
        recipe=RecipeSpec(
            name="torch", params={**CNN, "norm": "group", "optimizer": "sgd", "learning_rate": 0.05}
        ),
        rounds=1,
        train_sites=[DICOM_SITE],
        min_sites=1,
        round_deadline_s=300.0,
        seed=5,
        privacy=PrivacySpec.model_validate(
            {"delta": DELTA, "max_grad_norm": 1.0, "sample_rate": 0.25, **privacy}
        ),
    )


def test_dp_sgd_charges_the_sites_ledger_and_a_study_beyond_the_budget_is_refused(federation):
    fed, _ = federation
    ledger = fed.budget_ledger(DICOM_SITE)
    within = dp_spec("breastmnist-dp-within", noise_multiplier=1.0, steps_per_round=2)
    final = fed.wait_for_study(fed.create_study(within).study_id, timeout=600)
    assert final.status is StudyStatus.COMPLETED, final
    spent = ledger.statement("breastmnist-dp").spent_epsilon
    assert 0.0 < spent < BUDGET
    # far more steps at less noise: more epsilon than the budget has left, refused before any training
    beyond = dp_spec("breastmnist-dp-beyond", noise_multiplier=0.6, steps_per_round=400)
    final = fed.wait_for_study(fed.create_study(beyond).study_id, timeout=600)
    (task,) = final.rounds[0].tasks
    assert task.status is TaskStatus.FAILED
    assert task.reason is not None
    assert task.reason.startswith("budget_exceeded:")
    assert ledger.statement("breastmnist-dp").spent_epsilon == spent
    assert ledger.pending("breastmnist-dp") == []


def test_an_unusable_dicom_file_refuses_the_task_with_only_its_code_and_charges_nothing(federation):
    fed, dicom = federation
    write_dicom(dicom / "stray.dcm", np.zeros((28, 28)))  # an image with no label: found at the next task
    ledger = fed.budget_ledger(DICOM_SITE)
    before = ledger.statement("breastmnist-dp").spent_epsilon
    spec = dp_spec("breastmnist-dp-invalid", noise_multiplier=1.0, steps_per_round=2)
    final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=600)
    (task,) = final.rounds[0].tasks
    assert task.status is TaskStatus.FAILED
    assert task.reason == f"dataset_invalid: {FailureCode.DATASET_INVALID.message}"
    assert ledger.statement("breastmnist-dp").spent_epsilon == before
    assert ledger.pending("breastmnist-dp") == []
    assert "stray.dcm" in (fed.logs / f"agent-{DICOM_SITE}.log").read_text()  # the site's own log
    assert "stray.dcm" not in (fed.logs / "orchestrator.log").read_text()
    assert "stray.dcm" not in str(fed.report(final.study_id))
