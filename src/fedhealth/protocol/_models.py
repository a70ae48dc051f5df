"""Wire messages between agent, operator and orchestrator. Version 1.

Every message is a frozen pydantic model that forbids unknown fields, so a typo in a request is a 422 with a
message, never a silently ignored setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
    model_validator,
)

from fedhealth.protocol._failures import FailureCode
from fedhealth.secagg import (
    default_degree,
    min_threshold,
    neighbourhood_problem,
    participants_problem,
    threshold_problem,
)

PROTOCOL_VERSION = 1
# A secure task's SiteAttestation (base64 of its JSON) may ride on the site's first SecAgg+ message here.
ATTESTATION_HEADER = "X-Fedhealth-Attestation"
# A collective call names its session's attempt here: a call of an earlier attempt (from before an
# orchestrator restart) gets 410 instead of reaching the new session's relay.
SESSION_HEADER = "X-Fedhealth-Session"

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$", description="lowercase name")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
RecipeVersion = Annotated[
    str, Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,31}$", description="a recipe's version")
]
KeyFingerprint = Annotated[
    str, Field(pattern=r"^[0-9a-f]{64}$", description="sha256 hex of a site's raw Ed25519 public key")
]
# The most samples one site may report for one task. Far above any hospital's cohort; it keeps every weight
# and sum an exact integer in float64 and int64 (2**62 samples let one site set a plain-mode model outright).
MAX_SITE_SAMPLES = 1_000_000_000
# The largest loss a site may report. Losses are >= 0 (every recipe's, and the secure sum's range); a site's
# 1e308 times its sample count made the round's sample-weighted train loss inf (NaN beside -1e308) in the
# round metrics, the model version, the report and the API. MAX_SITE_SAMPLES of them per site stay far from
# float64's overflow, whatever the number of sites; an honest (even diverged) finite loss is far below
# (tests/orchestrator/test_site_report_poisoning_attacks.py)
MAX_REPORTED_LOSS = 1e100
Loss = Annotated[float, Field(ge=0, le=MAX_REPORTED_LOSS, allow_inf_nan=False)]
# A sha256 hex digest (or a keyed HMAC-SHA256 commitment to one), as a site attests it
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="64 lowercase hex digits")]


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- study specification ----------------------------------------------------------------------------------


class StrategyName(StrEnum):
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    SCAFFOLD = "scaffold"  # needs a recipe whose model carries control variates (torch: scaffold = true)


class RecipeSpec(Message):
    """What each site runs: a recipe plug-in's name and version (``fedhealth.learning``'s registry, entry
    point group ``fedhealth.recipes``) and its parameters. The protocol knows no recipe: the recipe's own
    parameter model validates ``params``, at the orchestrator when the study is submitted (422 with "field:
    rule" messages) and at every site before it reads any data (failure code ``invalid_recipe``). The spec
    hash covers all three, so a steward approves this exact recipe, version and parameters."""

    name: Name = Field(description="the recipe's registered name, e.g. 'logreg'")
    version: RecipeVersion = Field(default="1", description="the recipe's version; every site must have it")
    params: dict[str, JsonValue] = Field(
        default_factory=dict, description="the recipe's parameters, validated by the recipe itself"
    )

    @field_validator("params")
    @classmethod
    def _finite(cls, v: dict[str, JsonValue]) -> dict[str, JsonValue]:
        # JSON has no NaN or infinity (the spec hash is over canonical JSON): refused on receipt, at any depth
        stack: list[JsonValue] = [v]
        while stack:
            item = stack.pop()
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError("recipe params must be finite numbers (no NaN or infinity)")
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
        return v


class StrategySpec(Message):
    """How the orchestrator turns the sites' updates into the next global model."""

    name: StrategyName = StrategyName.FEDAVG
    weight_cap: int = Field(
        default=100_000,
        ge=1,
        le=MAX_SITE_SAMPLES,
        description="most samples one site's aggregation weight counts (both modes: the server caps reported "
        "counts in plain mode, the site caps its weight inside the secure sum)",
    )
    max_update_norm: FiniteFloat | None = Field(
        default=None,
        gt=0,
        le=1e9,
        description="if set, each site's update is scaled down to at most this L2 norm before averaging "
        "(by the orchestrator in plain mode, by each site under secure aggregation)",
    )
    server_learning_rate: FiniteFloat = Field(default=1.0, gt=0, le=1000)
    beta1: FiniteFloat = Field(default=0.9, ge=0, lt=1)
    beta2: FiniteFloat = Field(default=0.99, ge=0, lt=1)
    tau: FiniteFloat = Field(
        default=1e-3, gt=0, le=10, description="adaptivity (epsilon) of FedAdam/Yogi/Adagrad"
    )


class DpMode(StrEnum):
    RECORD = "record"  # DP-SGD inside each site: protects each patient (the default)
    SITE_CENTRAL = "site-central"  # sites clip their updates, the orchestrator adds noise to the sum
    SITE_DISTRIBUTED = (
        "site-distributed"  # each site adds its share of the noise; the secure sum carries it all
    )


class AccountantName(StrEnum):
    PLD = "pld"
    RDP = "rdp"


class PrivacySpec(Message):
    """Differential privacy for a study. Either ``noise_multiplier`` is given, or ``target_epsilon`` and the
    noise is calibrated from it (deterministically, so every site can recompute and check it)."""

    mode: DpMode = DpMode.RECORD
    delta: FiniteFloat = Field(gt=0, lt=1)
    target_epsilon: FiniteFloat | None = Field(default=None, gt=0, le=1000)
    noise_multiplier: FiniteFloat | None = Field(default=None, ge=0, le=10_000)
    max_grad_norm: FiniteFloat = Field(
        gt=0, le=1e6, description="per-example clip (record) or update clip (site)"
    )
    sample_rate: FiniteFloat | None = Field(
        default=None, gt=0, le=1, description="Poisson rate (record mode)"
    )
    steps_per_round: int | None = Field(
        default=None, ge=1, le=1_000_000, description="DP-SGD steps (record mode)"
    )
    site_sample_rates: dict[Name, Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]] | None = Field(
        default=None,
        description="Poisson rate per site (record mode; e.g. batch / records), overriding sample_rate; "
        "with target_epsilon each site's noise is calibrated for its own rate",
    )
    accountant: AccountantName = AccountantName.PLD

    @model_validator(mode="after")
    def _complete(self) -> PrivacySpec:
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("give noise_multiplier or target_epsilon")
        if self.mode is DpMode.RECORD and (
            (self.sample_rate is None and not self.site_sample_rates) or self.steps_per_round is None
        ):
            raise ValueError("record-level DP needs sample_rate (or site_sample_rates) and steps_per_round")
        return self


