"""What the two boosting recipes (``lightgbm``, ``xgboost``) share besides the agreed bins: asking the library
about a study's parameters, timing a site's collective calls, and the shape of their model export."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from pydantic import Field, JsonValue

from fedhealth.data import SchemaError, TabularDataset
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


# --- early stopping on a securely summed validation loss --------------------------------------------------

# The loss each objective stops on: additive over rows, so the sites' (sum, rows) pieces summed securely give
# the pooled mean exactly. AUC is not offered: it needs every pair of rows across sites (docs/boosting.md).
STOPPING_METRIC = {"binary": "binary_logloss", "multiclass": "multi_logloss", "regression": "l2"}
_EPS = 1e-15  # LightGBM's kEpsilon, the clipping of its log losses


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


def require_validation_rows(session: Any, rows: int) -> None:
    """Early stopping needs validation rows somewhere: the sites' counts summed (one secure sum) before
    training; none at all is the study's input error, the same at every site."""
    total = float(session.secure_sum(np.array([rows], dtype=np.float64))[0])
    if total < 1:
        raise SchemaError("early_stopping_rounds needs a validation part: no site has held-out (test) rows")


@dataclass(slots=True)
class EarlyStopping:
    """The libraries' own rule (LightGBM's ``early_stopping`` callback, XGBoost's ``EarlyStopping``, both
    with ``min_delta=0``): an iteration improves when its loss is strictly below the best so far; training
    stops once ``rounds`` iterations in a row did not improve, and the model keeps ``best_iteration``
    iterations (boosting rounds, counted from 1). Every site feeds it the same securely summed losses, so
    every site stops at the same tree."""

    rounds: int
    scores: list[float] = field(default_factory=list)
    best: float = math.inf
    best_iteration: int = 0

    def update(self, loss_sum: float, rows: float) -> bool:
        """Record the next iteration's summed pieces; True when training must stop now."""
        score = loss_sum / rows
        self.scores.append(score)
        if score < self.best:
            self.best, self.best_iteration = score, len(self.scores)
        return len(self.scores) - self.best_iteration >= self.rounds

    def replay(self, scores: list[float]) -> bool:
        """Take up the scores of rounds done in an earlier session; True if the rule had stopped there."""
        stop = False
        for score in scores:
            stop = self.update(score, 1.0)
            if stop:
                break
        return stop


def describe_options(params: Any) -> str:
    """What early stopping and retries add to a boosting recipe's description (what a steward approves)."""
    out = ""
    if params.early_stopping_rounds is not None:
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
    so far (written to a temporary file, then renamed: a crash leaves the previous checkpoint whole). It
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
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            return None
        return Saved(rounds=int(saved["rounds"]), model=str(saved["model"]), scores=list(saved["scores"]))

    def save(self, rounds: int, model: str, scores: list[float]) -> None:
        folder = self.path.parent
        if not folder.is_dir():  # the study's folder and the checkpoints folder above it: 0700
            folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.mkdir(mode=0o700, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"key": self.key, "rounds": rounds, "model": model, "scores": scores}, f)
        os.replace(tmp, self.path)


def agree_resume(session: Any, local_rounds: int, num_rounds: int) -> int:
    """The last round every site completed: one secure sum of "this site has at least k rounds" (k = 1 ..
    ``num_rounds``), so the sum says how many sites reached each round, never which."""
    reached = (np.arange(1, num_rounds + 1) <= local_rounds).astype(np.float64)
    counts = np.rint(session.secure_sum(reached)).astype(np.int64)
    everyone = counts == len(session.sites)
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
    predict: Any = None,
    onnx: Any = None,
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
