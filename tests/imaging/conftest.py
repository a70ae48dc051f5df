"""Shared helpers of the imaging tests: synthetic image datasets a small CNN learns in a few steps."""

from __future__ import annotations

import numpy as np

from fedhealth.data import TabularDataset


def square_images(n: int, side: int = 16, seed: int = 0, name: str = "squares") -> TabularDataset:
    """``n`` noisy grey images of ``side`` x ``side``; label 1 images carry a bright square in the upper left
    corner. Rows are the flattened images in [0, 1] (as the image connectors give them)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int64)
    images = rng.random((n, side, side)) * 0.3
    q = max(side // 3, 2)
    images[labels == 1, 1 : 1 + q, 1 : 1 + q] += 0.7
    X = images.reshape(n, side * side)
    cut = n - max(n // 4, 2)
    return TabularDataset(
        name=name,
        X_train=X[:cut],
        y_train=labels[:cut],
        X_test=X[cut:],
        y_test=labels[cut:],
        feature_names=tuple(f"px{i}" for i in range(side * side)),
        patient_ids_train=tuple(f"p{i}" for i in range(cut)),
        patient_ids_test=tuple(f"p{i}" for i in range(cut, n)),
    )