class SecureAggregationSpec(Message):
    """SecAgg+ for a study: the orchestrator sees only the sum of the sites' quantized, masked updates.

    The spec binds the round set-up to what the data stewards approve (its hash covers every field): the
    participating sites and their identity-key fingerprints (``site_keys``), the collusion bound, the
    threshold and the neighbourhood size. Every site checks each round against :func:`secure_round_plan`.
    """

    site_keys: dict[Name, KeyFingerprint] = Field(
        description="each participating site's identity-key fingerprint (sha256 hex of its raw Ed25519 "
        "public key: the orchestrator's site list shows it, each steward checks it at the site); exactly "
        "the training and evaluation sites"
    )
    threshold: int | None = Field(
        default=None,
        ge=2,
        description="sites needed to unmask (default: the smallest t with 2t > n + c, at least the quorum)",
    )
    collusion: int | None = Field(
        default=None, ge=0, description="c: sites that may collude with the orchestrator (default: n // 3)"
    )
    neighbourhood_size: int | None = Field(
        default=None,
        ge=2,
        le=10_000,
        description="k, above full_graph_max_sites (even; default: 3 * ceil(log2 n) + c, even, at most "
        "n - 1); needs a share threshold of at least c + 2",
    )
    stage_timeout_s: FiniteFloat = Field(default=30.0, gt=0, le=3600)
    update_clip: FiniteFloat = Field(
        default=1.0, gt=0, le=1e6, description="per-coordinate bound on an update"
    )
    full_graph_max_sites: int = Field(default=20, ge=2, le=10_000)

    @field_validator("neighbourhood_size")
    @classmethod
    def _even(cls, v: int | None) -> int | None:
        if v is not None and v % 2:
            raise ValueError("neighbourhood_size must be even")
        return v


