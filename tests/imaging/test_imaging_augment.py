"""The ``torch`` recipe's augmentations (random rotations and shifts besides flips), the ``cnn_wide``
architecture, and BreastMNIST's tuning split (official train vs official validation)."""

from __future__ import annotations

import numpy as np
import pytest
from imaging_files import square_images

from fedhealth.core import ConfigError
from fedhealth.data import breastmnist_federation, breastmnist_pooled
from fedhealth.learning import RecipeError, TorchParams, resolve_recipe
from fedhealth.learning._torch_recipe import _augmented, _rotate, _shift
from support import heart_data_dir

SMALL = {"input_size": 16, "batch_size": 16, "learning_rate": 0.01}


def dots(n: int, side: int = 9) -> np.ndarray:
    """``n`` one-channel images, each black but for one white pixel in the centre."""
    images = np.zeros((n, 1, side, side), dtype=np.float32)
    images[:, 0, side // 2, side // 2] = 1.0
    return images


def test_shifts_move_each_image_by_at_most_the_limit_and_cover_every_offset():
    moved = _shift(dots(400), 2, np.random.default_rng(0))
    assert moved.shape == (400, 1, 9, 9)
    assert np.all(moved.sum(axis=(1, 2, 3)) == 1.0)  # the dot moved, never lost (2 < 4 pixels of margin)
    where = [divmod(int(i), 9) for i in moved.reshape(400, 81).argmax(axis=1)]
    offsets = {(r - 4, c - 4) for r, c in where}
    assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    again = _shift(dots(400), 2, np.random.default_rng(0))
    assert np.array_equal(moved, again)


def test_rotations_turn_an_off_centre_bar_and_stay_within_the_limit():
    bar = np.zeros((200, 1, 15, 15), dtype=np.float32)
    bar[:, 0, 7, 7:14] = 1.0  # from the centre to the right edge
    turned = _rotate(bar, 30.0, np.random.default_rng(1))
    assert np.array_equal(turned, _rotate(bar, 30.0, np.random.default_rng(1)))
    assert not np.array_equal(turned, bar)
    # the bar's tip stays within 30 degrees of the horizontal: nothing above or below the centre row's cone
    ys, xs = np.nonzero(turned[:, 0].max(axis=0) > 0.5)
    far = (ys - 7) ** 2 + (xs - 7) ** 2 >= 16  # pixels near the centre carry no angle at this resolution
    ys, xs = ys[far], xs[far]
    angles = np.degrees(np.arctan2(np.abs(ys - 7), np.maximum(xs - 7, 1e-9)))
    assert angles.max() <= 35.0
    assert angles.max() >= 15.0  # and some image is turned noticeably
    assert np.all(turned >= 0.0)
    assert np.all(turned <= 1.0)


def test_without_augmentation_the_batch_is_untouched_and_no_draw_is_made():
    params = TorchParams(input_size=9)
    images = dots(4)
    rng = np.random.default_rng(3)
    assert _augmented(params, images, rng) is images
    assert rng.random() == np.random.default_rng(3).random()


def test_augmentation_limits_are_validated():
    with pytest.raises(RecipeError, match="augment_shift"):
        resolve_recipe("torch", "1", {"augment_shift": -1})
    with pytest.raises(RecipeError, match="augment_rotate"):
        resolve_recipe("torch", "1", {"augment_rotate": 400})


def test_cnn_wide_with_every_augmentation_trains_bit_identically_from_the_same_generator():
    wide = resolve_recipe(
        "torch",
        "1",
        {
            **SMALL,
            "architecture": "cnn_wide",
            "augment_flips": True,
            "augment_rotate": 10,
            "augment_shift": 2,
        },
    )
    count = sum(int(np.prod(s.shape)) for s in wide.param_specs() if "running" not in s.name)
    assert 285_000 < count < 290_000
    data = square_images(24)
    start = wide.init(0)
    one = wide.train(start, data, np.random.default_rng(5))
    two = wide.train(start, data, np.random.default_rng(5))
    other = wide.train(start, data, np.random.default_rng(6))
    assert all(one.params[k].tobytes() == two.params[k].tobytes() for k in one.params)
    assert not all(np.array_equal(one.params[k], other.params[k]) for k in one.params)
    assert "rotations up to 10 degrees" in wide.describe()
    assert "shifts up to 2 pixels" in wide.describe()


def test_the_tuning_split_holds_out_the_official_validation_images_only():
    folder = heart_data_dir()
    sites = breastmnist_federation(4, 0, folder, holdout="val")
    train_ids = [i for s in sites for i in s.patient_ids_train]
    held = [i for s in sites for i in s.patient_ids_test]
    assert len(set(train_ids)) == len(train_ids) == 546
    assert all(i.startswith("bm-train-") for i in train_ids)
    assert len(set(held)) == len(held) == 78
    assert all(i.startswith("bm-val-") for i in held)
    pooled = breastmnist_pooled(folder, holdout="val")
    assert (pooled.num_train, pooled.num_test) == (546, 78)
    assert breastmnist_pooled(folder).num_train == 624  # the default is unchanged
    with pytest.raises(ConfigError, match="holdout"):
        breastmnist_pooled(folder, holdout="train")  # type: ignore[arg-type]
