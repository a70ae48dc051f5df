"""DICOM labels read from a tag of each file (``label_tag``, ``label_map``) instead of the labels CSV: files
generated with pydicom; a file missing the tag or holding an unmapped value is named in the site check's one
line without its value, and the dataset is refused before any training."""

from __future__ import annotations

import csv
from urllib.parse import quote

import numpy as np
import pytest
from imaging_files import write_dicom

from fedhealth.agent import DatasetCheckError, check_dataset
from fedhealth.core import ConfigError
from fedhealth.data import SchemaError, open_dataset
from fedhealth.learning import resolve_recipe


def uri(folder, **params) -> str:
    query = "&".join(f"{k}={quote(str(v), safe=':,')}" for k, v in params.items())
    return f"dicom://{quote(str(folder))}" + (f"?{query}" if query else "")


def _folder(tmp_path, values: list[str | None], *, tag: str = "ImageComments", label_column: bool = False):
    """One 12x12 DICOM file per value (a bright square when the value says malignant), the value in ``tag``
    (a keyword, or "gggg,eeee" for a private tag), and a CSV naming patients and files."""
    folder = tmp_path / "mammo"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, value in enumerate(values):
        img = rng.integers(0, 400, size=(12, 12))
        if value in ("malignant", "1"):
            img[1:5, 1:5] = 3000
        path = write_dicom(folder / f"m{i:02d}.dcm", img, bits=12)
        if value is not None:
            import pydicom

            ds = pydicom.dcmread(path)
            if "," in tag:
                group, element = (int(part, 16) for part in tag.split(","))
                ds.add_new((group, element), "LO", value)
            else:
                setattr(ds, tag, value)
            ds.save_as(path)
        rows.append([f"patient-{i}", f"m{i:02d}.dcm"] + (["0"] if label_column else []))
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "file"] + (["label"] if label_column else []))
        writer.writerows(rows)
    return folder


MAP = "benign:0,malignant:1"


def test_labels_are_read_from_a_keyword_tag_through_the_label_map_and_a_model_trains_on_them(tmp_path):
    values = ["benign", "malignant"] * 5
    folder = _folder(tmp_path, values)
    data = open_dataset(uri(folder, size=12, label_tag="ImageComments", label_map=MAP, test_fraction=0.2))
    y = np.concatenate([data.y_train, data.y_test])
    X = np.concatenate([data.X_train, data.X_test]).reshape(-1, 12, 12)
    assert sorted(y.tolist()) == [0] * 5 + [1] * 5
    corner = X[:, 2:4, 2:4].mean(axis=(1, 2))
    assert corner[y == 1].min() > corner[y == 0].max()  # each label is its own file's
    assert set(data.patient_ids_train) | set(data.patient_ids_test) == {f"patient-{i}" for i in range(10)}
    cnn = resolve_recipe("torch", "1", {"input_size": 12, "batch_size": 4})
    out = cnn.train(cnn.init(0), data, np.random.default_rng(0))
    assert out.num_samples == data.num_train
    assert check_dataset("mammo", uri(folder, size=12, label_tag="ImageComments", label_map=MAP)).quality


def test_a_numeric_tag_without_a_map_holds_the_class_itself(tmp_path):
    folder = _folder(tmp_path, ["0", "1", "1", "0"], tag="0011,1010")
    for form in ("(0011,1010)", "0011,1010", "00111010"):
        data = open_dataset(uri(folder, size=12, label_tag=form, test_fraction=0.5))
        assert sorted(np.concatenate([data.y_train, data.y_test]).tolist()) == [0, 0, 1, 1]


def test_a_file_missing_the_tag_or_with_an_unmapped_value_is_named_without_the_value(tmp_path):
    values = ["benign", "malignant", None, "Jane Doe's second opinion", "", "benign"]
    folder = _folder(tmp_path, values)
    address = uri(folder, size=12, label_tag="ImageComments", label_map=MAP)
    with pytest.raises(DatasetCheckError) as caught:
        check_dataset("mammo", address)
    message = str(caught.value)
    assert "\n" not in message
    assert "3 file(s) cannot be used" in message
    assert "m02.dcm: no label: the label tag ImageComments is missing or empty" in message
    assert "m03.dcm: no label: the label tag ImageComments holds a value not in label_map" in message
    assert "m04.dcm" in message
    assert "Jane" not in message
    assert "second opinion" not in message
    assert "patient-" not in message
    assert str(tmp_path) not in message
    with pytest.raises(SchemaError):  # what the agent maps to dataset_invalid, before any training
        open_dataset(address)


def test_bad_label_tag_settings_are_refused_before_reading(tmp_path):
    folder = _folder(tmp_path, ["benign", "malignant"])
    with pytest.raises(ConfigError, match="neither a DICOM keyword"):
        open_dataset(uri(folder, label_tag="Diagnosis"))
    with pytest.raises(ConfigError, match="VALUE:CLASS"):
        open_dataset(uri(folder, label_tag="ImageComments", label_map="benign=0"))
    with pytest.raises(ConfigError, match="each class 0 or 1"):
        open_dataset(uri(folder, label_tag="ImageComments", label_map="benign:0,malignant:2"))
    with pytest.raises(ConfigError, match="label_map needs label_tag"):
        open_dataset(uri(folder, label_map=MAP))
    (tmp_path / "both").mkdir()
    both = _folder(tmp_path / "both", ["benign", "malignant"], label_column=True)
    with pytest.raises(SchemaError, match="drop one of the two"):
        open_dataset(uri(both, label_tag="ImageComments", label_map=MAP))