@dataclass(frozen=True, slots=True, kw_only=True)
class SecureRoundPlan:
    """What the approved spec says a secure round of one kind must look like: the orchestrator builds the
    round's SecAgg+ configuration from it, and each site checks that configuration against it. Everything
    here follows from the spec alone, never from how many sites the orchestrator put in a round."""

    kind: TaskKind
    sites: tuple[str, ...]  # sorted: the spec's sites for this kind, the only ones a round may contain
    threshold: int
    collusion: int
    full_graph_max_sites: int
    # the spec's k when it sets one above full_graph_max_sites; None: every pair of sites are neighbours up
    # to full_graph_max_sites, and fedhealth.secagg's default_degree(n, c) above it
    neighbourhood_size: int | None
    degree: int  # k for the spec's n sites: n - 1 with the full graph (a round over fewer sites may differ)

    @property
    def n(self) -> int:
        return len(self.sites)


def _plan(spec: StudySpec, kind: TaskKind) -> SecureRoundPlan | str:
    sa = spec.secure_aggregation
    if sa is None:
        return "the study does not use secure aggregation"
    sites = tuple(sorted(spec.train_sites if kind is TaskKind.TRAIN else spec.evaluation_sites))
    n = len(sites)
    what = "training" if kind is TaskKind.TRAIN else "evaluation"
    if n < 2:
        return f"secure aggregation needs at least 2 {what} sites"
    c = sa.collusion if sa.collusion is not None else n // 3
    # evaluation results carry no noise and count with any one site: their quorum is 1
    quorum = spec.min_sites if kind is TaskKind.TRAIN else 1
    t = sa.threshold if sa.threshold is not None else min(n, max(min_threshold(n, c), quorum))
    problem = threshold_problem(n, t, c, quorum)
    if problem is not None:
        return f"secure aggregation of the {what} rounds: {problem}"
    k: int | None = None
    degree = n - 1
    if n > sa.full_graph_max_sites:
        k = sa.neighbourhood_size
        degree = k if k is not None else default_degree(n, c)
        problem = None if degree == n - 1 else neighbourhood_problem(n, degree, c)
        if problem is not None:
            return f"secure aggregation of the {what} rounds: {problem}"
    return SecureRoundPlan(
        kind=kind,
        sites=sites,
        threshold=t,
        collusion=c,
        full_graph_max_sites=sa.full_graph_max_sites,
        neighbourhood_size=k,
        degree=degree,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectivePlan:
    """What the approved spec says a collective session must look like: exactly these participants (the
    spec's training sites, sorted; sites[0] leads), these identity-key fingerprints, this collusion bound.
    The orchestrator builds the session from it and each site checks the session against it."""

    sites: tuple[str, ...]
    site_keys: dict[str, str]
    collusion: int
    call_timeout_s: float  # a participant that has not sent a call this long after the first one is lost

    @property
    def leader(self) -> str:
        return self.sites[0]


def collective_plan(spec: StudySpec) -> CollectivePlan:
    """The collective session a spec prescribes (raises ValueError, with the reason, when it cannot hold one:
    no ``secure_aggregation`` to bind the participants' keys, fewer than 3 sites, too many colluders)."""
    sa = spec.secure_aggregation
    if sa is None:
        raise ValueError(
            "a collective study needs secure_aggregation with every site's identity-key fingerprint "
            "(site_keys): each site checks the session's participants and keys against it"
        )
    sites = tuple(sorted(spec.train_sites))
    collusion = sa.collusion if sa.collusion is not None else len(sites) // 3
    problem = participants_problem(len(sites), collusion)
    if problem is not None:
        raise ValueError(problem)
    return CollectivePlan(
        sites=sites,
        site_keys={s: sa.site_keys[s] for s in sites},
        collusion=collusion,
        call_timeout_s=sa.stage_timeout_s,
    )


def secure_round_plan(spec: StudySpec, kind: TaskKind) -> SecureRoundPlan:
    """The SecAgg+ set-up the spec prescribes for rounds of ``kind`` (raises ValueError if it has none; a
    validated :class:`StudySpec` with ``secure_aggregation`` always has one)."""
    plan = _plan(spec, kind)
    if isinstance(plan, str):
        raise ValueError(plan)
    return plan


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
    purpose: Name = Field(default="research", description="what patients' consent must permit")
    description: Annotated[str, Field(max_length=4000)] = ""
    privacy: PrivacySpec | None = None
    secure_aggregation: SecureAggregationSpec | None = None

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

    @model_validator(mode="after")
    def _secagg_bound_to_sites(self) -> StudySpec:
        sa = self.secure_aggregation
        if sa is None:
            return self
        sites = set(self.train_sites) | set(self.evaluation_sites)
        missing, extra = sorted(sites - set(sa.site_keys)), sorted(set(sa.site_keys) - sites)
        if missing or extra:
            raise ValueError(
                "secure_aggregation.site_keys must name exactly the training and evaluation sites "
                f"(missing: {missing or 'none'}; not in the study: {extra or 'none'})"
            )
        for kind in (TaskKind.TRAIN, TaskKind.EVALUATE):
            plan = _plan(self, kind)
            if isinstance(plan, str):
                raise ValueError(plan)
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
    fingerprint: str | None = Field(
        default=None,
        description="sha256 hex of the enrolled identity key: what a secure study's site_keys names (a "
        "steward compares it with the site's own key out of band)",
    )
    created_at: datetime
    last_seen_at: datetime | None
    enrolled_at: datetime | None = None
    revoked_at: datetime | None = None
    software_version: str | None = Field(default=None, description="fedhealth version at the last login")
    protocol_version: int | None = Field(default=None, description="protocol version at the last login")


class StudyStatus(StrEnum):
    AWAITING_APPROVAL = "awaiting_approval"  # submitted; not every named site's steward approved its spec yet
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
    COLLECTIVE = "collective"  # a site's part in a collective session (one per site, round 1)


class TaskStatus(StrEnum):
    PENDING = "pending"  # created, not yet fetched
    DELIVERED = "delivered"  # fetched by the agent
    COMPLETED = "completed"  # a valid result was stored
    REJECTED = "rejected"  # the result was invalid (bad tensor, wrong shape...)
    FAILED = "failed"  # the site reported it could not do the task
    TIMED_OUT = "timed_out"  # no result by the round deadline


class SiteMetrics(Message):
    """What one site reports for one task. Evaluation metrics are on the site's local validation split."""

    num_samples: int = Field(
        ge=0, le=MAX_SITE_SAMPLES, description="training examples used (the aggregation weight)"
    )
    num_eval_samples: int = Field(default=0, ge=0, le=MAX_SITE_SAMPLES)
    train_loss: Loss | None = None
    eval_loss: Loss | None = None
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
    attestation: SiteAttestation | None = None


class RoundInfo(Message):
    number: int
    kind: TaskKind
    status: RoundStatus
    started_at: datetime
    ended_at: datetime | None
    reason: str | None
    model_digest: str | None = Field(description="the global model after this round (train rounds)")
    metrics: dict[str, Any] | None = Field(default=None, description="round-level figures (means, sums)")
    tasks: list[TaskInfo]


class ApprovalState(StrEnum):
    """A site's decision on a spec hash, as the site reported it to the orchestrator."""

    PENDING = "pending"  # not reported yet
    APPROVED = "approved"
    REJECTED = "rejected"


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
    spec_hash: str | None = Field(default=None, description="what each site's data steward approves")
    approvals: dict[str, ApprovalState] = Field(
        default_factory=dict, description="each named site's decision on the spec hash"
    )
    approval_deadline: datetime | None = Field(
        default=None,
        description="an awaiting study fails at this time, naming the sites that did not approve",
    )


# --- agent API --------------------------------------------------------------------------------------------


class LogHeadInfo(Message):
    """The head of a hash-chained audit log: its last sequence number and entry hash, and its writer's
    signature of that entry (so a peer that anchors it can show the writer stated it)."""

    seq: int = Field(ge=0)
    hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")] | None = None

    @classmethod
    def of(cls, head: Any) -> LogHeadInfo:
        """From a governance ``LogHead`` (protocol does not import governance)."""
        signature = head.signature.hex() if head.signature is not None else None
        return cls(seq=head.seq, hash=head.entry_hash, signature=signature)

    def to_head_json(self) -> dict[str, Any]:
        """The JSON of the governance ``LogHead`` it names (``LogHead.from_json`` reads it)."""
        out: dict[str, Any] = {"seq": self.seq, "hash": self.hash}
        if self.signature is not None:
            out["signature"] = self.signature
        return out


class RoundCommitment(Message):
    """The orchestrator's signed-log commitment to a finished round; each site logs it (cross-anchoring)."""

    study_id: str
    round: int
    model_digest: str | None
    orchestrator_head: LogHeadInfo


class SecureRoundInfo(Message):
    """How a site joins a secure round: the SecAgg+ configuration (bound into every key it derives), the
    peers' Ed25519 identity keys as enrolled (the site pins them on first use), and the attempt id."""

    config: dict[str, Any]
    peer_keys: dict[str, str]
    attempt: str


class CollectiveSessionInfo(Message):
    """How a site joins a collective session: its participants (each site checks them against the approved
    spec's :func:`collective_plan`), their Ed25519 identity keys as enrolled, and the session's attempt id
    (bound, with the study, round and spec hash, into every key the session derives)."""

    sites: list[Name]
    peer_keys: dict[Name, str]
    attempt: Annotated[str, Field(min_length=1, max_length=64)]


class ReleasedScaling(Message):
    """The federation-wide ``mean`` and ``scale`` per feature that a study's scaling pre-step (``standardize =
    "federated"``, round 0) released, and its total training rows. Public by design: every site of the
    session computed it from the secure sums."""

    mean: list[FiniteFloat] = Field(min_length=1, max_length=1_000_000)
    scale: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        min_length=1, max_length=1_000_000
    )
    rows: int = Field(ge=0)


