"""``lightgbm``: federated gradient-boosted trees with LightGBM, exact, on the collective seam.

Every site runs LightGBM's own data-parallel learner on its training rows; LightGBM's network is the session
(:mod:`fedhealth.learning._lightgbm_network`), so gradient histograms, label statistics and root sums travel
only inside secure sums, and the best-split records (computed from the sums; they become the model) are the
only values released per split. docs/boosting.md says exactly what the orchestrator and each site observe.

Bins are agreed before training from a secure sum: each site counts its values per cell of a public grid
(``grid_cells`` equal cells over each feature's public range; values outside fall into the edge cells), and
every site derives the same bins (at most ``max_bin`` runs of adjacent cells, from the summed counts alone).
Sites then train on bin codes with a reference Dataset built from the bin counts only (no row of anybody),
so that LightGBM never exchanges bin mappers, which would hold one site's raw values.

The model is LightGBM's model text over codes plus the binning (:class:`LightGbmModel` predicts on raw
features). It is identical to LightGBM's own data-parallel training on the same partition, and to LightGBM
trained on the pooled codes on one machine (:func:`train_pooled`) when count-based limits cannot bind:
``min_data_in_leaf=1`` with ``min_gain_to_split > 0``, the defaults here (docs/boosting.md).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from fedhealth.core import DatasetError
from fedhealth.data import TabularDataset
from fedhealth.learning._boosting import (
    STOPPING_METRIC,
    TimedSession,
    TreeCheckpoint,
    agree_resume,
    auc_cells_field,
    boosting_export,
    boosting_onnx,
    boosting_rows,
    check_monotone,
    check_preprocessing,
    check_stopping,
    describe_options,
    feature_importance,
    first_line,
    preprocessing_field,
    probe_rows,
    reference_rows,
    retries_field,
    stopping_metric_field,
    stopping_rule,
)
from fedhealth.learning._collectives import Collectives
from fedhealth.learning._errors import RecipeError
from fedhealth.learning._lightgbm_network import (
    RankGroup,
    SessionNetwork,
    TreeTracker,
    UnprotectedCollectiveError,
)
from fedhealth.learning._preprocessing import Preprocessing
from fedhealth.learning._recipe import (
    CombinationPattern,
    DataSchema,
    ModelExport,
    RecipeCapabilities,
    ReferenceStep,
    SessionContext,
    SiteSessionOutcome,
    TemplateParam,
)
from fedhealth.secagg import SecAggSecurityError

LIGHTGBM_VERSION = "4.7.0"  # the call sites of _lightgbm_network are this version's
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
FeatureName = Annotated[str, Field(min_length=1, max_length=200)]
Range = tuple[FiniteFloat, FiniteFloat]


class LightGbmParams(BaseModel):
    """``recipe.params`` of ``lightgbm``: LightGBM's parameters (same names and meaning) plus the public
    binning grid. The defaults ``min_data_in_leaf=1, min_gain_to_split=1e-6`` make the federated model equal
    LightGBM's on the pooled data (docs/boosting.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_features: int = Field(ge=1, le=10_000, description="input width")
    feature_names: tuple[FeatureName, ...] | None = Field(
        default=None, description="the features in input order; every site's dataset must declare them"
    )
    objective: Literal["binary", "regression", "multiclass"] = "binary"
    num_class: int = Field(default=1, ge=1, le=256, description="classes (multiclass only, >= 2)")
    num_rounds: int = Field(default=100, ge=1, le=10_000, description="boosting rounds")
    early_stopping_rounds: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="stop when the securely summed validation loss (the sites' test parts) has not improved "
        "for this many rounds; the model keeps the best round",
    )
    early_stopping_metric: Literal["loss", "auc"] = stopping_metric_field()
    auc_cells: int = auc_cells_field()
    retries: int = retries_field()
    num_leaves: int = Field(default=31, ge=2, le=4096)
    max_depth: int = Field(default=-1, ge=-1, le=64, description="-1: no limit")
    # the lower bounds of these are LightGBM's own, which it is asked for (library_problem)
    learning_rate: FiniteFloat = Field(default=0.1, le=1)
    lambda_l1: FiniteFloat = Field(default=0.0, le=1e6)
    lambda_l2: FiniteFloat = Field(default=0.0, le=1e6)
    min_gain_to_split: FiniteFloat = Field(default=1e-6, le=1e6)
    min_data_in_leaf: int = Field(default=1, ge=1, le=1_000_000)
    min_sum_hessian_in_leaf: FiniteFloat = Field(default=1e-3, le=1e6)
    scale_pos_weight: FiniteFloat = Field(
        default=1.0, gt=0, le=1e6, description="binary: the weight of label 1's rows (a rare outcome)"
    )
    feature_fraction: FiniteFloat = Field(
        default=1.0, gt=0, le=1, description="the share of features each tree may split on (seeded alike)"
    )
    monotone_constraints: tuple[Literal[-1, 0, 1], ...] | None = Field(
        default=None,
        description="per feature in input order: 1 the prediction only rises with it, -1 only falls, 0 free",
    )
    boost_from_average: bool = True
    max_bin: int = Field(default=255, ge=2, le=255, description="bins per feature at most")
    grid_cells: int = Field(default=1024, ge=2, le=65_536, description="public grid cells per feature")
    value_range: Range = Field(
        default=(-10.0, 10.0), description="public range of every feature (standardized data by default)"
    )
    feature_ranges: tuple[Range, ...] | None = Field(
        default=None, description="a public range per feature, in input order (instead of value_range)"
    )
    label_meaning: str | None = Field(
        default=None, min_length=1, max_length=500, description="what label 1 means, for the model package"
    )
    preprocessing: Preprocessing | None = preprocessing_field()

    @model_validator(mode="after")
    def _consistent(self) -> LightGbmParams:
        if self.objective == "multiclass" and self.num_class < 2:
            raise ValueError("multiclass needs num_class >= 2")
        if self.objective != "multiclass" and self.num_class != 1:
            raise ValueError(f"num_class applies to multiclass only ({self.objective} has one output)")
        check_stopping(self, binary=self.objective == "binary")
        check_monotone(self)
        check_preprocessing(self)
        if self.scale_pos_weight != 1.0 and self.objective != "binary":
            raise ValueError(f"scale_pos_weight is for the binary objective (objective is {self.objective})")
        if self.max_depth == 0:
            raise ValueError("max_depth must be -1 (no limit) or at least 1")
        if self.feature_names is not None:
            if len(self.feature_names) != self.n_features:
                raise ValueError(
                    f"feature_names names {len(self.feature_names)} features, n_features is {self.n_features}"
                )
            if len(set(self.feature_names)) != len(self.feature_names):
                raise ValueError("feature_names must be unique")
        if self.feature_ranges is not None and len(self.feature_ranges) != self.n_features:
            raise ValueError(
                f"feature_ranges gives {len(self.feature_ranges)} ranges, n_features is {self.n_features}"
            )
        for low, high in self.ranges():
            if not low < high:
                raise ValueError(f"a feature range must have low < high, got [{low}, {high}]")
        problem = library_problem(self)
        if problem is not None:
            raise ValueError(problem)
        return self

    def ranges(self) -> list[tuple[float, float]]:
        if self.feature_ranges is not None:
            return [(float(lo), float(hi)) for lo, hi in self.feature_ranges]
        return [(float(self.value_range[0]), float(self.value_range[1]))] * self.n_features

    def label_classes(self) -> int | None:
        """The number of classes (None for regression), for the synthetic rows the library is asked on."""
        return {"binary": 2, "multiclass": self.num_class}.get(self.objective)

    def training_params(self) -> dict[str, Any]:
        """LightGBM's training parameters (the same at every site and for the pooled reference)."""
        out: dict[str, Any] = {
            "objective": self.objective,
            "num_iterations": self.num_rounds,
            "num_leaves": self.num_leaves,
            "max_depth": self.max_depth,
            "learning_rate": self.learning_rate,
            "lambda_l1": self.lambda_l1,
            "lambda_l2": self.lambda_l2,
            "min_gain_to_split": self.min_gain_to_split,
            "min_data_in_leaf": self.min_data_in_leaf,
            "min_sum_hessian_in_leaf": self.min_sum_hessian_in_leaf,
            "boost_from_average": self.boost_from_average,
            "scale_pos_weight": self.scale_pos_weight,
            "feature_fraction": self.feature_fraction,
            "force_row_wise": True,  # not LightGBM's timing-based choice
            "deterministic": True,
            **DATASET_PARAMS,
        }
        if self.objective == "multiclass":
            out["num_class"] = self.num_class
        if self.monotone_constraints is not None:
            out["monotone_constraints"] = list(self.monotone_constraints)
        return out


