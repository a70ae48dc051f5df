"""Attacks on guarantees of docs/imaging.md that no other test tried to break: determinism that depends on
nothing but the seed and the runtime's generator, a global model that only becomes non-finite while
training (with and without DP-SGD), control-variate tensors a study does not have, images of another width
than the study's, a DICOM window that is not a number, label values other than 0 and 1, colour DICOM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from imaging_files import dicom_square_folder, square_images, write_dicom, write_labels

from fedhealth.core import DatasetError, TensorError
from fedhealth.data import SchemaError, dicom_grey, open_dataset
from fedhealth.learning import RecipeError, RecordDp, TrainingDivergedError, resolve_recipe

SMALL = {"input_size": 16, "batch_size": 8, "learning_rate": 0.1, "optimizer": "sgd"}
DP = {**SMALL, "norm": "group"}
RELEASE = RecordDp(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=2)


def recipe(**params):
    return resolve_recipe("torch", "1", {**SMALL, **params})


@pytest.fixture(scope="module")
def data():
    return square_images(12)  # 9 training images, 3 held out


def _same(a, b):
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


# --- determinism: the seed and the runtime's generator, nothing else ---------------------------------------


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_weights_depend_on_the_seed_and_runtime_generator_only_not_on_global_generators(data, dp):
    # "Initial weights come from the study seed (torch's generator forked and seeded), the shuffling, flips,
    # rotation angles, shifts, DP samples and DP noise from the runtime's generator": a draw from torch's or
    # numpy's global generator anywhere would make two runs differ when those are seeded differently
    r = recipe(**DP) if dp else recipe(augment_flips=True, augment_rotate=20.0, augment_shift=2)
    release = RELEASE if dp else None
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)  # the legacy global generator must not matter
        before = torch.random.get_rng_state()
        start = r.init(3)
        assert torch.equal(torch.random.get_rng_state(), before)  # forked: the caller's stream is untouched
        runs.append((start, r.train(start, data, np.random.default_rng(4), record_dp=release).params))
    (start_a, a), (start_b, b) = runs
    assert _same(start_a, start_b)
    assert _same(a, b)
    other = r.train(start_a, data, np.random.default_rng(5), record_dp=release).params
    assert not _same(a, other)  # the runtime's generator does drive the run


# --- the global model a site receives ----------------------------------------------------------------------


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_a_finite_global_model_that_overflows_in_training_is_refused_as_diverged_with_or_without_dp(data, dp):
    # every value finite (so it passes the decoder and the tensor checks) and the loss and gradients finite
    # too (equal logit biases cancel in the softmax), but the spec's weight decay at its largest step pushes
    # the biases past float32's largest: no site may send a non-finite update, DP-SGD or not
    hostile = {"learning_rate": 10.0, "weight_decay": 1.0}
    r = recipe(**{**DP, **hostile}) if dp else recipe(**hostile)
    model = r.init(0)
    model["head.3.bias"] = np.full_like(model["head.3.bias"], 3e38)
    with pytest.raises(TrainingDivergedError, match="non-finite"):
        r.train(model, data, np.random.default_rng(0), record_dp=RELEASE if dp else None)


@pytest.mark.parametrize("scaffold", [False, True], ids=["plain", "scaffold"])
def test_control_variate_tensors_the_study_does_not_have_are_refused_naming_them(data, scaffold):
    # the recipe drops scaffold.c.* tensors before loading the network: one the study's specs do not name
    # must be refused like any other unexpected tensor, not ignored
    r = recipe(scaffold=scaffold)
    model = r.init(0) | {"scaffold.c.smuggled": np.zeros(3, np.float32)}
    with pytest.raises((RecipeError, TensorError), match=r"scaffold\.c\.smuggled"):
        r.train(model, data, np.random.default_rng(0))
    with pytest.raises((RecipeError, TensorError), match=r"scaffold\.c\.smuggled"):
        r.evaluate(model, data)


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_images_of_another_width_than_the_studys_are_refused_before_any_step(data, dp):
    # the data schema is channels * input_size^2: 16x16 images for a 28x28 (or a 3-channel 16x16) study are
    # refused, never reshaped into something else
    for params in ({"input_size": 28}, {"channels": 3}):
        r = recipe(**({**DP, **params} if dp else params))
        with pytest.raises(DatasetError, match="images must be rows of"):
            r.train(r.init(0), data, np.random.default_rng(0), record_dp=RELEASE if dp else None)
        with pytest.raises(DatasetError, match="images must be rows of"):
            r.evaluate(r.init(0), data)


# --- hostile DICOM files and labels CSVs --------------------------------------------------------------------


def _uri(scheme, folder, **params):
    from urllib.parse import quote

    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{scheme}://{quote(str(folder))}" + (f"?{query}" if query else "")


@pytest.mark.parametrize("window", [("NaN", "400"), ("40", "NaN"), ("40", "Infinity")])
def test_a_dicom_window_that_is_not_finite_is_a_problem_named_by_its_file(tmp_path, window):
    # the doc's VOI window comes from the file's first WindowCenter/WindowWidth; a NaN center left the
    # window empty and the image all black, without a word (as a non-finite rescale slope did)
    import pydicom
    from pydicom import config

    path = write_dicom(tmp_path / "w.dcm", np.arange(256, dtype=np.uint16).reshape(16, 16))
    ds = pydicom.dcmread(path)
    with config.disable_value_validation():
        ds.WindowCenter, ds.WindowWidth = window
        ds.save_as(path)
    with pytest.raises(Exception, match="window") as err:
        dicom_grey(path)
    assert type(err.value).__name__ == "ImageProblem"
    # through the connector: one problem line naming the file, the dataset refused
    folder = dicom_square_folder(tmp_path / "ct", 4, side=16)
    ds.save_as(folder / "img000.dcm")
    with pytest.raises(SchemaError, match=r"img000\.dcm: .*window"):
        open_dataset(_uri("dicom", folder))


@pytest.mark.parametrize("label", ["2", "-1", "1.0", "yes", " "])
def test_a_label_other_than_0_or_1_is_a_problem_named_by_its_file(tmp_path, label):
    folder = dicom_square_folder(tmp_path / "ct", 4, side=16)
    write_labels(
        folder / "labels.csv",
        [
            ("p0", "img000.dcm", "0"),
            ("p1", "img001.dcm", label),
            ("p2", "img002.dcm", "1"),
            ("p3", "img003.dcm", "0"),
        ],
    )
    with pytest.raises(SchemaError, match=r"img001\.dcm \(labels line 3\): missing label \(must be 0 or 1\)"):
        open_dataset(_uri("dicom", folder))


def test_colour_dicom_is_averaged_to_grey(tmp_path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2] = (240, 0, 0)  # mean 80: the brightest grey
    rgb[2] = (0, 0, 120)  # mean 40: half of it (any single plane would read 0 or 1 here)
    # row 3 black: the range's bottom
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "c.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 4, 4, 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(tmp_path / "c.dcm", enforce_file_format=True)
    grey = dicom_grey(tmp_path / "c.dcm")
    assert grey.shape == (1, 4, 4)
    np.testing.assert_allclose(grey[0], np.repeat([[1.0], [1.0], [0.5], [0.0]], 4, axis=1))
