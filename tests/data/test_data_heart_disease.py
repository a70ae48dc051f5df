import csv
import hashlib
import shutil

import httpx
import numpy as np
import pytest

from fedhealth.core import ChecksumError, ConfigError, DatasetMissingError
from fedhealth.data import (
    HEART_DISEASE_BASE_URL,
    HEART_DISEASE_FEATURES,
    PooledScaling,
    heart_disease_file,
    load_heart_disease,
)

# published by FLamby and the UCI repository (see shared/datasets/README.md)
ROWS = (303, 261, 46, 130)
SPLITS = ((199, 104), (172, 89), (30, 16), (85, 45))
MD5 = {
    "processed.cleveland.data": "2d91a8ff69cfd9616aa47b59d6f843db",
    "processed.hungarian.data": "22e96bee155b5973568101c93b3705f6",
    "processed.switzerland.data": "9a87f7577310b3917730d06ba9349e20",
    "processed.va.data": "4249d03ca7711e84f4444768c9426170",
}
FILES = tuple(MD5)


def _raw_rows(path):
    with path.open() as f:
        return [r for r in csv.reader(f) if r]


@pytest.mark.parametrize("center", range(4))
def test_rows_splits_and_features_match_flamby(heart_data_dir, center):
    d = load_heart_disease(center, heart_data_dir, download=False)
    assert d.num_train + d.num_test == ROWS[center]
    assert (d.num_train, d.num_test) == SPLITS[center]
    assert d.n_features == 13
    assert d.feature_names == HEART_DISEASE_FEATURES
    assert len(set(d.patient_ids_train)) == d.num_train
    assert all(pid.startswith(f"hd{center}-") for pid in d.patient_ids_train)


@pytest.mark.parametrize("center", range(4))
def test_features_and_labels_follow_the_raw_file(heart_data_dir, center):
    # independent reading of the source: the patient id names the data line; standardization is affine per
    # column, so each standardized column must be an increasing affine image of the raw column
    rows = _raw_rows(heart_data_dir / "heart_disease" / FILES[center])
    d = load_heart_disease(center, heart_data_dir, download=False)
    lines = [int(pid.split("-")[1]) for pid in d.patient_ids_train]
    raw = [rows[i] for i in lines]
    assert all("?" not in [r[k] for k in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13)] for r in raw)
    np.testing.assert_array_equal(d.y_train, [1 if float(r[13]) > 0 else 0 for r in raw])
    columns = {"age": 0, "sex": 1, "trestbps": 3, "chol": 4, "fbs": 5, "thalach": 7, "exang": 8, "oldpeak": 9}
    for j, name in enumerate(d.feature_names):
        x = d.X_train[:, j]
        if name in columns:
            source = np.array([float(r[columns[name]]) for r in raw])
        else:
            field, level = name.split("_")
            source = np.array([float(float(r[2 if field == "cp" else 6]) == float(level)) for r in raw])
        if np.ptp(source) == 0:
            assert np.all(x == 0)  # a constant column scales to zero
        else:
            slope, intercept = np.polyfit(source, x, 1)
            assert slope > 0
            np.testing.assert_allclose(x, slope * source + intercept, atol=1e-9)


