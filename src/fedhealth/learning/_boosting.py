"""What the two boosting recipes (``lightgbm``, ``xgboost``) share besides the agreed bins: asking the library
about a study's parameters, timing a site's collective calls, and the shape of their model export."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from pydantic import Field, JsonValue

from fedhealth.core import discard_interrupted_writes, write_private_file
from fedhealth.data import SchemaError, TabularDataset
from fedhealth.learning._collectives import Collectives
from fedhealth.learning._preprocessing import (
    Preprocessing,
    StandardizeMode,
    preprocessing_metadata,
    raw_features,
)
from fedhealth.learning._recipe import ModelExport
from fedhealth.secagg import SecAggSecurityError

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


# --- the units the trees read ------------------------------------------------------------------------------


def preprocessing_field() -> Any:
    return Field(
        default=None,
        description="standardize = 'none': every site trains on its features' raw values (its connector's "
        "own standardization undone), so the trees' thresholds mean the same at every site and the package "
        "takes raw rows; default: the rows as each site's connector gives them",
    )


def check_preprocessing(params: Any) -> None:
    """``preprocessing``, if given, is ``standardize = "none"`` with the features named (the package selects
    its input columns by name); a tree needs no scaling, only the public ranges in the features' units."""
    pre: Preprocessing | None = params.preprocessing
    if pre is None:
        return
    if pre.standardize is not StandardizeMode.NONE:
        raise ValueError(
            f"preprocessing.standardize = {pre.standardize.value!r}: boosting takes 'none' only (trees need "
            "no scaling); give the features' public ranges in their own units (feature_ranges)"
        )
    problem = pre.problem(params.feature_names, params.n_features)
    if problem is not None:
        raise ValueError(problem)


def boosting_rows(params: Any, dataset: TabularDataset) -> TabularDataset:
    """The site's rows as the study trains on them: as its connector gave them, or, with ``preprocessing``
    (``standardize = "none"``), on their raw scale: a connector that standardized them with the site's own
    statistics is undone, so that every site's trees read the same units. Idempotent."""
    if params.preprocessing is None or dataset.scaling is None:
        return dataset
    return dataclasses.replace(
        dataset,
        X_train=raw_features(dataset, dataset.X_train),
        X_test=raw_features(dataset, dataset.X_test),
        scaling=None,
    )


# --- feature importance ---------------------------------------------------------------------------------


def feature_importance(
    gains: Sequence[float], splits: Sequence[float], names: Sequence[str] | None
) -> list[dict[str, JsonValue]]:
    """Each input feature's total gain (the loss reduction summed over every split on it, in every tree and
    class) and its number of splits, largest gain first (ties in input order). Read off the released trees,
    whose splits carry their gains, so it says nothing the model does not."""
    labels = list(names) if names else [f"x{j}" for j in range(len(gains))]
    if len(labels) != len(gains) or len(splits) != len(gains):
        raise ValueError(f"the model has {len(gains)} features, not {len(labels)}")
    order = sorted(range(len(gains)), key=lambda j: (-float(gains[j]), j))
    return [
        {"feature": labels[j], "index": j, "total_gain": float(gains[j]), "splits": int(splits[j])}
        for j in order
    ]


# --- early stopping on a securely summed validation metric ------------------------------------------------

# The loss each objective stops on: additive over rows, so the sites' (sum, rows) pieces summed securely give
# the pooled mean exactly. AUC (binary objectives) is summed as counts of rows per (label, score cell).
STOPPING_METRIC = {"binary": "binary_logloss", "multiclass": "multi_logloss", "regression": "l2"}
_EPS = 1e-15  # LightGBM's kEpsilon, the clipping of its log losses
AUC_MARGIN_RANGE = 10.0  # the AUC grid's cells split [-10, 10] of the raw score (log-odds); beyond: the ends


