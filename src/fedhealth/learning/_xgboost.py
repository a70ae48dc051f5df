"""``xgboost``: federated XGBoost (3.2.0, hist) on the collective seam, exact (docs/boosting.md).

Every site runs XGBoost's own distributed training with the federated communicator; its server is a proxy at
the site, on 127.0.0.1 (:mod:`fedhealth.learning._xgboost_proxy`), that answers every collective through the
session: gradient histograms and other float sums only inside secure sums. Bins are the ones the ``lightgbm``
recipe agrees (a secure sum of counts on a public grid), applied through a ``QuantileDMatrix`` reference
built from the bin counts alone, so that XGBoost never exchanges quantile sketches (which hold every site's
raw values). The model equals XGBoost trained on the pooled rows on one machine
(:func:`train_pooled_xgboost`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from fedhealth.core import DatasetError
from fedhealth.data import TabularDataset
from fedhealth.learning._boosting import (
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
from fedhealth.learning._lightgbm import (
    Binning,
    binning_of,
    cell_counts,
    check_release,
    held_out_sums,
    release,
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
from fedhealth.learning._survival import (
    cindex_from_histogram,
    concordance_histogram,
    cox_labels,
    harrell_c,
    stratified_cox_objective,
)
from fedhealth.learning._xgboost_proxy import SessionProxy

XGBOOST_VERSION = "3.2.0"  # the last release with the federated communicator
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
FeatureName = Annotated[str, Field(min_length=1, max_length=200)]
Range = tuple[FiniteFloat, FiniteFloat]
_KIND = {
    "binary:logistic": "binary",
    "reg:squarederror": "regression",
    "multi:softprob": "multiclass",
    "survival:cox": "survival",
}


class XGBoostParams(BaseModel):
    """``recipe.params`` of ``xgboost``: XGBoost's parameters (same names and meaning) plus the public
    binning grid of the ``lightgbm`` recipe."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_features: int = Field(ge=1, le=10_000, description="input width")
    feature_names: tuple[FeatureName, ...] | None = None
    objective: Literal["binary:logistic", "reg:squarederror", "multi:softprob", "survival:cox"] = (
        "binary:logistic"
    )
    num_class: int = Field(default=1, ge=1, le=256, description="classes (multi:softprob only, >= 2)")
    num_rounds: int = Field(default=100, ge=1, le=10_000)
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
    max_depth: int = Field(default=6, ge=1, le=32)
    learning_rate: FiniteFloat = Field(default=0.3, gt=0, le=1)
    # the lower bounds of these are XGBoost's own, which it is asked for (xgboost_problem)
    reg_lambda: FiniteFloat = Field(default=1.0, le=1e6)
    reg_alpha: FiniteFloat = Field(default=0.0, le=1e6)
    min_child_weight: FiniteFloat = Field(default=1.0, le=1e6)
    gamma: FiniteFloat = Field(default=0.0, le=1e6)
    scale_pos_weight: FiniteFloat = Field(
        default=1.0, gt=0, le=1e6, description="binary:logistic: the weight of label 1's rows (rare outcomes)"
    )
    colsample_bytree: FiniteFloat = Field(
        default=1.0, gt=0, le=1, description="the share of features each tree may split on (seeded alike)"
    )
    monotone_constraints: tuple[Literal[-1, 0, 1], ...] | None = Field(
        default=None,
        description="per feature in input order: 1 the prediction only rises with it, -1 only falls, 0 free",
    )
    max_bin: int = Field(default=255, ge=2, le=255)
    grid_cells: int = Field(default=1024, ge=2, le=65_536)
    value_range: Range = (-10.0, 10.0)
    feature_ranges: tuple[Range, ...] | None = None
    label_meaning: str | None = Field(
        default=None, min_length=1, max_length=500, description="what label 1 means, for the model package"
    )
    preprocessing: Preprocessing | None = preprocessing_field()
    time_range: Range | None = Field(
        default=None, description="survival:cox: the public range of survival times (the C-index's time grid)"
    )
    score_range: Range = Field(
        default=(-8.0, 8.0), description="survival:cox: the public range of log hazard ratios (score grid)"
    )
    cindex_cells: int = Field(default=64, ge=2, le=512, description="survival:cox: cells of each grid")

    @model_validator(mode="after")
    def _consistent(self) -> XGBoostParams:
        check_stopping(self, binary=self.objective == "binary:logistic")
        check_monotone(self)
        check_preprocessing(self)
        if self.scale_pos_weight != 1.0 and self.objective != "binary:logistic":
            raise ValueError(
                f"scale_pos_weight is for the binary:logistic objective (objective is {self.objective})"
            )
        if self.objective == "survival:cox":
            if self.time_range is None:
                raise ValueError(
                    "survival:cox needs time_range, the public range of survival times for the C-index"
                )
            if self.early_stopping_rounds is not None:
                raise ValueError(
                    "survival:cox takes no early_stopping_rounds: its loss (the partial likelihood) is not a "
                    "sum over sites"
                )
            for name, (low, high) in (("time_range", self.time_range), ("score_range", self.score_range)):
                if not low < high:
                    raise ValueError(f"{name} must have low < high, got [{low}, {high}]")
        if self.objective == "multi:softprob" and self.num_class < 2:
            raise ValueError("multi:softprob needs num_class >= 2")
        if self.objective != "multi:softprob" and self.num_class != 1:
            raise ValueError(f"num_class applies to multi:softprob only ({self.objective} has one output)")
        if self.feature_names is not None and len(self.feature_names) != self.n_features:
            raise ValueError(
                f"feature_names names {len(self.feature_names)} features, n_features is {self.n_features}"
            )
        if self.feature_ranges is not None and len(self.feature_ranges) != self.n_features:
            raise ValueError(
                f"feature_ranges gives {len(self.feature_ranges)} ranges, n_features is {self.n_features}"
            )
        for low, high in self.ranges():
            if not low < high:
                raise ValueError(f"a feature range must have low < high, got [{low}, {high}]")
        problem = xgboost_problem(self)
        if problem is not None:
            raise ValueError(problem)
        return self

    def label_classes(self) -> int | None:
        """The number of classes (None for regression), for the synthetic rows the library is asked on."""
        return {"binary:logistic": 2, "multi:softprob": self.num_class}.get(self.objective)

    def ranges(self) -> list[tuple[float, float]]:
        if self.feature_ranges is not None:
            return [(float(lo), float(hi)) for lo, hi in self.feature_ranges]
        return [(float(self.value_range[0]), float(self.value_range[1]))] * self.n_features

    def training_params(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "objective": self.objective,
            "tree_method": "hist",
            "max_depth": self.max_depth,
            "eta": self.learning_rate,
            "lambda": self.reg_lambda,
            "alpha": self.reg_alpha,
            "min_child_weight": self.min_child_weight,
            "gamma": self.gamma,
            "scale_pos_weight": self.scale_pos_weight,
            "colsample_bytree": self.colsample_bytree,
            "max_bin": 256,
            "nthread": 1,
            "seed": 0,
            "verbosity": 0,
        }
        if self.objective == "multi:softprob":
            out["num_class"] = self.num_class
        if self.monotone_constraints is not None:
            out["monotone_constraints"] = "(" + ",".join(str(c) for c in self.monotone_constraints) + ")"
        return out