# The Dataset settings of the reference and every site's Dataset: one bin per code, nothing pruned or
# bundled from data, one thread (several sites may share a process), no LightGBM output.
DATASET_PARAMS: dict[str, Any] = {
    "max_bin": 255,
    "min_data_in_bin": 1,
    "feature_pre_filter": False,
    "enable_bundle": False,
    "use_missing": False,
    "bin_construct_sample_cnt": 1 << 20,
    "num_threads": 1,
    "verbosity": -1,
}


def library_problem(params: LightGbmParams) -> str | None:
    """What LightGBM says of these parameters, asked on a few synthetic rows, in one line; None if it
    accepts them, or if this process has no LightGBM (a site refuses the study before training then)."""
    try:
        lgb = _lgb()
    except RecipeError:
        return None
    X, y = probe_rows(params.n_features, params.label_classes())
    try:
        data = lgb.Dataset(X, label=y, params=dict(DATASET_PARAMS))
        lgb.Booster(params={**params.training_params(), "tree_learner": "serial"}, train_set=data)
    except lgb.basic.LightGBMError as exc:
        return f"LightGBM {LIGHTGBM_VERSION} refuses these parameters: {first_line(exc)}"
    return None


class _LibraryLog:
    """Where LightGBM's own messages go: fedhealth's log at debug level, not the process's standard output.
    (A site's log would otherwise carry ``[LightGBM] [Info] Local rank: 1, total number of machines: 2``
    at every session: the two ranks of the site's own network, which reads like two machines.)"""

    _log = logging.getLogger("fedhealth.lightgbm")

    def info(self, msg: str) -> None:
        if msg.strip():
            self._log.debug("%s", msg.strip())

    def warning(self, msg: str) -> None:
        self._log.warning("%s", msg)


def _lgb() -> Any:
    try:
        import lightgbm
    except ImportError as exc:
        raise RecipeError("the lightgbm recipe needs LightGBM here: install fedhealth[gbdt]") from exc
    if lightgbm.__version__ != LIGHTGBM_VERSION:
        raise RecipeError(
            f"the lightgbm recipe runs on LightGBM {LIGHTGBM_VERSION} (its network callbacks are "
            f"version-specific); this site has {lightgbm.__version__}"
        )
    if not isinstance(lightgbm.basic._LOGGER, _LibraryLog):
        lightgbm.register_logger(_LibraryLog())
    return lightgbm