def validation_pieces(kind: str, output: NDArray[Any], y: NDArray[Any]) -> NDArray[np.float64]:
    """This site's additive pieces of the stopping loss on its validation rows: [loss sum, rows].
    ``output``: probabilities (binary: P(1), multiclass: one column per class) or predictions (regression)."""
    rows = len(y)
    if rows == 0:
        return np.zeros(2)
    y = np.asarray(y, dtype=np.float64)
    out = np.asarray(output, dtype=np.float64)
    if kind == "binary":
        p = np.clip(out, _EPS, 1 - _EPS)
        loss = -np.sum(y * np.log(p) + (1 - y) * np.log(1 - p))
    elif kind == "multiclass":
        loss = -np.sum(np.log(np.clip(out[np.arange(rows), y.astype(np.int64)], _EPS, None)))
    else:
        loss = np.sum((out - y) ** 2)
    return np.array([float(loss), float(rows)])


def auc_cells_of(margins: NDArray[Any], cells: int) -> NDArray[np.int64]:
    """The cell of each raw score (log-odds) on the AUC grid: ``cells`` equal cells of
    [-:data:`AUC_MARGIN_RANGE`, +:data:`AUC_MARGIN_RANGE`], the scores beyond it in the end cells. The cells
    are in the scores' order, so a lower cell holds only lower scores."""
    m = np.asarray(margins, dtype=np.float64).reshape(-1)
    scaled = (m + AUC_MARGIN_RANGE) * (cells / (2 * AUC_MARGIN_RANGE))
    return np.clip(np.floor(scaled), 0, cells - 1).astype(np.int64)


def auc_pieces(margins: NDArray[Any], y: NDArray[Any], cells: int) -> NDArray[np.float64]:
    """This site's validation rows counted per AUC cell (:func:`auc_cells_of`), label 0 then label 1:
    ``2 * cells`` counts, which the sites sum securely."""
    where = auc_cells_of(margins, cells)
    label = np.asarray(y).reshape(-1) == 1
    negatives = np.bincount(where[~label], minlength=cells)
    positives = np.bincount(where[label], minlength=cells)
    return np.concatenate([negatives, positives]).astype(np.float64)


def auc_from_counts(counts: NDArray[Any]) -> float:
    """The AUC of the pooled rows counted per cell (:func:`auc_pieces`, summed): the share of (positive,
    negative) pairs in which the positive scored higher, a pair in one cell counting one half (as a tie does).
    It is the exact AUC when no cell holds a positive and a negative of different scores; each such pair
    moves it by at most ``0.5 / (positives * negatives)``. NaN without a row of each label."""
    total = np.rint(np.asarray(counts, dtype=np.float64)).reshape(2, -1)
    negatives, positives = total
    pairs = float(negatives.sum()) * float(positives.sum())
    if pairs == 0:
        return math.nan
    below = np.cumsum(negatives) - negatives  # negatives in lower cells
    return float((positives @ below + 0.5 * (positives @ negatives)) / pairs)


