"""Logistic regression as a recipe plug-in (``logreg``, version 1), DP logistic regression included.

The numerics are :mod:`fedhealth.learning._logreg` (SGD/Adam, L2, FedProx) and
:mod:`fedhealth.learning._logreg_dp` (DP-SGD with exact per-example gradients); this module only maps a
study's ``recipe.params`` onto them. Record-level DP is this recipe's ``train`` under :class:`RecordDp`
(plain DP-SGD: optimizer ``sgd``, no proximal term); site-level DP needs nothing of it (the runtime clips and
noises the update), so both are declared in its capabilities.

``preprocessing`` (optional, :mod:`fedhealth.learning._preprocessing`) fixes how every site scales its
features (the spec's federation-wide mean and scale, one a secure-sum pre-step computes, or none); a spec
without it trains exactly as before (each site's own standardization), bit for bit. Its export can be
written as a model package with an ONNX file (``fedhealth model export``).
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from fedhealth.core import ConfigError, DatasetError, TensorSpec
from fedhealth.data import TabularDataset
from fedhealth.learning._config import LocalOptimizer, LogRegConfig
from fedhealth.learning._logreg import (
    logreg_evaluate,
    logreg_init,
    logreg_param_specs,
    logreg_predict_proba,
    logreg_train,
)
from fedhealth.learning._logreg_dp import logreg_train_dp
from fedhealth.learning._preprocessing import (
    Preprocessing,
    StandardizeMode,
    preprocessing_metadata,
)
from fedhealth.learning._recipe import (
    CombinationPattern,
    DataSchema,
    DpLevel,
    ModelExport,
    Params,
    RecipeCapabilities,
    RecordDp,
    ReferenceStep,
    TemplateParam,
)
from fedhealth.learning._results import EvalResult, TrainResult

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
FeatureName = Annotated[str, Field(min_length=1, max_length=200)]


class LogRegParams(BaseModel):
    """``recipe.params`` of ``logreg``: what each site trains and how (see :class:`LogRegConfig`).

    ``feature_names``, when given, are the features in input order: every site's dataset must declare exactly
    these (checked before training), and the exported model carries them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_features: int = Field(ge=1, le=1_000_000, description="input width")
    local_epochs: int = Field(default=1, ge=0, le=10_000)
    local_steps: int | None = Field(
        default=None, ge=1, le=1_000_000, description="if set, a fixed number of minibatch steps per round"
    )
    learning_rate: FiniteFloat = Field(default=0.05, gt=0, le=100)
    batch_size: int = Field(default=16, ge=1, le=1_000_000)
    optimizer: LocalOptimizer = LocalOptimizer.SGD
    l2: FiniteFloat = Field(default=0.0, ge=0, le=100)
    proximal_mu: FiniteFloat = Field(default=0.0, ge=0, le=100, description="FedProx proximal weight")
    feature_names: tuple[FeatureName, ...] | None = Field(
        default=None, description="the features in input order; every site's dataset must declare them"
    )
    preprocessing: Preprocessing | None = Field(
        default=None,
        description="how every site scales its features (default: each with its own statistics)",
    )
    label_meaning: str | None = Field(
        default=None, min_length=1, max_length=500, description="what label 1 means, for the model package"
    )

    @model_validator(mode="after")
    def _names_fit(self) -> LogRegParams:
        if self.feature_names is not None:
            if len(self.feature_names) != self.n_features:
                raise ValueError(
                    f"feature_names names {len(self.feature_names)} features, n_features is {self.n_features}"
                )
            if len(set(self.feature_names)) != len(self.feature_names):
                raise ValueError("feature_names must be unique")
        if self.preprocessing is not None:
            problem = self.preprocessing.problem(self.feature_names, self.n_features)
            if problem is not None:
                raise ValueError(problem)
        return self

    def config(self) -> LogRegConfig:
        """The learning layer's settings for one round of local training."""
        return LogRegConfig(
            n_features=self.n_features,
            local_epochs=self.local_epochs,
            local_steps=self.local_steps,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            l2=self.l2,
            proximal_mu=self.proximal_mu,
        )

    @classmethod
    def from_config(cls, config: LogRegConfig, feature_names: tuple[str, ...] | None = None) -> LogRegParams:
        """The params of a learning-layer configuration (e.g. a benchmark preset's)."""
        return cls(
            n_features=config.n_features,
            local_epochs=config.local_epochs,
            local_steps=config.local_steps,
            learning_rate=config.learning_rate,
            batch_size=config.batch_size,
            optimizer=config.optimizer,
            l2=config.l2,
            proximal_mu=config.proximal_mu,
            feature_names=feature_names,
        )


