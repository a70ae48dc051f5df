"""What the two boosting recipes (``lightgbm``, ``xgboost``) share besides the agreed bins: asking the library
about a study's parameters, timing a site's collective calls, and the shape of their model export."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from pydantic import JsonValue

from fedhealth.data import TabularDataset
from fedhealth.learning._collectives import Collectives
from fedhealth.learning._preprocessing import preprocessing_metadata
from fedhealth.learning._recipe import ModelExport

if TYPE_CHECKING:
    from fedhealth.learning._lightgbm import Binning


def probe_rows(n_features: int, classes: int | None) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """A few synthetic rows (no one's data) of the study's width, every class present."""
    rows = 2 * max(2, classes or 2)
    X = (np.arange(rows * n_features, dtype=np.float64).reshape(rows, n_features) * 7) % 5
    y = (np.arange(rows) % classes if classes else np.arange(rows)).astype(np.float64)
    return X, y


def reference_rows() -> TabularDataset:
    """The synthetic 2000 x 10 rows (1500 for training) of the boosting recipes' reference step, which
    ``fedhealth site check`` times on one machine."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 10))
    y = (X[:, 0] + rng.normal(size=2000) > 0).astype(np.int64)
    return TabularDataset(
        name="reference",
        X_train=X[:1500],
        y_train=y[:1500],
        X_test=X[1500:],
        y_test=y[1500:],
        feature_names=tuple(f"x{j}" for j in range(10)),
    )


def first_line(exc: BaseException) -> str:
    """A library's error message as one line, without the source path and time stamp it may carry."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    line = re.sub(r"^\[[0-9:]+\] \S+?:\d+: ", "", line)  # XGBoost: "[12:00:00] /src/x.cc:42: ..."
    return re.sub(r" at \S+, line \d+ ?\.?$", "", line).strip()  # LightGBM: "... at /src/x.cpp, line 9 ."


class TimedSession:
    """A site's session that also counts the seconds its program spent inside collective calls (waiting for
    the other sites and the relay): the site's own record says how much of its time was waiting."""

    def __init__(self, session: Collectives) -> None:
        self._session = session
        self.started = time.perf_counter()
        self.waiting_s = 0.0

    @property
    def site(self) -> str:
        return self._session.site

    @property
    def sites(self) -> tuple[str, ...]:
        return self._session.sites

    def secure_sum(self, values: NDArray[Any]) -> NDArray[np.float64]:
        started = time.perf_counter()
        try:
            return self._session.secure_sum(values)
        finally:
            self.waiting_s += time.perf_counter() - started

    def broadcast(self, data: bytes | None) -> bytes:
        started = time.perf_counter()
        try:
            return self._session.broadcast(data)
        finally:
            self.waiting_s += time.perf_counter() - started

    def barrier(self) -> None:
        started = time.perf_counter()
        try:
            self._session.barrier()
        finally:
            self.waiting_s += time.perf_counter() - started

    def record(self) -> dict[str, JsonValue]:
        """The program's seconds and those spent in collective calls (kept at the site, never sent)."""
        return {"program_s": time.perf_counter() - self.started, "collective_s": self.waiting_s}


def boosting_export(
    model: str,
    binning: Binning,
    *,
    metadata: Mapping[str, JsonValue],
    label_meaning: str | None,
    native_name: str,
    predict_proba: Any,
) -> ModelExport:
    """A boosting recipe's export: the model (its library's own file, over bin codes) and the binning, as
    tensors, as metadata (``binning``; ``preprocessing``: the sites' own standardization, as their
    connectors did it; ``label``) and as the native file a model package holds."""
    return ModelExport(
        tensors={
            "model": np.frombuffer(model.encode(), dtype=np.uint8).copy(),
            "bin_starts": np.concatenate([np.asarray(s, dtype=np.int64) for s in binning.starts]),
            "bin_counts": np.asarray(binning.num_bins, dtype=np.int64),
            "low": np.asarray(binning.low, dtype=np.float64),
            "high": np.asarray(binning.high, dtype=np.float64),
        },
        metadata={
            **metadata,
            "binning": binning.to_json(),
            "preprocessing": preprocessing_metadata(None),
            "label": {"positive_class": 1, "meaning": label_meaning},
        },
        predict_proba=predict_proba,
        native_file=(native_name, model.encode()),
    )
