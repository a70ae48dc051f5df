"""BreastMNIST (MedMNIST v2, Yang et al. 2023, CC BY 4.0): 780 breast ultrasound images of 28 x 28, split
into a federation of sites with label and size skew, as the imaging demo and benchmark dataset.

The file is ``<data_dir>/breastmnist/breastmnist.npz`` (keys ``train_images``, ``train_labels``,
``val_images``, ``val_labels``, ``test_images``, ``test_labels``; 546 / 78 / 156 images), checked against its
md5 before use. It is not downloaded: the copy fedhealth reads stores the labels as a flat vector, so its md5
is not the official file's (see the datasets README).

Labels are MedMNIST's: 1 = normal or benign, 0 = malignant. Each image becomes one row of 784 values in
[0, 1] (``px0`` ... ``px783``, row by row), the form the ``torch`` recipe reads.

``breastmnist_federation(n_sites, seed)``: the official train and validation images (624) are the sites'
training rows, the official test images (156) their held-out rows. Each site's share of each class is drawn
from a Dirichlet distribution centred on unequal site sizes (37/27/21/15% for 4 sites, in an order
drawn from the seed), so the sites differ in size and in label balance; each site gets at least
``MIN_PER_CLASS`` training images of each class. ``breastmnist_pooled()`` is the whole set (the centralized
baseline's data, trained by the same code). Row ids ``bm-<part>-<index>`` name the image's index in its
official split.

``holdout="val"`` (both functions) is the tuning split: the official train images (546) are the training
rows and the official validation images (78) the held-out rows, split over the sites the same way;
hyper-parameters are chosen on it so that the test images are touched only for the figures reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from fedhealth.core import ConfigError, DatasetMissingError
from fedhealth.core import data_dir as default_data_dir
from fedhealth.data._dataset import TabularDataset
from fedhealth.data._download import verify_md5

BREASTMNIST_FILE = "breastmnist/breastmnist.npz"
BREASTMNIST_MD5 = "098de56cd2d92ef2f7170e6153c02849"
BREASTMNIST_SIDE = 28
MIN_PER_CLASS = 4
_CONCENTRATION = 10.0  # higher: class shares closer to the site sizes (less label skew)
_FEATURES = tuple(f"px{i}" for i in range(BREASTMNIST_SIDE * BREASTMNIST_SIDE))


def breastmnist_arrays(data_dir: Path | str | None = None) -> dict[str, np.ndarray]:
    """The checked file's arrays: ``{train,val,test}_{images,labels}``."""
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    path = folder / BREASTMNIST_FILE
    if not path.is_file():
        raise DatasetMissingError(
            f"{path} is absent: place MedMNIST's BreastMNIST file there (see the datasets README)"
        )
    verify_md5(path, BREASTMNIST_MD5)
    with np.load(path, allow_pickle=False) as npz:
        return {key: np.asarray(npz[key]) for key in npz.files}


def _rows(images: np.ndarray) -> np.ndarray:
    return images.reshape(images.shape[0], -1).astype(np.float64) / 255.0


Holdout = Literal["test", "val"]


def _parts(
    arrays: dict[str, np.ndarray], holdout: Holdout = "test"
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, np.ndarray]:
    if holdout == "val":  # tuning: official train as training rows, official val held out
        X_val, y_val = _rows(arrays["val_images"]), arrays["val_labels"].astype(np.int64).reshape(-1)
        ids = [f"bm-train-{i}" for i in range(arrays["train_images"].shape[0])]
        y = arrays["train_labels"].astype(np.int64).reshape(-1)
        return _rows(arrays["train_images"]), y, ids, X_val, y_val
    if holdout != "test":
        raise ConfigError(f"holdout is 'test' or 'val', got {holdout!r}")
    X = np.concatenate([_rows(arrays["train_images"]), _rows(arrays["val_images"])])
    y = np.concatenate([arrays["train_labels"], arrays["val_labels"]]).astype(np.int64).reshape(-1)
    ids = [f"bm-train-{i}" for i in range(arrays["train_images"].shape[0])]
    ids += [f"bm-val-{i}" for i in range(arrays["val_images"].shape[0])]
    return X, y, ids, _rows(arrays["test_images"]), arrays["test_labels"].astype(np.int64).reshape(-1)


def breastmnist_pooled(data_dir: Path | str | None = None, holdout: Holdout = "test") -> TabularDataset:
    """Every image in one dataset: official train + val as training rows, official test as held-out rows
    (``holdout="val"``: official train as training rows, official val held out)."""
    X, y, ids, X_test, y_test = _parts(breastmnist_arrays(data_dir), holdout)
    prefix = "bm-test" if holdout == "test" else "bm-val"
    return TabularDataset(
        name="breastmnist-pooled",
        X_train=X,
        y_train=y,
        X_test=X_test,
        y_test=y_test,
        feature_names=_FEATURES,
        patient_ids_train=tuple(ids),
        patient_ids_test=tuple(f"{prefix}-{i}" for i in range(X_test.shape[0])),
    )


def site_shares(n_sites: int, seed: int) -> np.ndarray:
    """The unequal site sizes (decreasing geometrically, in an order drawn from ``seed``), summing to 1."""
    sizes = 0.75 ** np.arange(n_sites)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB5]))
    return np.asarray(rng.permutation(sizes / sizes.sum()))


def _assign(labels: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of each site: for each class, Dirichlet proportions around ``shares``, then a shuffled cut."""
    n_sites = shares.size
    members: list[list[int]] = [[] for _ in range(n_sites)]
    for level in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == level))
        props = rng.dirichlet(_CONCENTRATION * n_sites * shares)
        cuts = np.floor(np.cumsum(props) * idx.size).astype(int)[:-1]
        for site, part in enumerate(np.split(idx, cuts)):
            members[site].extend(part.tolist())
    return [np.sort(np.asarray(m, dtype=np.int64)) for m in members]


def breastmnist_federation(
    n_sites: int = 4, seed: int = 0, data_dir: Path | str | None = None, holdout: Holdout = "test"
) -> list[TabularDataset]:
    """The sites of the BreastMNIST federation (see the module docstring); the same seed, the same split."""
    if not 2 <= n_sites <= 20:
        raise ConfigError(f"a BreastMNIST federation has 2 to 20 sites, got {n_sites}")
    X, y, ids, X_test, y_test = _parts(breastmnist_arrays(data_dir), holdout)
    prefix = "bm-test" if holdout == "test" else "bm-val"
    shares = site_shares(n_sites, seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB6]))
    for _ in range(1000):
        train = _assign(y, shares, rng)
        test = _assign(y_test, shares, rng)
        enough = all(
            np.count_nonzero(y[t] == c) >= MIN_PER_CLASS and np.count_nonzero(y_test[s] == c) >= 1
            for t, s in zip(train, test, strict=True)
            for c in (0, 1)
        )
        if enough:
            break
    else:  # pragma: no cover - with 624 images and up to 20 sites a draw fits within a few tries
        raise ConfigError(f"no split of BreastMNIST into {n_sites} sites gives every site both classes")
    return [
        TabularDataset(
            name=f"breastmnist-{k}",
            X_train=X[t],
            y_train=y[t],
            X_test=X_test[s],
            y_test=y_test[s],
            feature_names=_FEATURES,
            patient_ids_train=tuple(ids[i] for i in t),
            patient_ids_test=tuple(f"{prefix}-{i}" for i in s),
        )
        for k, (t, s) in enumerate(zip(train, test, strict=True))
    ]