# --- agreed bins -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Binning:
    """Bins agreed from summed grid counts: feature j's cell of value x is ``floor((x - low_j) / (high_j -
    low_j) * grid_cells)`` clipped to the grid; its bin code is the run of cells (``starts[j]``, the first
    cell of each bin, ascending, from 0) the cell falls in."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    grid_cells: int
    starts: tuple[tuple[int, ...], ...]

    @property
    def num_bins(self) -> list[int]:
        return [len(s) for s in self.starts]

    def codes(self, X: NDArray[Any]) -> NDArray[np.float64]:
        cells = grid_cells(X, self.low, self.high, self.grid_cells)
        out = np.empty(cells.shape, dtype=np.float64)
        for j, starts in enumerate(self.starts):
            out[:, j] = np.searchsorted(np.asarray(starts), cells[:, j], side="right") - 1
        return out

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "low": list(self.low),
            "high": list(self.high),
            "grid_cells": self.grid_cells,
            "starts": [list(s) for s in self.starts],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Binning:
        return cls(
            low=tuple(float(v) for v in data["low"]),
            high=tuple(float(v) for v in data["high"]),
            grid_cells=int(data["grid_cells"]),
            starts=tuple(tuple(int(c) for c in s) for s in data["starts"]),
        )


def grid_cells(X: NDArray[Any], low: Sequence[float], high: Sequence[float], cells: int) -> NDArray[np.int64]:
    """Each value's cell of the public grid (values outside the range fall into the edge cells)."""
    lo = np.asarray(low, dtype=np.float64)
    width = np.asarray(high, dtype=np.float64) - lo
    scaled = np.floor((np.asarray(X, dtype=np.float64) - lo) / width * cells)
    return np.clip(scaled, 0, cells - 1).astype(np.int64)


def cell_counts(
    X: NDArray[Any], low: Sequence[float], high: Sequence[float], cells: int
) -> NDArray[np.float64]:
    """Rows per grid cell, per feature: shape (features, cells)."""
    idx = grid_cells(X, low, high, cells)
    counts = np.zeros((idx.shape[1], cells), dtype=np.float64)
    for j in range(idx.shape[1]):
        counts[j] = np.bincount(idx[:, j], minlength=cells)
    return counts


def agree_bins(counts: NDArray[Any], max_bin: int) -> tuple[tuple[int, ...], ...]:
    """Each feature's bins from the summed counts alone: one bin per occupied cell if at most ``max_bin``
    are occupied, else runs of cells cut at the count quantiles; every bin starts at an occupied cell (the
    first at cell 0), so no bin is empty of the pooled data."""
    out = []
    for row in np.asarray(counts, dtype=np.float64):
        occupied = np.flatnonzero(row > 0)
        if occupied.size <= max_bin:
            cuts = occupied[1:]
        else:
            cum = np.cumsum(row)
            targets = cum[-1] * np.arange(1, max_bin) / max_bin
            after = np.searchsorted(cum, targets, side="left") + 1  # a new bin starts after the target's cell
            nxt = np.searchsorted(occupied, after, side="left")  # ... at the next occupied cell
            cuts = np.unique(occupied[nxt[nxt < occupied.size]])
            cuts = cuts[cuts > (occupied[0] if occupied.size else 0)]
        out.append((0, *(int(c) for c in cuts)))
    return tuple(out)


class GridParams(Protocol):
    """What the agreed bins depend on (the boosting recipes' params)."""

    @property
    def n_features(self) -> int: ...
    @property
    def grid_cells(self) -> int: ...
    @property
    def max_bin(self) -> int: ...
    def ranges(self) -> list[tuple[float, float]]: ...


def binning_of(params: GridParams, counts: NDArray[Any]) -> Binning:
    ranges = params.ranges()
    return Binning(
        low=tuple(lo for lo, _ in ranges),
        high=tuple(hi for _, hi in ranges),
        grid_cells=params.grid_cells,
        starts=agree_bins(np.asarray(counts).reshape(params.n_features, params.grid_cells), params.max_bin),
    )


def reference_dataset(binning: Binning) -> Any:
    """LightGBM's reference Dataset of ``binning``: column j cycles through its codes, so LightGBM makes one
    bin per code; no row of any site is in it."""
    lgb = _lgb()
    rows = max(2, *binning.num_bins)
    data = np.column_stack([np.arange(rows) % k for k in binning.num_bins]).astype(np.float64)
    return lgb.Dataset(data, params=dict(DATASET_PARAMS), free_raw_data=False).construct()


# --- the model text a released result holds --------------------------------------------------------------

# LightGBM 4.7.0 parses a model text trusting it: ``tree_sizes`` are byte offsets it reads trees at (in
# parallel) and a ``[name: value]`` parameter line is split without a check, so a truncated or edited text
# crashes the process (a segmentation fault), not an error. A text from a result (an orchestrator's, a
# package's) is checked line by line against the layout LightGBM itself writes before LightGBM sees it.
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_INT = r"-?\d{1,9}"
_HEADER = (
    ("version", r"v4"),
    ("num_class", r"\d{1,3}"),
    ("num_tree_per_iteration", r"\d{1,3}"),
    ("label_index", r"\d{1,9}"),
    ("max_feature_idx", r"\d{1,6}"),
    ("objective", r"[a-z_]+(?: [a-z_]+:" + _NUMBER + r")*"),
    ("feature_names", r"[A-Za-z0-9_]+(?: [A-Za-z0-9_]+)*"),
    ("monotone_constraints", r"-?[01](?: -?[01])*"),  # only when the study sets monotone constraints
    ("feature_infos", r"(?:none|\[-?\d+:-?\d+\])(?: (?:none|\[-?\d+:-?\d+\]))*"),
    ("tree_sizes", r"\d{1,12}(?: \d{1,12})*"),
)
_TREE_KEYS = (
    "num_leaves",
    "num_cat",
    "split_feature",
    "split_gain",
    "threshold",
    "decision_type",
    "left_child",
    "right_child",
    "leaf_value",
    "leaf_weight",
    "leaf_count",
    "internal_value",
    "internal_weight",
    "internal_count",
    "is_linear",
    "shrinkage",
)
_INTEGER_KEYS = frozenset(
    {"num_leaves", "num_cat", "split_feature", "decision_type", "left_child", "right_child", "leaf_count"}
    | {"internal_count", "is_linear"}
)
_PARAMETER_LINE = re.compile(r"\[[a-z][a-z0-9_]*: [^\[\]\"\\]*\]")
_IMPORTANCE_LINE = re.compile(r"[A-Za-z0-9_]+=\d{1,12}")