@dataclass(slots=True)
class EarlyStopping:
    """The libraries' own rule (LightGBM's ``early_stopping`` callback, XGBoost's ``EarlyStopping``, both
    with ``min_delta=0``): an iteration improves when its score is strictly better than the best so far (a
    lower loss, a higher AUC); training stops once ``rounds`` iterations in a row did not improve, and the
    model keeps ``best_iteration`` iterations (boosting rounds, counted from 1). Every site feeds it the same
    securely summed pieces, so every site stops at the same tree.

    ``metric``: ``"loss"`` (pieces ``[loss sum, rows]``, :func:`validation_pieces`) or ``"auc"`` (counts per
    label and score cell, :func:`auc_pieces`, on ``auc_cells`` cells)."""

    rounds: int
    metric: str = "loss"
    auc_cells: int = 0
    scores: list[float] = field(default_factory=list)
    best: float = math.nan
    best_iteration: int = 0

    @property
    def on_margins(self) -> bool:
        """Whether :meth:`pieces` takes raw scores (log-odds: AUC) rather than the objective's output."""
        return self.metric == "auc"

    def pieces(self, kind: str, scores: NDArray[Any], y: NDArray[Any]) -> NDArray[Any]:
        """This site's pieces of the round's score: ``scores`` are raw scores (log-odds) if
        :attr:`on_margins`, else the objective's output as :func:`validation_pieces` takes it."""
        if self.on_margins:
            return auc_pieces(scores, y, self.auc_cells)
        return validation_pieces(kind, scores, y)

    def score(self, summed: NDArray[Any]) -> float:
        """The round's score from the pieces summed over the sites."""
        if self.metric == "auc":
            return auc_from_counts(summed)
        loss_sum, rows = np.asarray(summed, dtype=np.float64).tolist()
        return float(loss_sum / rows)

    def update(self, summed: NDArray[Any]) -> bool:
        """Record the next iteration's summed pieces; True when training must stop now."""
        return self.record(self.score(summed))

    def record(self, score: float) -> bool:
        """Record the next iteration's score; True when training must stop now."""
        self.scores.append(score)
        better = score > self.best if self.metric == "auc" else score < self.best
        if self.best_iteration == 0 or better:
            self.best, self.best_iteration = score, len(self.scores)
        return len(self.scores) - self.best_iteration >= self.rounds

    def replay(self, scores: list[float]) -> bool:
        """Take up the scores of rounds done in an earlier session; True if the rule had stopped there."""
        stop = False
        for score in scores:
            stop = self.record(score)
            if stop:
                break
        return stop


def stopping_rule(params: Any, session: Any, y_test: NDArray[Any]) -> EarlyStopping | None:
    """The study's early-stopping rule, after the check every site makes before training: a validation
    part somewhere (one secure sum of the sites' test-row counts and, for AUC, of their positives); none at
    all, or for AUC no row of one of the labels, is the study's input error, the same at every site."""
    if params.early_stopping_rounds is None:
        return None
    labels = np.asarray(y_test).reshape(-1)
    counts = [labels.size]
    if params.early_stopping_metric == "auc":
        counts.append(int(np.sum(labels == 1)))
    total = session.secure_sum(np.array(counts, dtype=np.float64)).tolist()
    if total[0] < 1:
        raise SchemaError("early_stopping_rounds needs a validation part: no site has held-out (test) rows")
    if params.early_stopping_metric == "auc" and not 1 <= total[1] <= total[0] - 1:
        raise SchemaError(
            "early_stopping_metric auc needs held-out (test) rows of both labels; the sites' test parts "
            "together have one label only"
        )
    return EarlyStopping(
        rounds=params.early_stopping_rounds, metric=params.early_stopping_metric, auc_cells=params.auc_cells
    )


def stopping_metric_field() -> Any:
    return Field(
        default="loss",
        description="what early stopping watches: the objective's loss, or (binary objectives) the AUC, "
        "counted on a public grid of auc_cells cells of the raw score",
    )


def auc_cells_field() -> Any:
    return Field(
        default=2000,
        ge=10,
        le=100_000,
        description="early_stopping_metric auc: cells of the public grid over raw scores -10..10 "
        "(log-odds) on which the sites count their held-out rows per label",
    )


def check_monotone(params: Any) -> None:
    """``monotone_constraints`` names one constraint per feature (a ValueError: one line)."""
    given = params.monotone_constraints
    if given is not None and len(given) != params.n_features:
        raise ValueError(
            f"monotone_constraints gives {len(given)} constraints, n_features is {params.n_features}"
        )


def check_stopping(params: Any, binary: bool) -> None:
    """The parameter checks of early stopping both recipes make (a ValueError: one line)."""
    if params.early_stopping_metric == "auc":
        if params.early_stopping_rounds is None:
            raise ValueError("early_stopping_metric applies with early_stopping_rounds")
        if not binary:
            raise ValueError(
                f"early_stopping_metric auc is for binary objectives (objective is {params.objective})"
            )