class Task(Message):
    """A unit of work for one site, delivered by long-poll. ``spec`` is the whole study spec, so the site can
    hash it and check its data steward's approval."""

    protocol_version: int = PROTOCOL_VERSION
    task_id: str
    study_id: str
    round: int
    kind: TaskKind
    dataset: str
    recipe: RecipeSpec
    model_digest: str = Field(description="sha256 of the global model's safetensors blob")
    model_inline: str | None = Field(
        default=None,
        description=(
            "the model blob itself, base64, when it is small, saving the site a download; "
            "its sha256 must equal model_digest"
        ),
    )
    seed: int
    # With its offset: a deadline without one cannot be compared with the site's clock, and a lying
    # orchestrator's naive deadline made the agent's arithmetic raise out of handle() (and out of its
    # failure report, ending `site run`); it is now no task poll at all
    # (tests/agent/test_time_attacks.py)
    deadline: AwareDatetime
    spec: StudySpec
    spec_signature: str | None = Field(default=None, description="the owner's Ed25519 signature, hex")
    owner_public_key: str | None = Field(default=None, description="the owner's Ed25519 public key, hex")
    commitments: list[RoundCommitment] = Field(
        default_factory=list, description="rounds to anchor at the site"
    )
    secure_round: SecureRoundInfo | None = None
    collective: CollectiveSessionInfo | None = None
    scaling: ReleasedScaling | None = Field(
        default=None,
        description="a 'federated' standardization's release (round 0), with every later task of the study",
    )