def _xgb() -> Any:
    try:
        import xgboost
    except ImportError as exc:
        raise RecipeError("the xgboost recipe needs XGBoost here: install fedhealth[gbdt]") from exc
    if xgboost.__version__ != XGBOOST_VERSION:
        raise RecipeError(
            f"the xgboost recipe runs on XGBoost {XGBOOST_VERSION} (the last with the federated "
            f"communicator); this site has {xgboost.__version__}"
        )
    return xgboost


def xgboost_problem(params: XGBoostParams) -> str | None:
    """What XGBoost says of these parameters, asked with one round on a few synthetic rows, in one line;
    None if it accepts them, or if this process has no XGBoost (a site refuses the study before training)."""
    try:
        xgb = _xgb()
    except RecipeError:
        return None
    X, y = probe_rows(params.n_features, params.label_classes())
    if params.objective == "survival:cox":  # survival times, every other one censored
        y = (np.arange(len(y)) + 1.0) * np.where(np.arange(len(y)) % 2, -1.0, 1.0)
    try:
        xgb.train(params.training_params(), xgb.DMatrix(X, label=y, nthread=1), 1)
    except xgb.core.XGBoostError as exc:
        return f"XGBoost {XGBOOST_VERSION} refuses these parameters: {first_line(exc)}"
    return None