def _rows(dataset: TabularDataset | None) -> TabularDataset:
    if dataset is None:
        raise DatasetError("logistic regression needs the site's dataset")
    return dataset


def _features(params: LogRegParams, dataset: TabularDataset, X: np.ndarray) -> np.ndarray:
    """``X`` (rows of ``dataset``) as the study's preprocessing wants them; as given without one."""
    if params.preprocessing is None:
        return X
    return params.preprocessing.apply(dataset, X)


def logreg_onnx(
    weight: np.ndarray, bias: np.ndarray, preprocessing: Preprocessing | None, feature_names: list[str] | None
) -> bytes:
    """An ONNX graph computing P(label = 1) from the features in input order (float64, shape (rows,
    n_features)): ``sigmoid(((x - mean) / scale) . weight + bias)``, the standardization only when the
    preprocessing gives it. Output ``probability``, shape (rows,)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise ConfigError(
            "writing an ONNX file needs the onnx package: pip install 'fedhealth[onnx]'"
        ) from exc
    n = int(weight.shape[0])
    initializers = [
        numpy_helper.from_array(np.asarray(weight, dtype=np.float64).reshape(n, 1), "weight"),
        numpy_helper.from_array(np.asarray(bias, dtype=np.float64).reshape(1), "bias"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
    ]
    nodes = []
    current = "features"
    if preprocessing is not None and preprocessing.standardize is not StandardizeMode.NONE:
        if preprocessing.mean is None or preprocessing.scale is None:
            raise ConfigError("standardize = 'federated': no released scaling to write into the ONNX file")
        initializers += [
            numpy_helper.from_array(np.asarray(preprocessing.mean, dtype=np.float64), "mean"),
            numpy_helper.from_array(np.asarray(preprocessing.scale, dtype=np.float64), "scale"),
        ]
        nodes += [
            helper.make_node("Sub", ["features", "mean"], ["centered"]),
            helper.make_node("Div", ["centered", "scale"], ["standardized"]),
        ]
        current = "standardized"
    nodes += [
        helper.make_node("MatMul", [current, "weight"], ["dot"]),
        helper.make_node("Add", ["dot", "bias"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["column"]),
        helper.make_node("Reshape", ["column", "flat"], ["probability"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fedhealth_logreg",
        [helper.make_tensor_value_info("features", TensorProto.DOUBLE, ["rows", n])],
        [helper.make_tensor_value_info("probability", TensorProto.DOUBLE, ["rows"])],
        initializer=initializers,
    )
    # opset 17 and IR 8: what every onnxruntime of the last years runs
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name="fedhealth"
    )
    if feature_names is not None:
        helper.set_model_props(model, {"feature_names": json.dumps(feature_names)})
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString(deterministic=True))


class LogRegRecipe:
    """Binary logistic regression in numpy: ``{"weight": (n_features,), "bias": (1,)}`` float32."""

    name: Literal["logreg"] = "logreg"
    version: Literal["1"] = "1"
    params_model = LogRegParams
    pattern = CombinationPattern.ROUNDS
    capabilities = RecipeCapabilities(
        reads_data=True,
        record_dp=True,
        site_dp=True,
        secure_sum=True,
        export_onnx=True,
        federated_scaling=True,
    )

    def data_schema(self, params: LogRegParams) -> DataSchema:
        return DataSchema(n_features=params.n_features, feature_names=params.feature_names)

    def param_specs(self, params: LogRegParams) -> list[TensorSpec]:
        return logreg_param_specs(params.n_features)

    def init(self, params: LogRegParams, seed: int) -> Params:
        return logreg_init(params.n_features, seed)

    def train(
        self,
        params: LogRegParams,
        model: Params,
        dataset: TabularDataset | None,
        rng: np.random.Generator,
        *,
        record_dp: RecordDp | None = None,
    ) -> TrainResult:
        data = _rows(dataset)
        X_train = _features(params, data, data.X_train)
        if record_dp is None:
            return logreg_train(model, X_train, data.y_train, params.config(), rng)
        local, _ = logreg_train_dp(
            model,
            X_train,
            data.y_train,
            noise_multiplier=record_dp.noise_multiplier,
            max_grad_norm=record_dp.max_grad_norm,
            sample_rate=record_dp.sample_rate,
            steps=record_dp.steps,
            learning_rate=params.learning_rate,
            l2=params.l2,
            rng=rng,
        )
        return TrainResult(
            params=dict(local), num_samples=data.num_train, train_loss=None, steps=record_dp.steps
        )

    def evaluate(self, params: LogRegParams, model: Params, dataset: TabularDataset | None) -> EvalResult:
        data = _rows(dataset)
        return logreg_evaluate(model, _features(params, data, data.X_test), data.y_test)

    def dp_problem(self, params: LogRegParams, level: DpLevel) -> str | None:
        plain_sgd = params.optimizer is LocalOptimizer.SGD and params.proximal_mu == 0
        if level is DpLevel.RECORD and not plain_sgd:
            return (
                "record-level DP trains with plain DP-SGD: the recipe's optimizer must be 'sgd' and "
                "proximal_mu 0"
            )
        return None

    def describe(self, params: LogRegParams) -> str:
        steps = f"{params.local_steps} step(s)" if params.local_steps else f"{params.local_epochs} epoch(s)"
        prox = f", FedProx weight {params.proximal_mu:g}" if params.proximal_mu else ""
        scaled = f"; {params.preprocessing.describe()}" if params.preprocessing is not None else ""
        return (
            f"logistic regression on {params.n_features} features ({params.n_features + 1} parameters); "
            f"{steps} of {params.optimizer.value} per round at learning rate {params.learning_rate:g}, "
            f"batch size {params.batch_size}, L2 {params.l2:g}{prox}{scaled}"
        )

    def template(self, n_features: int | None) -> list[TemplateParam]:
        width_note = "the number of feature columns (`fedhealth site dataset list` at a site shows it)"
        return [
            TemplateParam(
                key="n_features",
                value=n_features if n_features is not None else 1,
                comment=width_note if n_features is not None else "SET THIS: " + width_note,
            ),
            TemplateParam(key="local_epochs", value=1, comment="passes over the local data per round"),
            TemplateParam(key="learning_rate", value=0.05, comment="step size of local training"),
            TemplateParam(key="batch_size", value=16, comment="rows per minibatch"),
            TemplateParam(key="optimizer", value="sgd", comment="sgd or adam (DP-SGD needs sgd)"),
            TemplateParam(key="l2", value=0.0, comment="weight decay"),
        ]

    def reference_step(self) -> ReferenceStep:
        rng = np.random.default_rng(0)
        X = rng.normal(size=(5000, 30))
        y = (rng.random(5000) < 0.5).astype(np.int64)
        config = LogRegConfig(n_features=30, local_epochs=1, batch_size=32)

        def run() -> None:
            logreg_train(logreg_init(30, 0), X, y, config, np.random.default_rng(0))

        return ReferenceStep(run=run, note="one epoch, 5000 x 30")

    def export(self, params: LogRegParams, model: Params) -> ModelExport:
        specs = self.param_specs(params)
        tensors = {s.name: np.array(model[s.name], dtype=np.float32) for s in specs}
        names = list(params.feature_names) if params.feature_names is not None else None
        metadata: dict[str, JsonValue] = {
            "recipe": self.name,
            "version": self.version,
            "feature_names": list(names) if names is not None else None,
            "n_features": params.n_features,
            "output": "P(label = 1) = sigmoid(features . weight + bias), features after preprocessing",
            "preprocessing": preprocessing_metadata(params.preprocessing),
            "label": {"positive_class": 1, "meaning": params.label_meaning},
        }

        def predict_proba(X: np.ndarray) -> np.ndarray:
            return logreg_predict_proba(tensors, X)

        def onnx() -> bytes:
            return logreg_onnx(tensors["weight"], tensors["bias"], params.preprocessing, names)

        # a model trained on per-site scaling has no one scaling an ONNX graph could hold (nor a federated
        # one whose pre-step's release is not filled in)
        known_scaling = params.preprocessing is not None and (
            params.preprocessing.standardize is StandardizeMode.NONE or params.preprocessing.mean is not None
        )
        return ModelExport(
            tensors=tensors,
            metadata=metadata,
            predict_proba=predict_proba,
            onnx=onnx if known_scaling else None,
        )


LOGREG_RECIPE = LogRegRecipe()