def describe_options(params: Any) -> str:
    """What early stopping, retries and raw values add to a boosting recipe's description (what a steward
    approves)."""
    out = ""
    if params.preprocessing is not None:
        out += "; the site's features on their raw scale (its own standardization undone)"
    if params.early_stopping_rounds is not None and params.early_stopping_metric == "auc":
        out += (
            "; after every round, the site's validation (test-set) rows counted per label and per cell of "
            f"a public grid of {params.auc_cells} cells of the raw score, inside a secure sum (the pooled "
            f"counts give the AUC), stopping after {params.early_stopping_rounds} rounds without improvement"
        )
    elif params.early_stopping_rounds is not None:
        out += (
            "; after every round, the site's validation (test-set) loss sum and row count inside a secure "
            f"sum, stopping after {params.early_stopping_rounds} rounds without improvement"
        )
    if params.retries:
        out += (
            f"; the site keeps the model after each round in its own home, and after a failed session the "
            f"study may start again up to {params.retries} time(s), each session starting with one secure "
            "sum of which rounds the site completed"
        )
    return out


# --- checkpoints and resuming ------------------------------------------------------------------------------

RETRIES_LIMIT = 3


def retries_field() -> Any:
    return Field(
        default=0,
        ge=0,
        le=RETRIES_LIMIT,
        description="sessions the study may start again after a failed one, each resuming from the last "
        "round every site completed (checkpointed in each site's home)",
    )


@dataclass(frozen=True, slots=True)
class Saved:
    """A checkpoint: the model after ``rounds`` boosting rounds (library text) and the stopping losses."""

    rounds: int
    model: str
    scores: list[float]


class TreeCheckpoint:
    """A site's checkpoint of its boosting session, in its own home: after every completed round, the model
    so far (written to a temporary file, then renamed: a crash leaves the previous checkpoint whole, and
    the next session removes the crash's temporary file). It
    never leaves the site. ``key`` binds it to the study's parameters, the agreed bins and the site's data
    (a checkpoint of anything else is ignored)."""

    def __init__(self, directory: Path, *, recipe: str, key: str) -> None:
        self.path = directory / f"{recipe}-checkpoint.json"
        self.key = key

    @staticmethod
    def key_of(params: Any, binning: Any, dataset: TabularDataset) -> str:
        text = json.dumps(
            [params.model_dump(mode="json"), binning.to_json(), dataset.fingerprint], sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def load(self) -> Saved | None:
        """The checkpoint to resume from, if it is this session's; a session opens it once, before any
        save, and clears what a killed earlier session left half-written (its temporary file). A file
        without a whole number of rounds, a model text and a list of scores is none."""
        discard_interrupted_writes(self.path)
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError):  # RecursionError: arrays nested too deep to parse
            return None
        if not isinstance(data, dict) or data.get("key") != self.key:
            return None
        rounds, model, scores = data.get("rounds"), data.get("model"), data.get("scores")
        if type(rounds) is not int or not isinstance(model, str) or not isinstance(scores, list):
            return None
        return Saved(rounds=rounds, model=model, scores=scores)

    def resumable(
        self, *, num_rounds: int, stopping: bool, model_holds: Callable[[str, int], bool]
    ) -> Saved | None:
        """:meth:`load`, taken up only if it is whole: rounds in [1, ``num_rounds``], one finite stopping
        score per round (``stopping``) or none, and a model that ``model_holds(model, rounds)`` says the
        library reads safely and that holds exactly that many rounds. Anything else is no checkpoint (the
        site resumes from nothing, and says so in the resume agreement).

        The file is the site's own, but its key is no secret (a digest of what the site knows), so an edited
        or damaged file is read as what it is: LightGBM aborts the process on a model text it cannot parse,
        a model of fewer rounds than the file claims would have this site go on from another model than the
        sites it agreed the resume round with (and, as the leader, release it), and missing scores would
        have its stopping rule stop at another round than theirs."""
        saved = self.load()
        if saved is None or not 1 <= saved.rounds <= num_rounds:
            return None
        if len(saved.scores) != (saved.rounds if stopping else 0):
            return None
        if not all(_finite(s) for s in saved.scores):
            return None
        if not model_holds(saved.model, saved.rounds):
            return None
        return Saved(rounds=saved.rounds, model=saved.model, scores=[float(s) for s in saved.scores])

    def save(self, rounds: int, model: str, scores: list[float]) -> None:
        folder = self.path.parent
        if not folder.is_dir():  # the study's folder and the checkpoints folder above it: 0700
            folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.mkdir(mode=0o700, exist_ok=True)
        text = json.dumps({"key": self.key, "rounds": rounds, "model": model, "scores": scores})
        write_private_file(self.path, text.encode())