class TaskPoll(Message):
    task: Task | None


class PrivacySpend(Message):
    """What a site's ledger says after a task: the study's spend, the dataset's total and its budget."""

    # the spec's dataset (a Name): it is a Prometheus label and a dashboard cell, so no free text
    # (tests/orchestrator/test_site_report_poisoning_attacks.py)
    dataset: Name
    delta: FiniteFloat
    study_epsilon: FiniteFloat = Field(ge=0)
    total_epsilon: FiniteFloat = Field(ge=0)
    budget_epsilon: FiniteFloat = Field(ge=0)
    task_epsilon: FiniteFloat | None = Field(
        default=None, ge=0, description="what this task was charged on its own (none: nothing charged)"
    )
    accountant: AccountantName = Field(default=AccountantName.PLD, description="the site ledger's accountant")
    spec_delta: FiniteFloat | None = Field(
        default=None, gt=0, lt=1, description="the study spec's delta (the ledger's ``delta`` may differ)"
    )
    spec_study_epsilon: FiniteFloat | None = Field(
        default=None,
        ge=0,
        description="the study's record-level epsilon at spec_delta: the figure a model card may print "
        "beside the spec's delta",
    )
    reproducible_noise: bool = Field(
        default=False,
        description="noise drawn from the study seed (benchmarks only: no privacy against "
        "whoever knows the seed)",
    )


