"""BreastMNIST: the checked loader, its seeded 4-site split with label and size skew, the builtin URIs, and
`fedhealth demo --dataset breastmnist` (its study, and one run as a user starts it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fedhealth.cli._demo import DemoDataset, demo_federation
from fedhealth.core import ChecksumError, ConfigError, DatasetMissingError
from fedhealth.data import breastmnist_federation, breastmnist_pooled, open_dataset
from fedhealth.runtime import check_recipe
from support import heart_data_dir


@pytest.fixture(scope="module")
def data_dir():
    folder = heart_data_dir()
    if not (folder / "breastmnist" / "breastmnist.npz").is_file():
        pytest.fail(f"{folder} lacks breastmnist/breastmnist.npz")
    return folder


def test_the_pooled_set_is_the_official_splits_as_flat_rows_in_0_1(data_dir):
    pooled = breastmnist_pooled(data_dir)
    assert (pooled.num_train, pooled.num_test) == (546 + 78, 156)
    assert pooled.X_train.shape[1] == 784
    assert pooled.X_train.min() >= 0.0
    assert pooled.X_train.max() <= 1.0
    assert int(pooled.y_test.sum()) == 114  # the official test split: 42 malignant, 114 normal/benign


def test_four_sites_split_every_image_once_with_size_and_label_skew(data_dir):
    sites = breastmnist_federation(4, 0, data_dir)
    train_ids = [i for s in sites for i in s.patient_ids_train]
    test_ids = [i for s in sites for i in s.patient_ids_test]
    assert len(train_ids) == len(set(train_ids)) == 624
    assert len(test_ids) == len(set(test_ids)) == 156
    sizes = sorted(s.num_train for s in sites)
    assert sizes[-1] > 2 * sizes[0]  # size skew
    positives = [float(s.y_train.mean()) for s in sites]
    assert max(positives) - min(positives) > 0.1  # label skew
    assert all(np.count_nonzero(s.y_train == c) >= 4 for s in sites for c in (0, 1))
    again = breastmnist_federation(4, 0, data_dir)
    assert [s.fingerprint for s in sites] == [s.fingerprint for s in again]
    other = breastmnist_federation(4, 1, data_dir)
    assert [s.fingerprint for s in sites] != [s.fingerprint for s in other]


def test_uris_open_the_sites_the_pooled_set_and_a_limited_subset(data_dir):
    site = open_dataset("builtin://breastmnist/2?sites=4&seed=0", data_dir)
    assert site.fingerprint == breastmnist_federation(4, 0, data_dir)[2].fingerprint
    assert open_dataset("builtin://breastmnist/pooled", data_dir).num_train == 624
    small = open_dataset("builtin://breastmnist/0?limit=10", data_dir)
    assert (small.num_train, small.num_test) == (10, 10)
    with pytest.raises(ConfigError, match="site index below 4"):
        open_dataset("builtin://breastmnist/4", data_dir)
    with pytest.raises(ConfigError, match="unknown parameter"):
        open_dataset("builtin://breastmnist/0?colour=1", data_dir)


def test_a_changed_or_absent_file_is_refused(data_dir, tmp_path):
    with pytest.raises(DatasetMissingError, match="absent"):
        breastmnist_pooled(tmp_path)
    (tmp_path / "breastmnist").mkdir()
    copy = tmp_path / "breastmnist" / "breastmnist.npz"
    shutil.copy(data_dir / "breastmnist" / "breastmnist.npz", copy)
    with copy.open("r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(ChecksumError):
        breastmnist_pooled(tmp_path)


def test_the_demo_study_is_the_small_cnn_over_four_skewed_hospitals():
    sites, spec = demo_federation(DemoDataset.BREASTMNIST, 3)
    assert sorted(sites) == ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
    assert all(uri.startswith("builtin://breastmnist/") for uri in sites.values())
    assert spec.recipe.name == "torch"
    assert spec.recipe.params["architecture"] == "cnn"
    assert spec.rounds == 3
    assert check_recipe(spec).capabilities.secure_sum


@pytest.mark.e2e
@pytest.mark.slow
def test_fedhealth_demo_breastmnist_runs_to_completion(data_dir, tmp_path):
    env = {**os.environ, "COLUMNS": "120", "FEDHEALTH_DATA_DIR": str(data_dir)}
    args = ["demo", "--dataset", "breastmnist", "--rounds", "1", "--out", str(tmp_path / "out")]
    proc = subprocess.run(
        [sys.executable, "-m", "fedhealth", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dataset breastmnist" in proc.stdout
    assert "secure aggregation (SecAgg+)" in proc.stdout
    assert "│ mean" in proc.stdout
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 400_000  # ~105k float32 values