def _reference(binning: Binning) -> Any:
    """XGBoost's reference matrix of ``binning``: column j cycles through its codes; no row of any site."""
    xgb = _xgb()
    rows = max(2, *binning.num_bins)
    data = np.column_stack([np.arange(rows) % k for k in binning.num_bins]).astype(np.float64)
    return xgb.QuantileDMatrix(data, max_bin=256, nthread=1)


# --- the model JSON a released result or a checkpoint holds ------------------------------------------------

# XGBoost 3.2.0 loads a JSON model checking the arrays' lengths but not what they point at: a child, parent or
# feature index out of range, or a child that leads back up the tree, loads, and the first prediction,
# feature importance or training round on it reads out of bounds (a segmentation fault) or loops forever. A
# JSON from a result (an orchestrator's, a package's) or a checkpoint is checked against the layout XGBoost
# itself writes for a model of this recipe (gbtree, numeric splits) before XGBoost sees it.
_TREE_ARRAYS = (
    "left_children",
    "right_children",
    "parents",
    "split_indices",
    "split_conditions",
    "split_type",
    "default_left",
    "base_weights",
    "loss_changes",
    "sum_hessian",
)
_NO_PARENT = 2147483647  # the root's parent as XGBoost writes it


class ModelJsonError(ValueError):
    """An XGBoost JSON model that is not laid out as XGBoost 3.2.0 writes a model of this recipe."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # XGBoost's parser might take another of the repeated values than this one
        raise ModelJsonError("the model JSON repeats a key")
    return out


def _count(value: Any, what: str) -> int:
    """A count as XGBoost writes it in a model's parameters: the decimal digits of a whole number."""
    if not isinstance(value, str) or not value.isdigit() or len(value) > 9:
        raise ModelJsonError(f"the model JSON's {what} is not a count")
    return int(value)


def _whole_numbers(tree: Mapping[str, Any], key: str, where: str) -> list[int]:
    items = tree.get(key)
    if not isinstance(items, list) or not all(type(v) is int for v in items):
        raise ModelJsonError(f"{where}'s {key} are not whole numbers")
    return items


def check_model_json(text: str) -> None:
    """Refuse (:class:`ModelJsonError`, one line) an XGBoost JSON model XGBoost must not be given: anything
    but a gbtree of numeric trees whose every node is reached once from its root (children and parents
    agreeing, the root no one's child), split features below ``num_feature``, no categories, and as many
    trees as ``num_trees``, ``tree_info`` and ``iteration_indptr`` say."""
    try:
        _check_model_json(text)
    except ModelJsonError:
        raise
    except (ValueError, RecursionError, LookupError, TypeError, AttributeError) as exc:
        raise ModelJsonError("the model JSON is not an XGBoost model") from exc


def _check_model_json(text: str) -> None:
    data = json.loads(text, object_pairs_hook=_unique_keys)
    learner = data["learner"]
    params = learner["learner_model_param"]
    booster = learner["gradient_booster"]
    model = booster["model"]
    trees = model["trees"]
    if booster.get("name") != "gbtree" or not isinstance(trees, list):
        raise ModelJsonError("the model JSON is not a gbtree model")
    n_features = _count(params.get("num_feature"), "num_feature")
    outputs = max(1, _count(params.get("num_class"), "num_class"))
    counts = model.get("gbtree_model_param")
    if not isinstance(counts, dict) or _count(counts.get("num_trees"), "num_trees") != len(trees):
        raise ModelJsonError("the model JSON's num_trees is not its number of trees")
    if _count(counts.get("num_parallel_tree"), "num_parallel_tree") != 1:
        raise ModelJsonError("the model JSON's trees are not one per output and round")
    info = model.get("tree_info")
    if not isinstance(info, list) or len(info) != len(trees) or any(type(c) is not int for c in info):
        raise ModelJsonError("the model JSON's tree_info does not name each tree's output")
    if any(not 0 <= c < outputs for c in info):
        raise ModelJsonError("the model JSON's tree_info names an output the model does not have")
    indptr = model.get("iteration_indptr")
    if (
        not isinstance(indptr, list)
        or any(type(i) is not int for i in indptr)
        or indptr[:1] != [0]
        or indptr[-1:] != [len(trees)]
        or any(b < a for a, b in itertools.pairwise(indptr))
    ):
        raise ModelJsonError("the model JSON's iteration_indptr does not cut its trees into rounds")
    cats = model.get("cats", {})
    if not isinstance(cats, dict) or any(v != [] for v in cats.values()):
        raise ModelJsonError("the model JSON has categorical features")
    for index, tree in enumerate(trees):
        _check_tree_json(tree, index, n_features)