class ConsentBasis(StrEnum):
    """The consent model a site applied to a task's rows (its ``policy.toml``, docs/governance.md)."""

    OPT_IN = "opt-in"  # only patients with a permit in force
    OPT_OUT = "opt-out"  # every patient but those who denied or withdrew


class SiteAttestation(Message):
    """Facts a site states about a task, none of them patient data: its audit-log head (for anchoring), the
    fingerprint of the training set it used, its consent snapshot, the consent model it applied (the model
    card says it) and its privacy ledger."""

    audit_head: LogHeadInfo | None = None
    # Keyed commitments (64 hex digits) from an honest agent. Other text in consent_snapshot made the
    # round's provenance fail to record (no lineage, model card, release entry or round commitment for any
    # site); a fingerprint with `|` or a newline broke the model card's table
    # (tests/orchestrator/test_site_report_poisoning_attacks.py)
    dataset_fingerprint: Digest | None = None
    consent_snapshot: Digest | None = None
    consent_model: ConsentBasis | None = None
    privacy: PrivacySpend | None = None


class TaskFailure(Message):
    """Sent by an agent that cannot (or will not) do a task: a code from a closed set, never free text (a
    site's own words could carry a path or a patient id). ``reason`` is the code's fixed sentence, looked up
    by whoever reads the message, not sent."""

    code: FailureCode
    attestation: SiteAttestation | None = None

    @property
    def reason(self) -> str:
        return self.code.message


class ResultManifest(Message):
    """Travels inside the uploaded safetensors file's metadata (key ``fedhealth.result``), or as JSON.
    ``metrics`` is absent under secure aggregation: no per-site figure leaves the site in clear then."""

    task_id: str
    metrics: SiteMetrics | None
    attestation: SiteAttestation | None = None


class Ack(Message):
    ok: bool = True
    detail: str | None = None


class ErrorBody(Message):
    """Every 4xx/5xx answer has this shape."""

    error: str
    detail: Any = None


class SitePrivacyInfo(Message):
    """One training site's privacy figures for a study: the plan (from the spec) and, once the site has
    attested, its ledger's figures (the study's spend, the dataset's total, the budget)."""

    site: str
    noise_multiplier: FiniteFloat = Field(ge=0)
    sample_rate: FiniteFloat | None = Field(default=None, description="DP-SGD Poisson rate (record mode)")
    planned_epsilon: FiniteFloat | None = Field(
        default=None, description="the whole study at this site, record level, at the spec's delta"
    )
    spent: PrivacySpend | None = Field(default=None, description="the site's latest attestation")
    remaining_epsilon: FiniteFloat | None = Field(
        default=None,
        description="budget minus the dataset's composed spend (informative: epsilons do not add)",
    )
    tasks_charged: int = Field(default=0, ge=0, description="training tasks the site attested a charge for")
    refusal: str | None = Field(default=None, description="the site's latest refusal, 'code: reason'")


class StudyPrivacyInfo(Message):
    """A study's differential privacy: mode, noise and, per training site, plan and spend. ``study_id`` is
    None for a plan (``POST /api/v1/privacy/plan``)."""

    study_id: str | None
    mode: DpMode
    delta: FiniteFloat
    accountant: AccountantName
    target_epsilon: FiniteFloat | None
    max_grad_norm: FiniteFloat
    rounds: int
    steps_per_round: int | None
    site_level_epsilon: FiniteFloat | None = Field(
        default=None, description="site modes: the guarantee for a whole site's participation"
    )
    sites: list[SitePrivacyInfo]


RESULT_METADATA_KEY = "fedhealth.result"

TaskInfo.model_rebuild()
RoundInfo.model_rebuild()
StudyInfo.model_rebuild()
