"""Wire messages between agent, operator and orchestrator. Version 1.

Every message is a frozen pydantic model that forbids unknown fields, so a typo in a request is a 422 with a
message, never a silently ignored setting.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PROTOCOL_VERSION = 1

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$", description="lowercase name")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- study specification ----------------------------------------------------------------------------------


class RecipeName(StrEnum):
    LOGREG = "logreg"
    SYNTHETIC = "synthetic"  # no data: a fixed-size model whose "training" is cheap; for transport benchmarks


class LocalOptimizer(StrEnum):
    SGD = "sgd"
    ADAM = "adam"


class StrategyName(StrEnum):
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"


class RecipeSpec(Message):
    """What each site trains and how."""

    name: RecipeName = RecipeName.LOGREG
    n_features: int | None = Field(default=None, ge=1, le=1_000_000, description="logreg input width")
    n_params: int | None = Field(default=None, ge=1, le=100_000_000, description="synthetic model size")
    local_epochs: int = Field(default=1, ge=0, le=10_000)
    local_steps: int | None = Field(
        default=None, ge=1, le=1_000_000, description="if set, a fixed number of minibatch steps per round"
    )
    learning_rate: FiniteFloat = Field(default=0.05, gt=0, le=100)
    batch_size: int = Field(default=16, ge=1, le=1_000_000)
    optimizer: LocalOptimizer = LocalOptimizer.SGD
    l2: FiniteFloat = Field(default=0.0, ge=0, le=100)
    proximal_mu: FiniteFloat = Field(default=0.0, ge=0, le=100, description="FedProx proximal weight")

    @model_validator(mode="after")
    def _shape_given(self) -> RecipeSpec:
        if self.name is RecipeName.LOGREG and self.n_features is None:
            raise ValueError("recipe 'logreg' needs n_features")
        if self.name is RecipeName.SYNTHETIC and self.n_params is None:
            raise ValueError("recipe 'synthetic' needs n_params")
        return self


class StrategySpec(Message):
    """How the orchestrator turns the sites' updates into the next global model."""

    name: StrategyName = StrategyName.FEDAVG
    server_learning_rate: FiniteFloat = Field(default=1.0, gt=0, le=1000)
    beta1: FiniteFloat = Field(default=0.9, ge=0, lt=1)
    beta2: FiniteFloat = Field(default=0.99, ge=0, lt=1)
    tau: FiniteFloat = Field(
        default=1e-3, gt=0, le=10, description="adaptivity (epsilon) of FedAdam/Yogi/Adagrad"
    )


class StudySpec(Message):
    """A study as its owner submits it."""

    name: Name
    owner: Name = "admin"
    dataset: Name = Field(description="the dataset name each site has registered locally")
    recipe: RecipeSpec
    strategy: StrategySpec = StrategySpec()
    rounds: int = Field(ge=1, le=100_000)
    train_sites: list[Name] = Field(min_length=1, max_length=10_000)
    eval_sites: list[Name] | None = Field(
        default=None, description="sites that evaluate the final model; default: the training sites"
    )
    min_sites: int = Field(default=1, ge=1, description="quorum: updates needed for a round to count")
    round_deadline_s: FiniteFloat = Field(default=300.0, gt=0, le=7 * 24 * 3600)
    seed: int = Field(default=0, ge=0, lt=2**32)

    @field_validator("train_sites", "eval_sites")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("site names must be unique")
        return v

    @model_validator(mode="after")
    def _quorum_possible(self) -> StudySpec:
        if self.min_sites > len(self.train_sites):
            raise ValueError(f"min_sites={self.min_sites} exceeds the {len(self.train_sites)} training sites")
        return self

    @property
    def evaluation_sites(self) -> list[str]:
        return self.eval_sites if self.eval_sites is not None else self.train_sites


# --- operator API -----------------------------------------------------------------------------------------


class SiteCreate(Message):
    name: Name


class SiteInfo(Message):
    name: str
    status: str = Field(description="pending (not enrolled yet), active or revoked")
    created_at: datetime
    last_seen_at: datetime | None
    enrolled_at: datetime | None = None
    revoked_at: datetime | None = None


class StudyStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RoundStatus(StrEnum):
    OPEN = "open"
    COMPLETED = "completed"
    FAILED = "failed"


class TaskKind(StrEnum):
    TRAIN = "train"
    EVALUATE = "evaluate"


class TaskStatus(StrEnum):
    PENDING = "pending"  # created, not yet fetched
    DELIVERED = "delivered"  # fetched by the agent
    COMPLETED = "completed"  # a valid result was stored
    REJECTED = "rejected"  # the result was invalid (bad tensor, wrong shape...)
    FAILED = "failed"  # the site reported it could not do the task
    TIMED_OUT = "timed_out"  # no result by the round deadline


class SiteMetrics(Message):
    """What one site reports for one task. Evaluation metrics are on the site's local validation split."""

    num_samples: int = Field(ge=0, description="training examples used (the aggregation weight)")
    num_eval_samples: int = Field(default=0, ge=0)
    train_loss: FiniteFloat | None = None
    eval_loss: FiniteFloat | None = None
    accuracy: FiniteFloat | None = Field(default=None, ge=0, le=1)
    auc: FiniteFloat | None = Field(default=None, ge=0, le=1)
    duration_s: FiniteFloat = Field(default=0.0, ge=0)


class TaskInfo(Message):
    task_id: str
    site: str
    kind: TaskKind
    status: TaskStatus
    reason: str | None = None
    metrics: SiteMetrics | None = None


class RoundInfo(Message):
    number: int
    kind: TaskKind
    status: RoundStatus
    started_at: datetime
    ended_at: datetime | None
    reason: str | None
    model_digest: str | None = Field(description="the global model after this round (train rounds)")
    tasks: list[TaskInfo]


class StudyInfo(Message):
    study_id: str
    spec: StudySpec
    status: StudyStatus
    reason: str | None
    created_at: datetime
    ended_at: datetime | None
    completed_rounds: int
    current_round: int | None
    model_digest: str | None
    rounds: list[RoundInfo] = []


# --- agent API --------------------------------------------------------------------------------------------


class Task(Message):
    """A unit of work for one site, delivered by long-poll."""

    protocol_version: int = PROTOCOL_VERSION
    task_id: str
    study_id: str
    round: int
    kind: TaskKind
    dataset: str
    recipe: RecipeSpec
    model_digest: str = Field(description="sha256 of the global model's safetensors blob")
    seed: int
    deadline: datetime


class TaskPoll(Message):
    task: Task | None


class TaskFailure(Message):
    """Sent by an agent that cannot do a task. ``code`` is machine-readable, ``reason`` is for people."""

    code: Annotated[str, Field(pattern=r"^[a-z_]{1,40}$")]
    reason: Annotated[str, Field(min_length=1, max_length=2000)]


class ResultManifest(Message):
    """Travels inside the uploaded safetensors file's metadata (key ``fedhealth.result``)."""

    task_id: str
    metrics: SiteMetrics


class Ack(Message):
    ok: bool = True
    detail: str | None = None


class ErrorBody(Message):
    """Every 4xx/5xx answer has this shape."""

    error: str
    detail: Any = None


RESULT_METADATA_KEY = "fedhealth.result"
