"""Image connectors: PNG/JPEG folders and DICOM folders (files generated here with pydicom), their pixel
conventions, and their errors: each unusable file named in one line by the site's dataset check."""

from __future__ import annotations

from urllib.parse import quote

import numpy as np
import pytest
from imaging_files import dicom_square_folder, write_dicom, write_labels
from PIL import Image

from fedhealth.agent import DatasetCheckError, check_dataset
from fedhealth.core import ConfigError
from fedhealth.data import SchemaError, dicom_grey, inspect_dataset, open_dataset


def uri(scheme: str, folder, **params) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{scheme}://{quote(str(folder))}" + (f"?{query}" if query else "")


def test_png_and_jpeg_folder_becomes_flattened_grey_rows_with_patient_ids(tmp_path):
    folder = tmp_path / "xray"
    folder.mkdir()
    rows = []
    for i in range(6):
        img = np.full((40, 40), 40 * i, dtype=np.uint8)
        name = f"a{i}.png" if i % 2 else f"sub/b{i}.jpg"
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(folder / name)
        rows.append((f"p{i}", name, str(i % 2)))
    deep = np.full((20, 20), 30000, dtype=np.uint16)
    deep[:10] = 10000
    Image.fromarray(deep).save(folder / "deep.png")  # 16-bit grey
    rows.append(("p6", "deep.png", "0"))
    write_labels(folder / "labels.csv", rows)
    data = open_dataset(uri("images", folder, size=16, test_fraction=0))
    assert data.X_train.shape == (7, 256)
    assert data.patient_ids_train == tuple(f"p{i}" for i in range(7))
    assert data.y_train.tolist() == [0, 1, 0, 1, 0, 1, 0]
    np.testing.assert_allclose(data.X_train[1], 40 / 255, atol=1e-6)  # a PNG, exact
    np.testing.assert_allclose(data.X_train[2], 80 / 255, atol=3 / 255)  # a JPEG, lossy
    deep_row = data.X_train[6].reshape(16, 16)
    assert deep_row[0, 0] == 0.0
    assert deep_row[-1, -1] == 1.0  # 16-bit values scaled by the image's own range
    rgb = open_dataset(uri("images", folder, size=8, channels=3, test_fraction=0))
    assert rgb.X_train.shape == (7, 3 * 64)


def test_dicom_rescale_window_and_monochrome1_inversion(tmp_path):
    pixels = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)
    # rescale: values 2*p - 1000 -> [-1000, 1000, 3000, 7190]; window center 1000 width 4000 -> [-1000, 3000]
    plain = write_dicom(tmp_path / "a.dcm", pixels, slope=2.0, intercept=-1000.0, window=(1000.0, 4000.0))
    np.testing.assert_allclose(dicom_grey(plain)[0], [[0.0, 0.5], [1.0, 1.0]])
    inverted = write_dicom(
        tmp_path / "b.dcm",
        pixels,
        slope=2.0,
        intercept=-1000.0,
        window=(1000.0, 4000.0),
        photometric="MONOCHROME1",
    )
    np.testing.assert_allclose(dicom_grey(inverted)[0], [[1.0, 0.5], [0.0, 0.0]])
    # no window tag: the image's own range; a window given by the site overrides the file's
    bare = write_dicom(tmp_path / "c.dcm", pixels)
    np.testing.assert_allclose(dicom_grey(bare)[0], pixels / 4095)
    np.testing.assert_allclose(dicom_grey(plain, (0.0, 2000.0))[0], [[0.0, 1.0], [1.0, 1.0]])


def test_signed_16_bit_dicom_keeps_negative_values(tmp_path):
    pixels = np.array([[-2000, -1000], [0, 30000]], dtype=np.int16)
    path = write_dicom(tmp_path / "ct.dcm", pixels, signed=True, window=(-1000.0, 2000.0))
    np.testing.assert_allclose(dicom_grey(path)[0], [[0.0, 0.5], [1.0, 1.0]])