def _check_tree_json(tree: Any, index: int, n_features: int) -> None:
    where = f"the model JSON's tree {index}"
    if not isinstance(tree, dict) or tree.get("id") != index or not isinstance(tree.get("tree_param"), dict):
        raise ModelJsonError(f"{where} is missing")
    param = tree["tree_param"]
    nodes = _count(param.get("num_nodes"), "num_nodes")
    if (
        nodes < 1
        or _count(param.get("num_deleted"), "num_deleted") != 0
        or _count(param.get("num_feature"), "num_feature") != n_features
        or param.get("size_leaf_vector") not in ("0", "1")
    ):
        raise ModelJsonError(f"{where}'s tree_param is not that of a numeric tree of the model's features")
    for key in _TREE_ARRAYS:
        items = tree.get(key)
        if not isinstance(items, list) or len(items) != nodes:
            raise ModelJsonError(f"{where} has no {key} of num_nodes entries")
    for key in ("categories", "categories_nodes", "categories_segments", "categories_sizes"):
        if tree.get(key) != []:
            raise ModelJsonError(f"{where} has categorical splits")
    left, right = _whole_numbers(tree, "left_children", where), _whole_numbers(tree, "right_children", where)
    parents, features = _whole_numbers(tree, "parents", where), _whole_numbers(tree, "split_indices", where)
    if any(t != 0 for t in _whole_numbers(tree, "split_type", where)):
        raise ModelJsonError(f"{where} has categorical splits")
    if parents[0] != _NO_PARENT:
        raise ModelJsonError(f"{where}'s root has a parent")
    # from the root, every node is reached exactly once, each child naming its parent: a tree, no cycle
    seen = [False] * nodes
    seen[0] = True
    stack = [0]
    while stack:
        node = stack.pop()
        pair = (left[node], right[node])
        if pair == (-1, -1):
            continue
        if not 0 <= features[node] < n_features:
            raise ModelJsonError(f"{where} splits on a feature the model does not have")
        for child in pair:
            if not 0 < child < nodes or seen[child] or parents[child] != node:
                raise ModelJsonError(f"{where}'s children do not form a tree")
            seen[child] = True
            stack.append(child)
    if not all(seen):
        raise ModelJsonError(f"{where} has nodes its root does not reach")


@dataclass(frozen=True, slots=True)
class XGBoostModel:
    """The trained model: XGBoost's JSON model over bin codes and the binning."""

    model_json: str
    binning: Binning

    def booster(self) -> Any:
        booster = _xgb().Booster()
        booster.load_model(bytearray(self.model_json.encode()))
        return booster

    def margin(self, X: NDArray[Any]) -> NDArray[np.float64]:
        """The raw score of each row (survival:cox: the log hazard ratio)."""
        xgb = _xgb()
        out = self.booster().predict(xgb.DMatrix(self.binning.codes(X), nthread=1), output_margin=True)
        return np.asarray(out, dtype=np.float64)

    def predict(self, X: NDArray[Any]) -> NDArray[np.float64]:
        xgb = _xgb()
        out = self.booster().predict(xgb.DMatrix(self.binning.codes(X), nthread=1))
        return np.asarray(out, dtype=np.float64)

    def importance(self, names: Sequence[str] | None) -> list[dict[str, JsonValue]]:
        """Each feature's total gain and number of splits, largest gain first (:func:`feature_importance`);
        XGBoost names the features it split on ``f<j>`` and leaves out the others."""
        booster = self.booster()
        d = len(self.binning.starts)
        gain, weight = (booster.get_score(importance_type=t) for t in ("total_gain", "weight"))
        return feature_importance(
            [float(gain.get(f"f{j}", 0.0)) for j in range(d)],
            [float(weight.get(f"f{j}", 0.0)) for j in range(d)],
            names,
        )

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> XGBoostModel:
        """The model in a study's result (what ``finish`` returned); :class:`ModelJsonError` for a model JSON
        XGBoost must not load."""
        text = str(result["model"])
        check_model_json(text)
        return cls(model_json=text, binning=Binning.from_json(result["binning"]))