def _finite(value: object) -> bool:
    """Whether a checkpoint's stopping score is a finite number (an integer too large for a float is not)."""
    if type(value) not in (int, float):
        return False
    try:
        return math.isfinite(value)  # type: ignore[arg-type]
    except OverflowError:
        return False


def agree_resume(session: Any, local_rounds: int, num_rounds: int) -> int:
    """The last round every site completed: one secure sum of "this site has at least k rounds" (k = 1 ..
    ``num_rounds``), so the sum says how many sites reached each round, never which."""
    reached = (np.arange(1, num_rounds + 1) <= local_rounds).astype(np.float64)
    summed = np.asarray(session.secure_sum(reached), dtype=np.float64)
    counts = np.rint(summed).astype(np.int64)
    n = len(session.sites)
    # Each site adds 0 or 1 per round, and one that reached round k reached every round before it: a sum
    # outside [0, n], rising with k, or counting this site where it adds 0 (or not where it adds 1) is a
    # forged result or a lying site. Trusting it would resume from a model this site does not hold.
    if (
        summed.shape != reached.shape
        or not np.array_equal(summed, counts)
        or (counts < 0).any()
        or (counts > n).any()
        or (np.diff(counts) > 0).any()
        or (counts[local_rounds:] > n - 1).any()
        or (counts[:local_rounds] < 1).any()
    ):
        raise SecAggSecurityError("the summed rounds each site checkpointed are not a count of the sites")
    everyone = counts == n
    return int(num_rounds if everyone.all() else np.argmin(everyone))


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

    def checked_sum(self, values: NDArray[Any]) -> NDArray[np.float64]:
        started = time.perf_counter()
        try:
            return self._session.checked_sum(values)
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
    preprocessing: Preprocessing | None,
    native_name: str,
    predict_proba: Any,
    predict: Any = None,
    onnx: Any = None,
) -> ModelExport:
    """A boosting recipe's export: the model (its library's own file, over bin codes) and the binning, as
    tensors, as metadata (``binning``; ``preprocessing``: the study's (raw values), else the sites' own
    standardization, as their connectors did it; ``label``) and as the native file a model package
    holds."""
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
            "preprocessing": preprocessing_metadata(preprocessing),
            "label": {"positive_class": 1, "meaning": label_meaning},
        },
        predict_proba=predict_proba,
        predict=predict,
        onnx=onnx,
        native_file=(native_name, model.encode()),
    )


# --- ONNX ------------------------------------------------------------------------------------------------

ONNX_OPSET = 15  # the newest default-domain opset onnxmltools 1.16's tree converters support