@pytest.mark.parametrize("center", range(4))
def test_each_center_is_standardized_with_its_own_training_statistics(heart_data_dir, center):
    d = load_heart_disease(center, heart_data_dir, download=False)
    varying = d.X_train.std(axis=0) > 0
    np.testing.assert_allclose(d.X_train.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(d.X_train[:, varying].std(axis=0, ddof=1), 1, rtol=1e-6)


def test_split_is_stratified_except_in_switzerland(heart_data_dir):
    for center in (0, 1, 3):
        d = load_heart_disease(center, heart_data_dir, download=False)
        positives = int(d.y_train.sum() + d.y_test.sum())
        assert abs(int(d.y_test.sum()) - positives * d.num_test / ROWS[center]) <= 1
    swiss = load_heart_disease(2, heart_data_dir, download=False)
    assert int((swiss.y_train == 0).sum() + (swiss.y_test == 0).sum()) == 1  # too few to stratify


def test_pooled_concatenates_the_standardized_centers(heart_data_dir):
    pooled = load_heart_disease("pooled", heart_data_dir, download=False)
    centers = [load_heart_disease(c, heart_data_dir, download=False) for c in range(4)]
    assert (pooled.num_train, pooled.num_test) == (486, 254)
    np.testing.assert_array_equal(pooled.X_train, np.concatenate([c.X_train for c in centers]))
    np.testing.assert_array_equal(pooled.y_test, np.concatenate([c.y_test for c in centers]))
    assert pooled.patient_ids_train == tuple(i for c in centers for i in c.patient_ids_train)


def test_pooled_global_scaling_uses_the_pooled_training_statistics(heart_data_dir):
    pooled = load_heart_disease("pooled", heart_data_dir, pooled_scaling=PooledScaling.GLOBAL, download=False)
    np.testing.assert_allclose(pooled.X_train.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(pooled.X_train.std(axis=0, ddof=1), 1, rtol=1e-6)
    assert pooled.fingerprint != load_heart_disease("pooled", heart_data_dir, download=False).fingerprint


def test_loading_twice_gives_the_same_fingerprint(heart_data_dir):
    a = load_heart_disease(1, heart_data_dir, download=False)
    b = load_heart_disease(1, heart_data_dir, download=False)
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize("center", [4, -1, "all", True])
def test_unknown_center_is_a_config_error(tmp_path, center):
    with pytest.raises(ConfigError, match="0, 1, 2, 3 or 'pooled'"):
        load_heart_disease(center, tmp_path, download=False)


# --- checksums and downloads (never the network) ------------------------------------------------------------


def test_a_corrupt_file_raises_a_one_line_checksum_error_naming_it(tmp_path):
    folder = tmp_path / "heart_disease"
    folder.mkdir()
    path = folder / "processed.va.data"
    content = b"63,1,1,145,233,1,2,150,0,2.3,3,0,6,0\n"
    path.write_bytes(content)
    with pytest.raises(ChecksumError) as info:
        load_heart_disease(3, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert hashlib.md5(content).hexdigest() in message
    assert MD5["processed.va.data"] in message


def test_a_real_file_with_one_changed_byte_is_refused(heart_data_dir, tmp_path):
    (tmp_path / "heart_disease").mkdir()
    target = tmp_path / "heart_disease" / "processed.cleveland.data"
    data = bytearray((heart_data_dir / "heart_disease" / "processed.cleveland.data").read_bytes())
    data[0] = ord("7") if data[0] != ord("7") else ord("8")
    target.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"processed\.cleveland\.data"):
        load_heart_disease(0, tmp_path)


def _client(handler):
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_a_missing_file_that_cannot_be_downloaded_raises_dataset_missing_naming_it(tmp_path):
    requested = []

    def unreachable(request: httpx.Request) -> httpx.Response:
        requested.append(str(request.url))
        raise httpx.ConnectError("network is unreachable", request=request)

    with pytest.raises(DatasetMissingError) as info, _client(unreachable) as client:
        load_heart_disease(2, tmp_path, http_client=client)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "heart_disease" / "processed.switzerland.data") in message
    assert "FEDHEALTH_DATA_DIR" in message  # says how to provide it
    assert requested == [HEART_DISEASE_BASE_URL + "processed.switzerland.data"]
    assert not list((tmp_path / "heart_disease").glob("*"))


def test_a_404_is_a_missing_dataset(tmp_path):
    with (
        pytest.raises(DatasetMissingError, match=r"processed\.hungarian\.data"),
        _client(lambda r: httpx.Response(404, text="not here\nat all")) as client,
    ):
        load_heart_disease(1, tmp_path, http_client=client)


def test_with_downloads_off_a_missing_file_is_reported_without_any_request(tmp_path):
    with pytest.raises(
        DatasetMissingError, match=r"processed\.cleveland\.data is missing and downloads are off"
    ):
        load_heart_disease(0, tmp_path, download=False)


def test_download_writes_the_verified_file_atomically(heart_data_dir, tmp_path):
    served = {f: (heart_data_dir / "heart_disease" / f).read_bytes() for f in FILES}

    def mirror(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=served[request.url.path.rsplit("/", 1)[1]])

    with _client(mirror) as client:
        got = load_heart_disease(3, tmp_path, http_client=client)
    assert got.fingerprint == load_heart_disease(3, heart_data_dir, download=False).fingerprint
    assert sorted(p.name for p in (tmp_path / "heart_disease").iterdir()) == ["processed.va.data"]


def test_downloaded_bytes_with_the_wrong_md5_are_not_kept(tmp_path):
    with (
        pytest.raises(ChecksumError) as info,
        _client(lambda r: httpx.Response(200, content=b"tampered")) as client,
    ):
        heart_disease_file(0, tmp_path, http_client=client)
    assert "\n" not in str(info.value)
    assert MD5["processed.cleveland.data"] in str(info.value)
    assert not (tmp_path / "heart_disease").exists() or not list((tmp_path / "heart_disease").iterdir())


def test_a_present_verified_file_needs_no_network(heart_data_dir, tmp_path):
    shutil.copytree(heart_data_dir / "heart_disease", tmp_path / "heart_disease")

    def forbidden(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    with _client(forbidden) as client:
        assert load_heart_disease("pooled", tmp_path, http_client=client).num_train == 486
