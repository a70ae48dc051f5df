"""A data-free model of any size, for transport and secure-aggregation benchmarks.

"Training" adds a small random change, so the delta has the size and the statistics of a real update while
costing almost nothing to compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedhealth.core import InputError, TensorSpec
from fedhealth.data import TabularDataset
from fedhealth.learning._checks import check_tensors
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
from fedhealth.learning._results import TrainResult

# the scale of a synthetic update: about the size of one SGD round's change of a small model
SYNTHETIC_STEP_SCALE = 1e-3


def synthetic_init(n_params: int, seed: int) -> dict[str, np.ndarray]:
    """``{"weight": (n_params,)}`` float32, standard normal times 0.01, determined by ``seed``."""
    if n_params < 1:
        raise InputError(f"n_params must be positive, got {n_params}")
    rng = np.random.default_rng(seed)
    return {"weight": (rng.standard_normal(n_params, dtype=np.float32) * np.float32(0.01))}


def synthetic_train(
    params: Mapping[str, np.ndarray], rng: np.random.Generator, *, num_samples: int = 1
) -> TrainResult:
    """Local "training": ``weight + N(0, SYNTHETIC_STEP_SCALE^2)``, in float32 (the point is speed)."""
    weight = params.get("weight")
    if weight is None or not isinstance(weight, np.ndarray) or weight.ndim != 1:
        raise InputError("synthetic params must be {'weight': 1-D array}")
    check_tensors("synthetic params", params, {"weight": weight.shape})
    local: np.ndarray = np.asarray(rng.standard_normal(weight.shape[0], dtype=np.float32))
    local *= np.float32(SYNTHETIC_STEP_SCALE)
    local += weight.astype(np.float32, copy=False)
    return TrainResult(params={"weight": local}, num_samples=num_samples, train_loss=0.0, steps=1)


class SyntheticParams(BaseModel):
    """``recipe.params`` of ``synthetic``: the model's size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_params: int = Field(ge=1, le=100_000_000, description="float32 numbers in the model")


class SyntheticRecipe:
    """A data-free model of any size for transport and secure-aggregation benchmarks (``synthetic``,
    version 1): it reads no data, so no consent, cohort or privacy budget applies, and no DP is offered."""

    name: Literal["synthetic"] = "synthetic"
    version: Literal["1"] = "1"
    params_model = SyntheticParams
    pattern = CombinationPattern.ROUNDS
    capabilities = RecipeCapabilities(reads_data=False, secure_sum=True)

    def data_schema(self, params: SyntheticParams) -> DataSchema:
        return DataSchema(classes=None)  # reads no data: any dataset, any label

    def param_specs(self, params: SyntheticParams) -> list[TensorSpec]:
        return [TensorSpec(name="weight", shape=(params.n_params,), dtype="float32")]

    def init(self, params: SyntheticParams, seed: int) -> Params:
        return synthetic_init(params.n_params, seed)

    def train(
        self,
        params: SyntheticParams,
        model: Params,
        dataset: TabularDataset | None,
        rng: np.random.Generator,
        *,
        record_dp: RecordDp | None = None,
    ) -> TrainResult:
        if record_dp is not None:
            raise InputError("the synthetic recipe does not implement record-level DP")
        return synthetic_train(model, rng)

    def evaluate(self, params: SyntheticParams, model: Params, dataset: TabularDataset | None) -> None:
        return None  # nothing to evaluate on: the model means nothing

    def dp_problem(self, params: SyntheticParams, level: DpLevel) -> str | None:
        return None  # never asked: the capabilities declare no DP

    def describe(self, params: SyntheticParams) -> str:
        return f"a synthetic benchmark model of {params.n_params} parameters that reads no data"

    def template(self, n_features: int | None) -> list[TemplateParam]:
        return [TemplateParam(key="n_params", value=1000, comment="the model's size (it reads no data)")]

    def reference_step(self) -> ReferenceStep:
        model = synthetic_init(1_000_000, 0)

        def run() -> None:
            synthetic_train(model, np.random.default_rng(0))

        return ReferenceStep(run=run, note="one step, 1e6 parameters")

    def export(self, params: SyntheticParams, model: Params) -> ModelExport:
        tensors = {"weight": np.array(model["weight"], dtype=np.float32)}
        return ModelExport(
            tensors=tensors, metadata={"recipe": self.name, "version": self.version, "feature_names": None}
        )


SYNTHETIC_RECIPE = SyntheticRecipe()