class ModelTextError(ValueError):
    """A LightGBM model text that is not laid out as LightGBM 4.7.0 writes a model of this recipe."""


def check_model_text(text: str) -> None:
    """Refuse (:class:`ModelTextError`, one line) a model text LightGBM must not be given: anything but the
    header, the numeric trees (every array as long as ``num_leaves`` says, every child and feature index in
    range, ``tree_sizes`` the trees' exact lengths), ``end of trees`` and the feature importance, parameter
    and pandas sections, each line as LightGBM writes it."""
    if not text.isascii() or any(c < " " and c != "\n" for c in text):
        raise ModelTextError("the model text holds characters LightGBM does not write")
    lines = text.split("\n")
    if lines[0] != "tree":
        raise ModelTextError("the model text does not start with LightGBM's header")
    at = 1
    header: dict[str, str] = {}
    for key, pattern in _HEADER:
        line = lines[at] if at < len(lines) else ""
        if key == "monotone_constraints" and not line.startswith(f"{key}="):
            continue
        if not line.startswith(f"{key}=") or not re.fullmatch(pattern, line[len(key) + 1 :]):
            raise ModelTextError(f"the model text's header line {at + 1} is not a valid {key}")
        header[key] = line[len(key) + 1 :]
        at += 1
    n_features = int(header["max_feature_idx"]) + 1
    per_iteration = int(header["num_tree_per_iteration"])
    if per_iteration != int(header["num_class"]) or per_iteration < 1:
        raise ModelTextError("the model text's num_class and num_tree_per_iteration disagree")
    for key in ("feature_names", "feature_infos", "monotone_constraints"):
        if key in header and len(header[key].split(" ")) != n_features:
            raise ModelTextError(f"the model text's {key} do not number max_feature_idx + 1")
    sizes = [int(s) for s in header["tree_sizes"].split(" ")]
    if len(sizes) % per_iteration:
        raise ModelTextError("the model text's trees are not whole iterations")
    if lines[at : at + 1] != [""]:
        raise ModelTextError(f"the model text's header does not end at line {at + 1}")
    at += 1
    for index, size in enumerate(sizes):
        start = at
        at = _check_tree(lines, at, index, n_features)
        length = sum(len(line) + 1 for line in lines[start:at])
        if length != size:
            raise ModelTextError(f"the model text's tree_sizes do not match tree {index}")
    if lines[at : at + 2] != ["end of trees", ""]:
        raise ModelTextError("the model text has more trees than its tree_sizes, or no end of trees")
    at += 2
    _check_tail(lines, at)


def _check_tree(lines: list[str], at: int, index: int, n_features: int) -> int:
    """The line after tree ``index``, which starts at ``lines[at]``."""
    where = f"the model text's tree {index}"
    if lines[at : at + 1] != [f"Tree={index}"]:
        raise ModelTextError(f"{where} is missing")
    values: dict[str, list[str]] = {}
    for key in _TREE_KEYS:
        at += 1
        line = lines[at] if at < len(lines) else ""
        if not line.startswith(f"{key}="):
            raise ModelTextError(f"{where} has no {key} where LightGBM writes it")
        values[key] = line[len(key) + 1 :].split(" ") if line[len(key) + 1 :] else []
    at += 1
    if lines[at : at + 2] != ["", ""]:
        raise ModelTextError(f"{where} does not end after its shrinkage")
    for key, items in values.items():
        pattern = _INT if key in _INTEGER_KEYS else _NUMBER
        if not all(re.fullmatch(pattern, v) for v in items):
            raise ModelTextError(f"{where}'s {key} holds something other than numbers")
    single = [int(v) for v in values["num_leaves"]]
    if len(single) != 1 or not 1 <= single[0] <= 131072:
        raise ModelTextError(f"{where} has no valid num_leaves")
    leaves = single[0]
    if values["num_cat"] != ["0"] or values["is_linear"] != ["0"] or len(values["shrinkage"]) != 1:
        raise ModelTextError(f"{where} is not a numeric tree (categorical or linear)")
    for key in _TREE_KEYS[2:]:
        if key in ("is_linear", "shrinkage"):
            continue
        want = leaves if key.startswith("leaf_") else leaves - 1
        got = len(values[key])
        if got != want and not (leaves == 1 and key == "leaf_weight" and got == 0):
            raise ModelTextError(f"{where} has {got} {key} for {leaves} leaves")
    if any(not 0 <= int(f) < n_features for f in values["split_feature"]):
        raise ModelTextError(f"{where} splits on a feature the model does not have")
    if any(int(d) not in (0, 2, 4, 6, 8, 10) for d in values["decision_type"]):
        raise ModelTextError(f"{where} has a decision type LightGBM does not write for a numeric split")
    children = [int(c) for c in values["left_child"] + values["right_child"]]
    # each leaf (~c) and each node but the root (c > 0) is a child exactly once: a tree, not a cycle
    if sorted(children) != [*range(-leaves, 0), *range(1, leaves - 1)]:
        raise ModelTextError(f"{where}'s children do not form a tree")
    return at + 2