def train_pooled_xgboost(params: XGBoostParams, datasets: Sequence[TabularDataset]) -> XGBoostModel:
    """XGBoost on one machine on the pooled training rows, with the bins the federation agrees on."""
    xgb = _xgb()
    datasets = [boosting_rows(params, d) for d in datasets]
    low, high = zip(*params.ranges(), strict=True)
    counts = sum(cell_counts(d.X_train, low, high, params.grid_cells) for d in datasets)
    binning = binning_of(params, np.asarray(counts))
    X = np.concatenate([binning.codes(d.X_train) for d in datasets])
    y = np.concatenate([_labels(params, d, "train") for d in datasets])
    train = xgb.QuantileDMatrix(X, label=y, ref=_reference(binning), nthread=1)
    training = {**params.training_params(), **_base_score(params, y.sum(), y.size)}
    if params.objective == "survival:cox":  # one stratum per site, as the federated gradients are
        objective = stratified_cox_objective([d.num_train for d in datasets])
        booster = xgb.train(training, train, params.num_rounds, obj=objective)
        return XGBoostModel(model_json=bytes(booster.save_raw("json")).decode(), binning=binning)
    if params.early_stopping_rounds is None:
        booster = xgb.train(training, train, params.num_rounds)
        return XGBoostModel(model_json=bytes(booster.save_raw("json")).decode(), binning=binning)
    X_test = np.concatenate([binning.codes(d.X_test) for d in datasets])
    y_test = np.concatenate([d.y_test for d in datasets]).astype(np.float64)
    metric = {"binary": "logloss", "multiclass": "mlogloss", "regression": "rmse"}[_KIND[params.objective]]
    if params.early_stopping_metric == "auc":
        metric = "auc"
    booster = xgb.train(
        {**training, "eval_metric": metric},
        train,
        params.num_rounds,
        evals=[(xgb.DMatrix(X_test, label=y_test, nthread=1), "validation")],
        early_stopping_rounds=params.early_stopping_rounds,
        verbose_eval=False,
    )
    best = booster[: booster.best_iteration + 1]
    return XGBoostModel(model_json=bytes(best.save_raw("json")).decode(), binning=binning)


def _base_score(params: XGBoostParams, total_y: float, total_n: float) -> dict[str, float]:
    """The start score of a binary or regression model: the pooled label mean (float64, rounded once to
    XGBoost's float32), given to XGBoost rather than estimated by it. XGBoost's own distributed estimate
    combines the workers' estimates in float32 and can end one float32 step away from the single-machine
    value (seen with 3 sites, and 4 sites of 105 rows, on synthetic data), which changes every prediction."""
    if params.objective == "survival:cox":
        # a hazard ratio of 1 (margin 0): the partial likelihood has no intercept, and XGBoost's distributed
        # estimate of one differs from its single-machine one
        return {"base_score": 1.0}
    if params.objective == "multi:softprob" or total_n < 1:
        return {}
    return {"base_score": total_y / total_n}