def test_a_dicom_folder_opens_with_its_labels_resized_to_the_study_size(tmp_path):
    folder = dicom_square_folder(tmp_path / "ct", 12, side=20)
    data = open_dataset(uri("dicom", folder, size=16, test_fraction=0.25, seed=1))
    assert data.num_train == 9
    assert data.num_test == 3
    assert data.X_train.shape[1] == 256
    assert data.X_train.min() >= 0.0
    assert data.X_train.max() <= 1.0
    # label-1 images are bright in the upper left whether stored as MONOCHROME1 or 2
    X = np.concatenate([data.X_train, data.X_test]).reshape(-1, 16, 16)
    y = np.concatenate([data.y_train, data.y_test])
    corner = X[:, 2:5, 2:5].mean(axis=(1, 2))
    assert corner[y == 1].min() > corner[y == 0].max()
    report = inspect_dataset(uri("dicom", folder, size=16)).quality
    assert len(report.columns) == 1  # one summary of the pixels, not one line per pixel
    assert report.rows == 12


def test_unusable_files_are_each_named_in_one_line_by_the_site_check(tmp_path):
    folder = dicom_square_folder(tmp_path / "ct", 6, side=16)
    (folder / "img001.dcm").write_bytes(b"DICM but not really" * 10)  # corrupt
    write_dicom(folder / "report.dcm", np.zeros((1, 1)), with_pixels=False)  # no pixel data
    write_dicom(folder / "stray.dcm", np.zeros((16, 16)))  # not in labels.csv
    rows = [
        ("patient-0", "img000.dcm", "0"),
        ("patient-1", "img001.dcm", "1"),
        ("patient-2", "img002.dcm", ""),  # missing label
        ("patient-3", "img003.dcm", "1"),
        ("patient-9", "report.dcm", "0"),
    ]
    write_labels(folder / "labels.csv", rows)
    with pytest.raises(DatasetCheckError) as caught:
        check_dataset("ct", uri("dicom", folder))
    message = str(caught.value)
    assert "\n" not in message
    for name in ("img001.dcm", "report.dcm", "stray.dcm", "img002.dcm"):
        assert name in message
    assert "not a readable DICOM file" in message
    assert "without pixel data" in message
    assert "missing label" in message
    assert str(tmp_path) not in message  # files are named relative to the folder
    assert "patient-" not in message  # no patient id in the message
    with pytest.raises(SchemaError):  # what the agent maps to dataset_invalid
        open_dataset(uri("dicom", folder))


def test_bad_uris_are_refused_before_reading(tmp_path):
    folder = dicom_square_folder(tmp_path / "ct", 4)
    with pytest.raises(ConfigError, match="unknown parameter"):
        open_dataset(uri("dicom", folder, colour=1))
    with pytest.raises(ConfigError, match="window"):
        open_dataset(uri("dicom", folder, window="wide"))
    with pytest.raises(ConfigError, match="absolute"):
        open_dataset(uri("dicom", folder, labels="labels.csv"))
    with pytest.raises(SchemaError, match="does not exist"):
        open_dataset(uri("images", tmp_path / "nowhere"))
    write_labels(folder / "labels.csv", [("p1", "img000.dcm", "0"), ("p1", "img001.dcm", "1")])
    with pytest.raises(SchemaError, match="one image per patient"):
        open_dataset(uri("dicom", folder))


def test_the_site_check_reports_identifying_dicom_attributes_without_their_values(tmp_path):
    folder = tmp_path / "ct"
    folder.mkdir()
    rows = []
    for i in range(4):
        extra = {"PatientName": "Doe^Jane", "PatientBirthDate": "19700101"} if i < 2 else {}
        write_dicom(folder / f"s{i}.dcm", np.full((8, 8), 100 * i), attributes=extra)
        rows.append((f"p{i}", f"s{i}.dcm", str(i % 2)))
    write_labels(folder / "labels.csv", rows)
    lines = check_dataset("ct", uri("dicom", folder, size=8)).quality.lines()
    warnings = [line for line in lines if "warning:" in line]
    assert len(warnings) == 3  # PatientBirthDate, PatientID, PatientName
    assert any("PatientName in 2 file(s) (e.g. s0.dcm)" in line for line in warnings)
    assert any("PatientID in 4 file(s)" in line for line in warnings)
    assert not any("Doe" in line or "1970" in line or "ANON" in line for line in lines)  # never a value
    allowed = check_dataset("ct", uri("dicom", folder, size=8, allow_tags="PatientID,PatientName"))
    assert [line for line in allowed.quality.lines() if "warning:" in line] == [
        "  warning: identifying DICOM attribute PatientBirthDate in 2 file(s) (e.g. s0.dcm); de-identify the "
        "files, or allow it with allow_tags="
    ]
    with pytest.raises(DatasetCheckError, match="allow_tags names"):
        check_dataset("ct", uri("dicom", folder, allow_tags="Colour"))