def _check_tail(lines: list[str], at: int) -> None:
    """The sections after ``end of trees`` LightGBM writes, each optional, in order."""
    if lines[at : at + 1] == ["feature_importances:"]:
        at += 1
        while at < len(lines) and _IMPORTANCE_LINE.fullmatch(lines[at]):
            at += 1
        if lines[at : at + 1] != [""]:
            raise ModelTextError("the model text's feature importances are not as LightGBM writes them")
        at += 1
    if lines[at : at + 1] == ["parameters:"]:
        at += 1
        while at < len(lines) and _PARAMETER_LINE.fullmatch(lines[at]):
            at += 1
        if lines[at : at + 3] != ["", "end of parameters", ""]:
            raise ModelTextError("the model text's parameters are not as LightGBM writes them")
        at += 3
    if lines[at:] not in (["pandas_categorical:null", ""], [""], []):
        raise ModelTextError("the model text goes on past its last section")


# --- the model -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LightGbmModel:
    """The trained model: LightGBM's model text over bin codes, and the binning that maps raw features to
    codes."""

    model_text: str
    binning: Binning

    def booster(self) -> Any:
        return _lgb().Booster(model_str=self.model_text)

    def predict(self, X: NDArray[Any], *, raw_score: bool = False) -> NDArray[np.float64]:
        """LightGBM's predictions for raw feature rows ``X``."""
        out = self.booster().predict(self.binning.codes(X), raw_score=raw_score, num_threads=1)
        return np.asarray(out, dtype=np.float64)

    def importance(self, names: Sequence[str] | None) -> list[dict[str, JsonValue]]:
        """Each feature's total gain and number of splits, largest gain first (:func:`feature_importance`)."""
        booster = self.booster()
        return feature_importance(
            booster.feature_importance("gain").tolist(), booster.feature_importance("split").tolist(), names
        )

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> LightGbmModel:
        """The model in a study's result (what ``finish`` returned); :class:`ModelTextError` for a model
        text LightGBM must not parse."""
        text = str(result["model"])
        check_model_text(text)
        return cls(model_text=text, binning=Binning.from_json(result["binning"]))


def train_pooled(params: LightGbmParams, datasets: Sequence[TabularDataset]) -> LightGbmModel:
    """LightGBM on one machine, on the sites' training rows pooled (in the given order), with the bins the
    federation agrees on: the reference the federated model is compared with. With
    ``early_stopping_rounds``, LightGBM's own ``early_stopping`` callback on the pooled test rows, and the
    model of its best iteration."""
    lgb = _lgb()
    datasets = [boosting_rows(params, d) for d in datasets]
    ranges = params.ranges()
    low, high = [lo for lo, _ in ranges], [hi for _, hi in ranges]
    counts = sum(cell_counts(d.X_train, low, high, params.grid_cells) for d in datasets)
    binning = binning_of(params, np.asarray(counts))
    X = np.concatenate([binning.codes(d.X_train) for d in datasets])
    y = np.concatenate([d.y_train for d in datasets]).astype(np.float64)
    train = lgb.Dataset(X, label=y, reference=reference_dataset(binning), params=dict(DATASET_PARAMS))
    training = {**params.training_params(), "tree_learner": "serial"}
    if params.early_stopping_rounds is None:
        booster = lgb.train(training, train, params.num_rounds)
        return LightGbmModel(model_text=booster.model_to_string(), binning=binning)
    X_test = np.concatenate([binning.codes(d.X_test) for d in datasets])
    y_test = np.concatenate([d.y_test for d in datasets]).astype(np.float64)
    valid = lgb.Dataset(X_test, label=y_test, reference=train, params=dict(DATASET_PARAMS))
    booster = lgb.train(
        {
            **training,
            "metric": "auc" if params.early_stopping_metric == "auc" else STOPPING_METRIC[params.objective],
        },
        train,
        params.num_rounds,
        valid_sets=[valid],
        callbacks=[lgb.early_stopping(params.early_stopping_rounds, verbose=False)],
    )
    text = booster.model_to_string(num_iteration=booster.best_iteration)
    return LightGbmModel(model_text=text, binning=binning)


def _probabilities(objective: str, raw: NDArray[np.float64]) -> NDArray[np.float64]:
    """LightGBM's output transformation of raw scores (sigmoid 1, softmax, identity)."""
    if objective == "binary":
        return np.asarray(1.0 / (1.0 + np.exp(-raw)), dtype=np.float64)
    if objective == "multiclass":
        shifted = np.exp(raw - raw.max(axis=1, keepdims=True))
        return np.asarray(shifted / shifted.sum(axis=1, keepdims=True), dtype=np.float64)
    return raw


# --- the site program ------------------------------------------------------------------------------------


def checkpoint_holds(params: LightGbmParams, model: str, rounds: int) -> bool:
    """Whether a checkpoint's model text is one LightGBM may be given (:func:`check_model_text`: LightGBM
    aborts the process on a text it cannot parse) and is a model of this study after exactly ``rounds``
    rounds: its features, its trees per round and its rounds."""
    lgb = _lgb()
    try:
        check_model_text(model)
        booster = lgb.Booster(model_str=model)
    except (ModelTextError, lgb.basic.LightGBMError):
        return False
    return bool(
        booster.current_iteration() == rounds
        and booster.num_feature() == params.n_features
        and booster.num_model_per_iteration() == max(1, params.num_class)
    )


def _init_schedule(params: LightGbmParams) -> list[str]:
    """The 8-byte allgathers of the first iteration (LightGBM 4.7.0's BoostFromAverage)."""
    if not params.boost_from_average:
        return []
    if params.objective == "binary":
        return ["sum", "sum", "mean"]  # BinaryLogloss::BoostFromScore's suml and sumw, then the mean
    if params.objective == "multiclass":
        return ["mean"] * params.num_class
    return ["mean"]