def checkpoint_holds(params: XGBoostParams, model: str, rounds: int) -> bool:
    """Whether a checkpoint's model JSON is one XGBoost reads and is a model of this study after exactly
    ``rounds`` rounds (its features and rounds); XGBoost's refusal of an edited file is no checkpoint."""
    xgb = _xgb()
    booster = xgb.Booster()
    try:
        check_model_json(model)  # XGBoost crashes on a model whose indices point out of its arrays
        booster.load_model(bytearray(model.encode()))
        return bool(booster.num_boosted_rounds() == rounds and booster.num_features() == params.n_features)
    except (ModelJsonError, xgb.core.XGBoostError):
        return False


def _labels(params: XGBoostParams, dataset: TabularDataset, part: str) -> NDArray[np.float64]:
    """XGBoost's labels of a part: the label, or for ``survival:cox`` the signed survival time."""
    if params.objective == "survival:cox":
        return cox_labels(dataset, part)
    return np.asarray(getattr(dataset, f"y_{part}"), dtype=np.float64)


def train_site_xgboost(
    params: XGBoostParams,
    dataset: TabularDataset,
    session: Collectives,
    checkpoints: Path | None = None,
) -> tuple[XGBoostModel, dict[str, int]]:
    """The federated training at one site: agreed bins, then XGBoost's federated communicator answered by
    a proxy on 127.0.0.1 over the session; early stopping and checkpoints as for
    :func:`~fedhealth.learning.train_site` (resuming with XGBoost's ``xgb_model``). Returns the model (the
    same at every site) and the collectives by kind."""
    xgb = _xgb()
    dataset = boosting_rows(params, dataset)
    kind = _KIND[params.objective]
    y = _labels(params, dataset, "train")  # a dataset without survival times is refused here, first
    stopper = stopping_rule(params, session, dataset.y_test)
    low, high = zip(*params.ranges(), strict=True)
    # a checked sum: the bins decide what the split records reveal, so a relay must not choose them by
    # forging the pooled counts (docs/boosting.md, "Bins")
    counts = session.checked_sum(cell_counts(dataset.X_train, low, high, params.grid_cells).reshape(-1))
    binning = binning_of(params, counts)
    total_y, total_n = session.secure_sum(np.array([y.sum(), y.size], dtype=np.float64)).tolist()
    start = _base_score(params, total_y, total_n)
    checkpoint, saved, done = None, None, 0
    if params.retries:
        if checkpoints is not None:
            key = TreeCheckpoint.key_of(params, binning, dataset)
            checkpoint = TreeCheckpoint(checkpoints, recipe="xgboost", key=key)
            saved = checkpoint.resumable(
                num_rounds=params.num_rounds,
                stopping=stopper is not None,
                model_holds=lambda model, rounds: checkpoint_holds(params, model, rounds),
            )
        done = agree_resume(session, saved.rounds if saved is not None else 0, params.num_rounds)
    init = None
    stopped = False
    if done:
        assert saved is not None  # every site reached round `done`, this one included
        init = xgb.Booster()
        init.load_model(bytearray(saved.model.encode()))
        init = init[:done]
        if stopper is not None:
            stopped = stopper.replay(saved.scores[:done])
    train = xgb.QuantileDMatrix(  # before the communicator: no sketch is exchanged
        binning.codes(dataset.X_train),
        label=y,
        ref=_reference(binning),
        nthread=1,
    )
    valid = xgb.DMatrix(binning.codes(dataset.X_test), nthread=1)
    proxy = SessionProxy(session)
    address = proxy.start()
    try:
        with xgb.collective.CommunicatorContext(
            dmlc_communicator="federated",
            federated_server_address=address,
            federated_world_size=proxy.n,
            federated_rank=proxy.rank,
        ):
            try:
                # xgb.train's own loop, so that the early-stopping rule can sum between rounds; the
                # validation matrix is in the booster's prediction cache, as xgb.train's evals would be
                booster = xgb.Booster({**params.training_params(), **start}, [train, valid], model_file=init)
                for i in range(done, params.num_rounds):
                    if stopped:
                        break
                    booster.update(train, i)
                    if stopper is not None:
                        scores = booster.predict(valid, output_margin=stopper.on_margins)
                        pieces = stopper.pieces(kind, scores, dataset.y_test)
                        stopped = stopper.update(session.secure_sum(pieces))
                    if checkpoint is not None:
                        model_json = bytes(booster.save_raw("json")).decode()
                        checkpoint.save(i + 1, model_json, stopper.scores if stopper else [])
            except xgb.core.XGBoostError:
                if proxy.error is not None:
                    raise proxy.error from None
                raise
    finally:
        proxy.stop()
    if proxy.error is not None:
        raise proxy.error
    extra: dict[str, int] = {}
    if stopper is not None:
        booster = booster[: stopper.best_iteration]
        extra = {"stopping": len(stopper.scores), "best_iteration": stopper.best_iteration}
    if params.retries:
        extra["resumed_from"] = done
    model = XGBoostModel(model_json=bytes(booster.save_raw("json")).decode(), binning=binning)
    return model, {**proxy.calls, "values_sent": proxy.values_sent, **extra}


