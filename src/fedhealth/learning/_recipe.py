"""The recipe plug-in seam: what a model recipe declares and does, whoever wrote it.

A recipe is registered by name and version through the entry-point group ``fedhealth.recipes``
(:mod:`fedhealth.learning._registry`); a study spec names it as ``recipe: {name, version, params}`` and the
recipe validates ``params`` with its own pydantic model. Whatever the services need to know about a recipe
they ask it: the tensors of its model, whether it reads data at all, which privacy and secure-sum hooks it
implements (declared in :class:`RecipeCapabilities`, never guessed from its name), what a site's dataset
must look like (:class:`DataSchema`, checked before any training).

Two combination patterns (DESIGN.md):

- ``ROUNDS`` (:class:`RoundsRecipe`): each round a site trains from the global model and returns its local
  model; fedhealth.runtime takes the sample-weighted mean of the updates (local - global) and applies the
  study's server strategy. The recipe only initializes, trains, evaluates and exports.
- ``COLLECTIVE`` (:class:`CollectiveRecipe`): a site runs the recipe's program once, inside a session of
  collectives (:class:`~fedhealth.learning.Collectives`: secure sum, broadcast, barrier), and the orchestrator
  turns what the session released into the study's result with ``finish``.

Privacy hooks: record-level DP (DP-SGD) happens inside ``train``, which then gets :class:`RecordDp` settings
and a generator the runtime chose (a cryptographically secure one in production); site-level DP (clip the
whole update, add Gaussian noise to the sum) happens outside the recipe, in fedhealth.runtime, for recipes
that declare ``site_dp``. A recipe without a capability is never asked to do that thing: the orchestrator
refuses such a study at submission and every site before it reads data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, JsonValue

from fedhealth.core import TensorSpec
from fedhealth.data import SchemaError, TabularDataset
from fedhealth.learning._collectives import Collectives
from fedhealth.learning._results import EvalResult, TrainResult
from fedhealth.privacy import DpPlan, RandomSource

Params = dict[str, np.ndarray]
P = TypeVar("P", bound=BaseModel)


class CombinationPattern(StrEnum):
    """How the sites' work becomes the study's result (DESIGN.md's two interaction patterns)."""

    ROUNDS = "rounds"  # weighted mean of the sites' updates, then the server strategy, round after round
    COLLECTIVE = "collective"  # one session of synchronous collectives (secure sum, broadcast, barrier)


class DpLevel(StrEnum):
    """Whom a differential-privacy guarantee protects."""

    RECORD = "record"  # each patient: DP-SGD inside the recipe's training
    SITE = "site"  # each site's whole contribution: the runtime clips and noises the update


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipeCapabilities:
    """What a recipe declares it does; the services ask these, never the recipe's name.

    ``reads_data``: a site opens its dataset for it (False: a data-free benchmark model; no consent, cohort
    or budget applies, since nothing about a patient is computed). ``record_dp``: ``train`` implements DP-SGD
    when given :class:`RecordDp`. ``site_dp``: its update is a plain float vector the runtime may clip and
    noise as a whole. ``secure_sum``: its update may travel inside a SecAgg+ secure sum (a fixed-size float
    vector whose mean is the update's meaning). ``export_onnx``: its export can become an ONNX file.
    ``federated_scaling``: a rounds recipe whose params take ``preprocessing`` with ``standardize =
    "federated"`` (the study then runs the secure-sum scaling pre-step before round 1, and the recipe's
    params get the released mean and scale filled in).
    ``session_dp``: a collective recipe that adds noise in its session and declares what it releases about a
    site's records with ``dp_plan(params) -> DpPlan`` (the site's ledger charges it before any data is read).
    ``site_state``: a rounds recipe whose ``train`` takes, as ``site_state``, what its previous round at this
    site returned in :attr:`TrainResult.site_state` (None on a site's first round of a study); the runtime
    keeps it at the site, per study (SCAFFOLD's client control variate c_i).
    """

    reads_data: bool = True
    record_dp: bool = False
    site_dp: bool = False
    secure_sum: bool = False
    export_onnx: bool = False
    session_dp: bool = False
    federated_scaling: bool = False
    site_state: bool = False

    def supports(self, level: DpLevel) -> bool:
        return self.record_dp if level is DpLevel.RECORD else self.site_dp


@dataclass(frozen=True, slots=True, kw_only=True)
class DataSchema:
    """What a site's dataset must look like for a study's recipe; the site checks it before training.

    ``n_features``: the width of the feature matrix (None: any). ``feature_names``: the features in this
    order, when the study declares them (None: names are not checked). ``classes``: the label classes the
    site's dataset must declare (2: a binary label, what every recipe but multiclass boosting takes; None:
    any, for a regression on the label's values).
    """

    n_features: int | None = None
    feature_names: tuple[str, ...] | None = None
    classes: int | None = 2

    def problem(self, dataset: TabularDataset) -> str | None:
        """Why ``dataset`` does not fit, in words that name no value of it; None if it fits."""
        if self.classes is not None and dataset.classes != self.classes:
            return (
                f"dataset {dataset.name!r} declares {dataset.classes} label classes; the study's model is "
                f"for {self.classes}" + (" (a binary label)" if self.classes == 2 else "")
            )
        width = dataset.X_train.shape[1]
        if self.n_features is not None and width != self.n_features:
            return (
                f"dataset {dataset.name!r} has {width} features; the study's model expects {self.n_features}"
            )
        if self.feature_names is not None:
            names = tuple(dataset.feature_names)
            if len(names) != len(self.feature_names):
                return (
                    f"dataset {dataset.name!r} declares {len(names)} features; the study names "
                    f"{len(self.feature_names)}"
                )
            for i, (have, want) in enumerate(zip(names, self.feature_names, strict=True)):
                if have != want:
                    return f"dataset {dataset.name!r}: feature {i} is {have!r}; the study expects {want!r}"
        return None

    def check(self, dataset: TabularDataset) -> None:
        """Raise :class:`~fedhealth.data.SchemaError` if ``dataset`` does not fit."""
        problem = self.problem(dataset)
        if problem is not None:
            raise SchemaError(problem)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordDp:
    """Record-level DP for one round at one site, as the study spec and the site's sampling rate fix it:
    ``steps`` DP-SGD steps, each a Poisson sample at ``sample_rate``, per-example gradients clipped to
    ``max_grad_norm``, Gaussian noise of ``noise_multiplier * max_grad_norm`` on their sum. The site's
    ledger pays exactly this release, so a recipe must run it as stated."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelExport:
    """A trained model as a recipe hands it out: its tensors, and metadata that says how to use them (at
    least ``recipe``, ``version`` and ``feature_names``, the features in input order, or None when the study
    did not name them). Model packages (fedhealth.learning's ``write_package``) are built on top of this.

    A recipe whose model can be applied outside fedhealth also gives, in ``metadata``: ``preprocessing``
    (see :func:`~fedhealth.learning.preprocessing_metadata`: how raw columns become its features) and
    ``label`` (``positive_class`` and what it means); and ``predict_proba``, P(label = 1) for each row of
    a feature matrix in ``feature_names`` order, after that preprocessing (float64). ``onnx``, for a recipe
    declaring ``export_onnx``, builds the same model, preprocessing's standardization included, as an ONNX
    file (the ``onnx`` package is imported only then). ``native_file``, for a model that is its library's
    own file (a collective recipe's trees), is that file's name and bytes: a model package holds it.
    ``predict``, for a model that is not a binary classifier (multiclass, regression), is its output for
    each row (class probabilities, rows x classes; or the predicted value), in the place of
    ``predict_proba``."""

    tensors: Params
    metadata: Mapping[str, JsonValue]
    predict_proba: Callable[[np.ndarray], np.ndarray] | None = None
    predict: Callable[[np.ndarray], np.ndarray] | None = None
    onnx: Callable[[], bytes] | None = None
    native_file: tuple[str, bytes] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TemplateParam:
    """One line of a study-spec template's ``[recipe.params]``: key, a starting value, and a comment that
    says what to put there (``fedhealth study init``)."""

    key: str
    value: JsonValue
    comment: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReferenceStep:
    """A recipe's timed reference work for ``fedhealth site check``: ``run`` does a round's work on a fixed,
    data-free reference size that ``note`` names (e.g. "one epoch, 5000 x 30")."""

    run: Callable[[], None]
    note: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionContext:
    """What a collective recipe's site program knows besides its data and session: the site, the study
    seed, and a generator determined by (seed, session, site) for the program's own random choices.
    ``noise`` is the generator for differential-privacy noise (a cryptographically secure one unless the
    site runs with reproducible noise for tests); None where the runtime gives none. ``checkpoints`` is a
    directory in the site's own home for this study (the recipe creates it, 0700, when it first writes; it
    is kept across the study's sessions, so that a retried session can resume from what an earlier one
    completed); None where there is none."""

    site: str
    seed: int
    rng: np.random.Generator
    noise: RandomSource | None = None
    checkpoints: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteSessionOutcome:
    """What a site keeps of its part in a collective session (written to the site's own results, never
    sent: whatever is released travels only through the session's collectives)."""

    record: Mapping[str, JsonValue]


class Recipe(Protocol[P]):
    """What every recipe declares. ``name`` and ``version`` are what a study spec names (lowercase
    ``[a-z0-9][a-z0-9_.-]*``; versions ``[0-9A-Za-z][0-9A-Za-z._+-]*``); ``params_model`` validates the
    spec's ``recipe.params`` (it should forbid unknown fields, so that a typo is an error, not a silently
    ignored setting)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def params_model(self) -> type[P]: ...
    @property
    def pattern(self) -> CombinationPattern: ...
    @property
    def capabilities(self) -> RecipeCapabilities: ...
    def data_schema(self, params: P) -> DataSchema:
        """What a site's dataset must look like (ignored when ``capabilities.reads_data`` is False)."""
        ...

    def describe(self, params: P) -> str:
        """What a site computes, in a sentence a data steward reads before approving (``site approvals
        show``): the model and how each site trains it, in plain words."""
        ...

    def template(self, n_features: int | None) -> list[TemplateParam]:
        """The ``[recipe.params]`` a new study spec starts from (``fedhealth study init``); ``n_features``
        is the dataset's width when the researcher gave it."""
        ...

    def reference_step(self) -> ReferenceStep:
        """Data-free reference work that ``fedhealth site check`` times on a site's machine."""
        ...


class RoundsRecipe(Recipe[P], Protocol[P]):
    """A recipe combined in rounds: the runtime averages the sites' updates and applies the server strategy.

    Every method is a pure function of its arguments (and ``rng``'s stream), so a task rerun after a crash
    gives the same bytes, and the orchestrator and an in-memory run compute the same models.

    Optional: ``averaged_tensors(params) -> Collection[str]`` names tensors that are statistics of the data
    rather than trained parameters (BatchNorm's running mean and variance); the server takes their plain
    weighted mean under every strategy, and adaptive strategies keep no state for them.
    ``control_variate_tensors(params) -> Collection[str]`` names the tensors that hold SCAFFOLD's server
    control variate c: the study's strategy must then be ``scaffold``, which moves them by |S|/N times their
    mean update (a recipe declaring them declares ``site_state`` too, for the sites' c_i).
    """

    def param_specs(self, params: P) -> list[TensorSpec]:
        """The model's tensors, sorted by name: every model and update is checked against them."""
        ...

    def init(self, params: P, seed: int) -> Params:
        """The first global model (float32 tensors of ``param_specs``), determined by ``seed``."""
        ...

    def train(
        self,
        params: P,
        model: Params,
        dataset: TabularDataset | None,
        rng: np.random.Generator,
        *,
        record_dp: RecordDp | None = None,
        site_state: Params | None = None,
    ) -> TrainResult:
        """One round of local training from the global ``model`` on the dataset's training rows; returns the
        local model (float32). All randomness comes from ``rng``. With ``record_dp`` (only if the recipe
        declares ``record_dp``) it runs exactly that DP-SGD release, ``rng`` drawing samples and noise, and
        reports no training loss (``train_loss`` None: a loss computed without noise is not private).
        ``site_state`` is passed only to a recipe declaring ``site_state`` (see
        :class:`RecipeCapabilities`)."""
        ...

    def evaluate(self, params: P, model: Params, dataset: TabularDataset | None) -> EvalResult | None:
        """Metrics of ``model`` on the dataset's held-out rows; None when the recipe has nothing to report."""
        ...

    def dp_problem(self, params: P, level: DpLevel) -> str | None:
        """Why these params cannot run under DP at ``level`` although the recipe supports that level (e.g.
        DP-SGD needs plain SGD), or None. Asked only for a level the capabilities declare."""
        ...

    def export(self, params: P, model: Params) -> ModelExport:
        """The trained model as tensors plus metadata (see :class:`ModelExport`)."""
        ...


class CollectiveRecipe(Recipe[P], Protocol[P]):
    """A recipe run as one session of collectives (notes/collective-api.md). The session itself (masking,
    transport, who leads) belongs to fedhealth.runtime and the services; the recipe only programs it."""

    def run_site(
        self, params: P, dataset: TabularDataset | None, session: Collectives, ctx: SessionContext
    ) -> SiteSessionOutcome:
        """The site's program: computes on its data and calls the session's collectives; whatever it
        releases goes through them (the leader broadcasts the result, or the last secure sum carries it)."""
        ...

    def finish(self, params: P, released: bytes) -> dict[str, JsonValue]:
        """At the orchestrator: the session's public result (e.g. statistics as JSON) from what the session
        released."""
        ...


class SessionDpRecipe(CollectiveRecipe[P], Protocol[P]):
    """A collective recipe that declares ``session_dp``: its session adds noise, and it says what one
    session releases about a site's records, which the site's ledger charges."""

    def dp_plan(self, params: P) -> DpPlan:
        """The releases of one session at one site (an empty plan: nothing noised, epsilon infinite)."""
        ...