def boosting_onnx(
    converter: str, options: Mapping[str, Any], kind: str, booster: Any, binning: Binning, predict: Any
) -> bytes:
    """The model as one ONNX graph over raw feature rows: the binning (``floor((x - low) / (high - low) *
    grid_cells)`` clipped, then the bin whose first cell the cell reaches, in float64 like
    :meth:`Binning.codes`) in front of onnxmltools' conversion of the trees (``converter``: the name of
    onnxmltools' function for the library, called with ``options``; ``kind``: the objective's kind).

    Input ``features`` float64 (rows, n_features); outputs as onnxmltools gives them: ``label`` and
    ``probabilities`` (rows, classes) for a classifier, ``variable`` (rows, 1) for a regression. Checked
    before it is returned: onnxruntime must agree with ``predict`` to 1e-5 on rows spread over every
    feature's grid, else :class:`RecipeError` (no ONNX file rather than a wrong one)."""
    from fedhealth.learning._errors import RecipeError

    try:
        import onnx
        import onnxmltools
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper
        from onnxmltools.convert.common.data_types import FloatTensorType
    except ImportError as exc:
        raise RecipeError(
            "an ONNX file of a boosting model needs onnx, onnxmltools and onnxruntime: "
            "pip install 'fedhealth[onnx]'"
        ) from exc
    d = len(binning.starts)
    convert = getattr(onnxmltools, converter)
    trees = convert(
        booster, initial_types=[("codes", FloatTensorType([None, d]))], target_opset=ONNX_OPSET, **options
    )
    width = max(binning.num_bins)
    starts = np.full((d, width), np.inf)
    for j, s in enumerate(binning.starts):
        starts[j, : len(s)] = s
    low, high = np.asarray(binning.low), np.asarray(binning.high)
    initializers = [
        numpy_helper.from_array(low, "bin_low"),
        numpy_helper.from_array(high - low, "bin_width"),
        numpy_helper.from_array(np.array(float(binning.grid_cells)), "bin_cells"),
        numpy_helper.from_array(np.array(0.0), "bin_first"),
        numpy_helper.from_array(np.array(float(binning.grid_cells - 1)), "bin_last"),
        numpy_helper.from_array(starts[None, :, :], "bin_starts"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "bin_axis"),
        numpy_helper.from_array(np.array(1.0), "bin_one"),
    ]
    nodes = [
        helper.make_node("Sub", ["features", "bin_low"], ["bin_offset"]),
        helper.make_node("Div", ["bin_offset", "bin_width"], ["bin_share"]),
        helper.make_node("Mul", ["bin_share", "bin_cells"], ["bin_scaled"]),
        helper.make_node("Floor", ["bin_scaled"], ["bin_floor"]),
        helper.make_node("Clip", ["bin_floor", "bin_first", "bin_last"], ["bin_cell"]),
        helper.make_node("Unsqueeze", ["bin_cell", "bin_axis"], ["bin_cell3"]),
        helper.make_node("GreaterOrEqual", ["bin_cell3", "bin_starts"], ["bin_reached"]),
        helper.make_node("Cast", ["bin_reached"], ["bin_reached64"], to=TensorProto.DOUBLE),
        helper.make_node("ReduceSum", ["bin_reached64", "bin_axis"], ["bin_count"], keepdims=0),
        helper.make_node("Sub", ["bin_count", "bin_one"], ["bin_code"]),
        helper.make_node("Cast", ["bin_code"], ["codes"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes + list(trees.graph.node),
        "fedhealth-boosting",
        [helper.make_tensor_value_info("features", TensorProto.DOUBLE, [None, d])],
        list(trees.graph.output),
        initializers + list(trees.graph.initializer),
    )
    opsets = [helper.make_opsetid(o.domain, o.version) for o in trees.opset_import if o.domain != ""]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET), *opsets])
    model.ir_version = trees.ir_version
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    # rows over every feature's grid, each cell's centre: the check covers every bin of every feature
    cells = (np.arange(binning.grid_cells) + 0.5) / binning.grid_cells
    rows = low + np.outer(cells, high - low)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"features": rows})
    got = np.asarray(outputs[-1], dtype=np.float64)
    got = {"binary": got[:, -1], "regression": got.reshape(-1)}.get(kind, got)  # ``kind``: the objective's
    want = np.asarray(predict(rows), dtype=np.float64)
    if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=1e-5):
        raise RecipeError(f"onnxmltools' {converter} of this {kind} model disagrees with the model")
    return data