def release_survival(
    session: Collectives,
    params: XGBoostParams,
    model: XGBoostModel,
    dataset: TabularDataset,
    result: dict[str, JsonValue],
) -> None:
    """The end of a ``survival:cox`` session: one secure sum of the sites' test rows and events, each site's
    exact C-index on its own test part (in its own block, so the sum lists them by site), and the
    concordance histogram; the leader broadcasts the model with the per-site C-indices and the federation's
    C-index from the histogram (approximate: :func:`~fedhealth.learning._survival.cindex_from_histogram`)."""
    assert params.time_range is not None  # the params' validator requires it for survival:cox
    n, rank = len(session.sites), session.sites.index(session.site)
    time, event = dataset.time_test, dataset.y_test
    assert time is not None  # cox_labels refused a dataset without survival times before training
    risk = model.margin(dataset.X_test)
    own = harrell_c(time, event, risk)
    blocks = np.zeros(2 * n)
    if own is not None:
        blocks[rank], blocks[n + rank] = own, 1.0
    histogram = concordance_histogram(
        time,
        event,
        risk,
        time_range=params.time_range,
        score_range=params.score_range,
        cells=params.cindex_cells,
    )
    pieces = np.concatenate([[len(time), float(event.sum())], blocks, histogram])
    total = session.secure_sum(pieces)
    report = None
    if session.site == session.sites[0]:
        per_site = {
            site: float(total[2 + i]) if total[2 + n + i] > 0.5 else None
            for i, site in enumerate(session.sites)
        }
        metrics: dict[str, JsonValue] = {
            "test_rows": round(float(total[0])),
            "events": round(float(total[1])),
            "c_index": cindex_from_histogram(total[2 + 2 * n :], params.cindex_cells),
            "c_index_sites": per_site,  # type: ignore[dict-item]
            "sites": n,
        }
        report = json.dumps({**result, **metrics}).encode()
    check_release(result, session.broadcast(report))