def placeholder_rows(
    params: LightGbmParams, binning: Binning
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """The rows a rank other than the site's own trains on: one per class (every code 0), no one's data.
    Its histograms, sums and scores are never used (every sum it asks for is answered with the own rank's;
    _lightgbm_network's docstring), so a handful of rows keeps its LightGBM work negligible."""
    classes = max(2, params.num_class) if params.objective != "regression" else 2
    codes = np.zeros((classes, len(binning.num_bins)), dtype=np.int64)
    labels = np.arange(classes, dtype=np.float64) if params.objective != "regression" else np.zeros(classes)
    return codes, labels


def train_site(
    params: LightGbmParams,
    dataset: TabularDataset,
    session: Collectives,
    checkpoints: Path | None = None,
) -> tuple[LightGbmModel, dict[str, int]]:
    """The federated training at one site (every site calls it over the same session): agreed bins, then
    LightGBM's data-parallel learner over the session; with ``early_stopping_rounds``, after each round the
    sites' validation-loss pieces in one secure sum, and the model of the best round. With ``retries``, the
    site checkpoints the model after every round in ``checkpoints`` (its own directory, if it has one) and
    the sites first agree on the last round every one of them completed, and continue from it (LightGBM's
    ``init_model``). Returns the model (the same at every site) and the collectives LightGBM asked for, by
    kind (``stopping`` counts the sums of the early-stopping rule; ``best_iteration`` the rounds kept;
    ``resumed_from`` the rounds taken from the checkpoints)."""
    lgb = _lgb()
    dataset = boosting_rows(params, dataset)
    stopper = stopping_rule(params, session, dataset.y_test)
    ranges = params.ranges()
    low, high = [lo for lo, _ in ranges], [hi for _, hi in ranges]
    X, y = dataset.X_train, dataset.y_train.astype(np.float64)
    # a checked sum: the bins decide what the split records reveal, so a relay must not choose them by
    # forging the pooled counts (docs/boosting.md, "Bins")
    counts = session.checked_sum(cell_counts(X, low, high, params.grid_cells).reshape(-1))
    binning = binning_of(params, counts)
    checkpoint, saved, done = None, None, 0
    if params.retries:
        if checkpoints is not None:
            checkpoint = TreeCheckpoint(
                checkpoints, recipe="lightgbm", key=TreeCheckpoint.key_of(params, binning, dataset)
            )
            saved = checkpoint.resumable(
                num_rounds=params.num_rounds,
                stopping=stopper is not None,
                model_holds=lambda model, rounds: checkpoint_holds(params, model, rounds),
            )
        done = agree_resume(session, saved.rounds if saved is not None else 0, params.num_rounds)
    init = None
    if done:
        assert saved is not None  # every site reached round `done`, this one included
        init = lgb.Booster(model_str=saved.model)
        init = lgb.Booster(model_str=init.model_to_string(num_iteration=done))
    global_mean: float | None = None
    if params.objective == "regression" and params.boost_from_average and init is None:
        # LightGBM's data-parallel start would be the mean of the sites' means; the pooled mean instead
        total_y, total_n = session.secure_sum(np.array([y.sum(), y.size], dtype=np.float64)).tolist()
        if total_n < 1:
            raise DatasetError("no site has a training row")
        global_mean = total_y / total_n
    codes = binning.codes(X).astype(np.int64)
    group = RankGroup(
        session,
        TreeTracker(
            codes,
            num_bins=binning.num_bins,
            num_leaves=params.num_leaves,
            max_depth=params.max_depth,
            min_data_in_leaf=params.min_data_in_leaf,
        ),
    )
    # both ranks of this site's network (module docstring of _lightgbm_network), each on its own thread
    sets = {}
    for rank in group.ranks:
        # the own rank trains on the site's rows; the other searches its block of the summed histograms only
        rank_codes, rank_y = (codes, y) if rank == group.own else placeholder_rows(params, binning)
        train = lgb.Dataset(
            rank_codes,
            label=rank_y,
            reference=reference_dataset(binning),
            params=dict(DATASET_PARAMS),
            free_raw_data=False,
        )
        if (
            init is not None
        ):  # as lgb.train(init_model=...): the start scores are the checkpoint's predictions
            training = params.training_params()
            train._set_predictor(
                lgb.basic._InnerPredictor.from_booster(
                    booster=init, pred_parameter=dict(init.params, **training)
                )
            )
        train.construct()
        sets[rank] = train
    networks = {
        rank: SessionNetwork(
            group,
            rank,
            local_rows=sets[rank].num_data(),
            init_schedule=_init_schedule(params)
            if init is None
            else [],  # no BoostFromAverage on a start score
            init_score=lambda _i: global_mean,
        )
        for rank in group.ranks
    }
    valid_codes = binning.codes(dataset.X_test)
    rows = len(dataset.y_test)
    raw = np.zeros((rows, params.num_class) if params.num_class > 1 else rows)
    stopped = False
    if stopper is not None and saved is not None and init is not None:
        stopped = stopper.replay(saved.scores[:done])  # the rule as it stood after round `done`
        if rows:
            raw = np.asarray(init.predict(valid_codes, raw_score=True, num_threads=1), dtype=np.float64)
    boosters: dict[int, Any] = {}

    def after_round(i: int, rank: int) -> bool:
        """Once per round, by rank 0 on its own thread (the boosters are alike) while the others wait for its
        answer: the early-stopping sum and the checkpoint. Whether to stop."""
        nonlocal raw, stopped
        booster = boosters[rank]
        if stopper is not None:
            if rows:  # one thread: a prediction sets LightGBM's process-wide thread count (the network's
                # module docstring), and other sites' boosters in this process may be inside an iteration
                raw += booster.predict(
                    valid_codes, start_iteration=i, num_iteration=1, raw_score=True, num_threads=1
                )
            scores = raw if stopper.on_margins else _probabilities(params.objective, raw)
            pieces = stopper.pieces(params.objective, scores, dataset.y_test)
            calls = networks[group.ranks[0]].calls
            calls["stopping"] = calls.get("stopping", 0) + 1
            stopped = stopper.update(session.secure_sum(pieces))
        if checkpoint is not None:
            checkpoint.save(i + 1, booster.model_to_string(), stopper.scores if stopper else [])
        return stopped

    errors: dict[int, BaseException] = {}

    def run_rank(rank: int) -> None:
        network = networks[rank]
        try:
            network.bind(lgb.basic._LIB)
            try:
                boosters[rank] = booster = lgb.Booster(
                    params={**params.training_params(), "tree_learner": "data", "num_machines": group.n},
                    train_set=sets[rank],
                )
                network.check()
                network.phase = "init"
                halt = stopped
                for i in range(done, params.num_rounds):
                    if halt:
                        break
                    try:
                        finished = booster.update()
                    except lgb.basic.LightGBMError:
                        network.check()  # LightGBM failed on what a failed session left: the session's reason
                        raise
                    network.check()
                    if finished:
                        break
                    if stopper is not None or checkpoint is not None:
                        group.share(rank, None)  # every rank is out of LightGBM's iteration first
                        mine = after_round(i, rank) if rank == group.ranks[0] else None
                        halt = bool(group.share(rank, mine))
            finally:
                network.unbind(lgb.basic._LIB)
        except BaseException as exc:
            errors[rank] = exc
            group.fail(exc)

    threads = [
        threading.Thread(target=run_rank, args=(rank,), name=f"lightgbm-rank-{rank}", daemon=True)
        for rank in group.ranks
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:  # the first failure itself, not a rank stopped by it
        raise group.error or next(iter(errors.values()))
    kept = stopper.best_iteration if stopper is not None else 0
    texts = {boosters[r].model_to_string(num_iteration=kept) for r in group.ranks}
    if len(texts) != 1:
        raise UnprotectedCollectiveError("this site's LightGBM ranks ended with different models")
    extra = {"best_iteration": kept} if stopper is not None else {}
    if params.retries:
        extra["resumed_from"] = done
    return LightGbmModel(model_text=texts.pop(), binning=binning), {
        **networks[group.ranks[0]].calls,
        "values_sent": group.values_sent,
        **extra,
    }


def held_out_sums(kind: str, predict: Any, dataset: TabularDataset) -> NDArray[np.float64]:
    """This site's test statistics, summed over the sites: [rows, correct, loss sum, own accuracy, 1 if it
    has test rows]."""
    rows = len(dataset.y_test)
    if rows == 0:
        return np.zeros(5)
    y = dataset.y_test.astype(np.float64)
    pred = predict(dataset.X_test)
    if kind == "regression":
        loss = float(np.sum((pred - y) ** 2))
        correct = float(np.sum((pred >= 0.5) == (y == 1)))
    elif kind == "binary":
        p = np.clip(pred, 1e-15, 1 - 1e-15)
        loss = float(-np.sum(y * np.log(p) + (1 - y) * np.log(1 - p)))
        correct = float(np.sum((pred >= 0.5) == (y == 1)))
    else:
        p = np.clip(pred[np.arange(rows), y.astype(np.int64)], 1e-15, 1.0)
        loss = float(-np.sum(np.log(p)))
        correct = float(np.sum(np.argmax(pred, axis=1) == y))
    return np.array([rows, correct, loss, correct / rows, 1.0])


def release(
    session: Collectives,
    sums: NDArray[np.float64],
    kind: str,
    model: dict[str, JsonValue],
    trees: Any,
) -> None:
    """The session's end: the held-out statistics summed, and the leader's broadcast of the model and the
    metrics (the session's released result)."""
    rows, correct, loss, accuracy_sum, with_test = session.secure_sum(sums).tolist()
    report = None
    if session.site == session.sites[0]:
        metrics: dict[str, JsonValue] = {
            "test_rows": round(rows),
            "accuracy": correct / rows if rows else None,
            "mean_client_accuracy": accuracy_sum / with_test if with_test else None,
            ("mse" if kind == "regression" else "log_loss"): loss / rows if rows else None,
        }
        report = json.dumps({**model, "trees": trees(), "sites": len(session.sites), **metrics}).encode()
    check_release(model, session.broadcast(report))


def check_release(own: Mapping[str, JsonValue], released: bytes) -> None:
    """Every site's check of the leader's broadcast: the released model, its binning and its rounds are
    the ones this site trained (the sums every site received were the same: the chain checks that). A
    leader whose own program went elsewhere (a checkpoint of a model the other sites do not hold, say)
    would otherwise release it unnoticed; this site fails the session instead, before its closing call."""
    try:
        result = json.loads(released)
    except ValueError:
        result = None
    if not isinstance(result, dict) or any(result.get(key) != value for key, value in own.items()):
        raise SecAggSecurityError("the leader released another model than the one this site trained")


class LightGbmRecipe:
    """Federated LightGBM as a collective recipe, version 1."""

    name: Literal["lightgbm"] = "lightgbm"
    version: Literal["1"] = "1"
    params_model = LightGbmParams
    pattern = CombinationPattern.COLLECTIVE
    capabilities = RecipeCapabilities(export_onnx=True)

    def data_schema(self, params: LightGbmParams) -> DataSchema:
        classes = {"multiclass": params.num_class, "regression": None}.get(params.objective, 2)
        return DataSchema(n_features=params.n_features, feature_names=params.feature_names, classes=classes)

    def describe(self, params: LightGbmParams) -> str:
        return (
            f"gradient-boosted trees (LightGBM {params.objective}, {params.num_rounds} rounds of at most "
            f"{params.num_leaves} leaves) on the site's training rows: the site sends per-feature counts "
            "on a public grid, label counts and sums, and per tree and split the root's and the smaller "
            "child's gradient histograms and the rows on each side of candidate splits, each only inside a "
            "secure sum; per split it releases its best split among its features, computed from the sums "
            "over all sites; at the end, test-set counts and losses inside a secure sum"
            + describe_options(params)
        )

    def template(self, n_features: int | None) -> list[TemplateParam]:
        return [
            TemplateParam(key="n_features", value=n_features or 13, comment="input width"),
            TemplateParam(key="objective", value="binary", comment="binary, multiclass or regression"),
            TemplateParam(key="num_rounds", value=100, comment="boosting rounds"),
            TemplateParam(key="num_leaves", value=31, comment="leaves per tree at most"),
            TemplateParam(key="learning_rate", value=0.1, comment="shrinkage"),
            TemplateParam(
                key="value_range", value=[-10.0, 10.0], comment="public range of every (standardized) feature"
            ),
        ]

    def reference_step(self) -> ReferenceStep:
        def run() -> None:
            train_pooled(LightGbmParams(n_features=10, num_rounds=20), [reference_rows()])

        return ReferenceStep(run=run, note="20 trees on 1500 x 10 synthetic rows, one machine")

    def run_site(
        self,
        params: LightGbmParams,
        dataset: TabularDataset | None,
        session: Collectives,
        ctx: SessionContext,
    ) -> SiteSessionOutcome:
        if dataset is None:
            raise DatasetError("LightGBM needs the site's dataset")
        self.data_schema(params).check(dataset)
        dataset = boosting_rows(params, dataset)
        timed = TimedSession(session)
        model, calls = train_site(params, dataset, timed, ctx.checkpoints)
        stopped = {k: calls[k] for k in ("best_iteration", "resumed_from") if k in calls}
        release(
            timed,
            held_out_sums(params.objective, model.predict, dataset),
            params.objective,
            {"model": model.model_text, "binning": model.binning.to_json(), **stopped},
            lambda: model.booster().num_trees(),
        )
        return SiteSessionOutcome(
            record={
                "collectives": dict(calls.items()),
                "train_rows": len(dataset.y_train),
                **timed.record(),
            }
        )

    def session_retries(self, params: LightGbmParams) -> int:
        return params.retries

    def finish(self, params: LightGbmParams, released: bytes) -> dict[str, JsonValue]:
        result = json.loads(released)
        if not isinstance(result, dict) or not isinstance(result.get("model"), str):
            raise ValueError("the lightgbm session released no model")
        # read off the model here, at the orchestrator, whatever the leader's broadcast said of it
        try:
            result["feature_importance"] = LightGbmModel.from_result(result).importance(params.feature_names)
        except Exception as exc:  # LightGBM's own error for a model it cannot read, or a bad binning
            raise ValueError(
                f"the lightgbm session released a model LightGBM cannot read: {first_line(exc)}"
            ) from exc
        return result

    def export(self, params: LightGbmParams, result: Mapping[str, Any]) -> ModelExport:
        """The model of a study's result (what ``finish`` returned) as tensors and metadata: ``model`` the
        LightGBM model text (UTF-8 bytes, over bin codes), ``bin_starts`` every feature's first cells
        concatenated and ``bin_counts`` how many each has, ``low``/``high`` the public grid's ranges; the
        native file ``model.txt`` (the model text) and, in the metadata, the binning that maps raw features
        to the codes it reads."""
        model = LightGbmModel.from_result(result)
        return boosting_export(
            model.model_text,
            model.binning,
            metadata={
                "recipe": self.name,
                "version": self.version,
                "feature_names": list(params.feature_names) if params.feature_names else None,
                "format": "lightgbm-text over bin codes",
                "lightgbm": LIGHTGBM_VERSION,
                "objective": params.objective,
                "num_class": params.num_class,
                "grid_cells": model.binning.grid_cells,
                "feature_importance": model.importance(params.feature_names),
            },
            label_meaning=params.label_meaning,
            preprocessing=params.preprocessing,
            native_name="model.txt",
            predict_proba=model.predict if params.objective == "binary" else None,
            predict=None if params.objective == "binary" else model.predict,
            onnx=lambda: boosting_onnx(
                "convert_lightgbm",
                {"zipmap": False},
                params.objective,
                model.booster(),
                model.binning,
                model.predict,
            ),
        )


def model_from_export(export: ModelExport) -> LightGbmModel:
    """The model back from :meth:`LightGbmRecipe.export`'s tensors."""
    t = export.tensors
    counts = [int(c) for c in t["bin_counts"]]
    edges = np.cumsum([0, *counts])
    starts = tuple(tuple(int(c) for c in t["bin_starts"][a:b]) for a, b in itertools.pairwise(edges))
    binning = Binning(
        low=tuple(float(v) for v in t["low"]),
        high=tuple(float(v) for v in t["high"]),
        grid_cells=int(export.metadata["grid_cells"]),  # type: ignore[arg-type]
        starts=starts,
    )
    text = bytes(t["model"]).decode()
    check_model_text(text)
    return LightGbmModel(model_text=text, binning=binning)


LIGHTGBM_RECIPE = LightGbmRecipe()
