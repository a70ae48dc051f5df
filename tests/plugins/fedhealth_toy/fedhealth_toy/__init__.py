"""Third-party recipes as a hospital would write them: nearest class centroid, combined in rounds, and the
pooled feature means, as a collective session (below).

It lives outside fedhealth's source tree and uses only fedhealth's public API. Its distribution metadata
(``fedhealth_toy-0.1.dist-info`` beside this package) registers it under the entry-point group
``fedhealth.recipes``; a folder holding both on ``PYTHONPATH`` is all a process needs to find it
(``pip install`` would write the same two files).

The model is one centroid per class, ``centroid_0`` and ``centroid_1`` (float32, one value per feature). A
site's "training" replaces each centroid by the mean of its training rows of that class, so the server's
sample-weighted mean of the updates moves the global centroids to a pooled mean of the sites' centroids. A
patient is predicted positive when nearer ``centroid_1``.
"""

from __future__ import annotations

import json

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from fedhealth.core import InputError, TensorSpec
from fedhealth.data import TabularDataset
from fedhealth.learning import (
    Collectives,
    CombinationPattern,
    DataSchema,
    DpLevel,
    EvalResult,
    ModelExport,
    RecipeCapabilities,
    RecordDp,
    ReferenceStep,
    SessionContext,
    SiteSessionOutcome,
    TemplateParam,
    TrainResult,
)

Params = dict[str, np.ndarray]


class CentroidParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    n_features: int = Field(ge=1, le=100_000)


def _data(dataset: TabularDataset | None) -> TabularDataset:
    if dataset is None:
        raise InputError("the centroid recipe needs the site's dataset")
    return dataset


def _scores(model: Params, X: np.ndarray) -> np.ndarray:
    """How much nearer each row is to centroid 1 than to centroid 0 (positive: predicted 1)."""
    c0 = model["centroid_0"].astype(np.float64)
    c1 = model["centroid_1"].astype(np.float64)
    return np.sum((X - c0) ** 2, axis=1) - np.sum((X - c1) ** 2, axis=1)


class CentroidRecipe:
    name = "toy-centroid"
    version = "1"
    params_model = CentroidParams
    pattern = CombinationPattern.ROUNDS
    capabilities = RecipeCapabilities(reads_data=True, secure_sum=True)

    def data_schema(self, params: CentroidParams) -> DataSchema:
        return DataSchema(n_features=params.n_features)

    def param_specs(self, params: CentroidParams) -> list[TensorSpec]:
        return [
            TensorSpec(name=f"centroid_{label}", shape=(params.n_features,), dtype="float32")
            for label in (0, 1)
        ]

    def init(self, params: CentroidParams, seed: int) -> Params:
        return {s.name: np.zeros(s.shape, dtype=np.float32) for s in self.param_specs(params)}

    def train(
        self,
        params: CentroidParams,
        model: Params,
        dataset: TabularDataset | None,
        rng: np.random.Generator,
        *,
        record_dp: RecordDp | None = None,
    ) -> TrainResult:
        data = _data(dataset)
        local = {k: np.array(v, dtype=np.float32) for k, v in model.items()}
        for label in (0, 1):
            rows = data.X_train[data.y_train == label]
            if rows.shape[0]:  # a site without a class leaves that centroid where it was
                local[f"centroid_{label}"] = rows.mean(axis=0).astype(np.float32)
        distance = np.sum(
            (data.X_train - np.where(data.y_train[:, None] == 1, local["centroid_1"], local["centroid_0"]))
            ** 2,
            axis=1,
        )
        return TrainResult(
            params=local, num_samples=data.num_train, train_loss=float(distance.mean()), steps=1
        )

    def evaluate(self, params: CentroidParams, model: Params, dataset: TabularDataset | None) -> EvalResult:
        data = _data(dataset)
        scores = _scores(model, data.X_test)
        y = data.y_test
        own = np.where(y[:, None] == 1, model["centroid_1"], model["centroid_0"]).astype(np.float64)
        from sklearn.metrics import roc_auc_score

        return EvalResult(
            num_samples=int(y.shape[0]),
            loss=float(np.sum((data.X_test - own) ** 2, axis=1).mean()),
            accuracy=float(((scores > 0).astype(np.int64) == y).mean()),
            auc=float(roc_auc_score(y, scores)) if np.unique(y).size == 2 else None,
        )

    def describe(self, params: CentroidParams) -> str:
        return f"nearest class centroid on {params.n_features} features (each site sends its class means)"

    def template(self, n_features: int | None) -> list[TemplateParam]:
        width = n_features if n_features is not None else 1
        return [TemplateParam(key="n_features", value=width, comment="the number of feature columns")]

    def reference_step(self) -> ReferenceStep:
        X = np.random.default_rng(0).normal(size=(5000, 30))

        def run() -> None:
            X.mean(axis=0)

        return ReferenceStep(run=run, note="class means of 5000 x 30")

    def dp_problem(self, params: CentroidParams, level: DpLevel) -> str | None:
        return None  # never asked: no DP declared

    def export(self, params: CentroidParams, model: Params) -> ModelExport:
        return ModelExport(
            tensors={k: np.array(v, dtype=np.float32) for k, v in model.items()},
            metadata={"recipe": self.name, "version": self.version, "feature_names": None},
        )


RECIPE = CentroidRecipe()


# --- a collective recipe -----------------------------------------------------------------------------------


class MeanParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    n_features: int = Field(ge=1, le=100_000)


class FeatureMeanRecipe:
    """The pooled mean of every feature over the sites' training rows, as one collective session: each site
    secure-sums its per-feature sums and its row count, and the leader broadcasts the means (the only thing
    released). Combined as a collective session, not in rounds."""

    name = "toy-mean"
    version = "1"
    params_model = MeanParams
    pattern = CombinationPattern.COLLECTIVE
    capabilities = RecipeCapabilities(reads_data=True)

    def data_schema(self, params: MeanParams) -> DataSchema:
        return DataSchema(n_features=params.n_features)

    def describe(self, params: MeanParams) -> str:
        return f"the pooled mean of {params.n_features} features (each site sends masked sums and its count)"

    def template(self, n_features: int | None) -> list[TemplateParam]:
        return [TemplateParam(key="n_features", value=n_features or 30, comment="the dataset's width")]

    def reference_step(self) -> ReferenceStep:
        X = np.random.default_rng(0).normal(size=(5000, 30))

        def run() -> None:
            X.sum(axis=0)

        return ReferenceStep(run=run, note="column sums of 5000 x 30")

    def run_site(
        self, params: MeanParams, dataset: TabularDataset | None, session: Collectives, ctx: SessionContext
    ) -> SiteSessionOutcome:
        X = _data(dataset).X_train.astype(np.float64)
        totals = session.secure_sum(np.concatenate([X.sum(axis=0), [X.shape[0]]]))
        means = (totals[:-1] / totals[-1]).tolist()
        leader = session.site == session.sites[0]
        session.broadcast(json.dumps({"means": means, "rows": int(totals[-1])}).encode() if leader else None)
        return SiteSessionOutcome(record={"rows_here": int(X.shape[0])})

    def finish(self, params: MeanParams, released: bytes) -> dict[str, JsonValue]:
        result = json.loads(released)
        if not isinstance(result, dict) or len(result.get("means", ())) != params.n_features:
            raise ValueError("the released means do not match the study's features")
        return result


MEAN_RECIPE = FeatureMeanRecipe()