class XGBoostRecipe:
    """Federated XGBoost as a collective recipe, version 1."""

    name: Literal["xgboost"] = "xgboost"
    version: Literal["1"] = "1"
    params_model = XGBoostParams
    pattern = CombinationPattern.COLLECTIVE
    capabilities = RecipeCapabilities(export_onnx=True)

    def data_schema(self, params: XGBoostParams) -> DataSchema:
        classes = {"multi:softprob": params.num_class, "reg:squarederror": None}.get(params.objective, 2)
        return DataSchema(n_features=params.n_features, feature_names=params.feature_names, classes=classes)

    def describe(self, params: XGBoostParams) -> str:
        return (
            f"gradient-boosted trees (XGBoost {params.objective}, {params.num_rounds} rounds of depth at "
            f"most {params.max_depth}) on the site's training rows: the site sends per-feature counts on a "
            "public grid and XGBoost's gradient histograms and sums, each only inside a secure sum, and "
            "its column count and flags; at the end, "
            + (
                "its test-set rows, events and C-index and a histogram of its test rows by survival time "
                "and risk score on a public grid, inside a secure sum (its C-index is released by name)"
                if params.objective == "survival:cox"
                else "test-set counts and losses inside a secure sum"
            )
            + describe_options(params)
        )

    def template(self, n_features: int | None) -> list[TemplateParam]:
        return [
            TemplateParam(key="n_features", value=n_features or 13, comment="input width"),
            TemplateParam(key="objective", value="binary:logistic", comment="or reg:squarederror"),
            TemplateParam(key="num_rounds", value=100, comment="boosting rounds"),
            TemplateParam(key="max_depth", value=6, comment="tree depth at most"),
            TemplateParam(key="value_range", value=[-10.0, 10.0], comment="public range of every feature"),
        ]

    def reference_step(self) -> ReferenceStep:
        def run() -> None:
            train_pooled_xgboost(XGBoostParams(n_features=10, num_rounds=20), [reference_rows()])

        return ReferenceStep(run=run, note="20 trees on 1500 x 10 synthetic rows, one machine")

    def run_site(
        self,
        params: XGBoostParams,
        dataset: TabularDataset | None,
        session: Collectives,
        ctx: SessionContext,
    ) -> SiteSessionOutcome:
        if dataset is None:
            raise DatasetError("XGBoost needs the site's dataset")
        self.data_schema(params).check(dataset)
        dataset = boosting_rows(params, dataset)
        timed = TimedSession(session)
        model, calls = train_site_xgboost(params, dataset, timed, ctx.checkpoints)
        kind = _KIND[params.objective]
        rounds = calls.get("best_iteration", params.num_rounds)
        stopped = {k: calls[k] for k in ("best_iteration", "resumed_from") if k in calls}
        released = {"model": model.model_json, "binning": model.binning.to_json(), **stopped}
        if kind == "survival":
            release_survival(timed, params, model, dataset, {**released, "trees": rounds})
        else:
            release(
                timed,
                held_out_sums(kind, model.predict, dataset),
                kind,
                released,
                lambda: rounds * max(1, params.num_class),
            )
        return SiteSessionOutcome(
            record={"collectives": dict(calls), "train_rows": len(dataset.y_train), **timed.record()}
        )

    def session_retries(self, params: XGBoostParams) -> int:
        return params.retries

    def finish(self, params: XGBoostParams, released: bytes) -> dict[str, JsonValue]:
        result = json.loads(released)
        if not isinstance(result, dict) or not isinstance(result.get("model"), str):
            raise ValueError("the xgboost session released no model")
        # read off the model here, at the orchestrator, whatever the leader's broadcast said of it
        try:
            result["feature_importance"] = XGBoostModel.from_result(result).importance(params.feature_names)
        except Exception as exc:  # XGBoost's own error for a model it cannot read, or a bad binning
            raise ValueError(
                f"the xgboost session released a model XGBoost cannot read: {first_line(exc)}"
            ) from exc
        return result

    def export(self, params: XGBoostParams, result: Mapping[str, Any]) -> ModelExport:
        """``model``: XGBoost's JSON model (UTF-8 bytes, over bin codes), also the native file
        ``model.json``; the binning as for lightgbm."""
        model = XGBoostModel.from_result(result)
        binning = model.binning
        kind = _KIND[params.objective]
        return boosting_export(
            model.model_json,
            binning,
            metadata={
                "recipe": self.name,
                "version": self.version,
                "feature_names": list(params.feature_names) if params.feature_names else None,
                "format": "xgboost-json over bin codes",
                "xgboost": XGBOOST_VERSION,
                "objective": params.objective,
                "num_class": params.num_class,
                "grid_cells": binning.grid_cells,
                "feature_importance": model.importance(params.feature_names),
            },
            label_meaning=params.label_meaning,
            preprocessing=params.preprocessing,
            native_name="model.json",
            predict_proba=model.predict if params.objective == "binary:logistic" else None,
            predict=None if params.objective == "binary:logistic" else model.predict,
            # onnxmltools 1.16 converts binary, regression and multi:softprob models of 3 classes or more
            # exactly; a multi:softprob of 2 classes it takes for a binary model (its output disagrees with
            # XGBoost 3.2.0's), and it has no Cox objective: no ONNX file for those
            onnx=(
                (lambda: boosting_onnx("convert_xgboost", {}, kind, model.booster(), binning, model.predict))
                if kind in ("binary", "regression") or (kind == "multiclass" and params.num_class >= 3)
                else None
            ),
        )


XGBOOST_RECIPE = XGBoostRecipe()
