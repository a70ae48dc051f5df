"""The site's governance gate: approval, policy, consent and cohort checks on every task, in the site's log.

The site keeps its governance state in ``HOME/site.sqlite`` (the ``gov_*`` tables), signed with the site's
identity key: the audit log, the study specs its data steward approved or rejected, the consent registry and
the consent snapshots each task used. :class:`GovernanceGate` is the first gate of the agent's pipeline:

``before_data``   log ``task.received``; anchor the orchestrator's round commitments the task carries; check
                  the owner's signature on the spec (if the task carries one); register the spec for the
                  steward (``pending`` until decided); then the approval of this exact spec hash and every
                  site-policy rule, each decision logged. Under the opt-in consent model a cohort that the
                  consent registry alone proves smaller than k is refused here too. A refusal here is made
                  before the dataset is opened.
``prepare_data``  (every task) keep only the rows, training and held-out, whose patient's consent permits the
                  study's purpose today (the consent snapshot is stored and logged with suppressed counts),
                  re-standardized on the kept training rows; then (training) the cohort rule, and (training,
                  evaluation, collective session) the held-out cohort rule: below k held-out patients the
                  task gets no held-out row, so it reports no figure of them (an evaluation answers with
                  none). The dataset handed on is the filtered one.
``after_training`` / ``attest``  log ``task.completed`` and ``update.sent``; state the log head and keyed
                  commitments (``governance._commitments``) to the fingerprint of the rows actually used and
                  to the consent snapshot, for the orchestrator (which anchors the head in its round record).

A refusal's code is the rule that refused (:class:`fedhealth.governance.Rule` values, or
``spec_mismatch``: the task's recipe, dataset, seed or round is not its spec's; ``spec_signature``,
``site_policy``, ``consent``) and its reason is the decision's sentence, kept in the site's ``task.refused``
entry; the orchestrator receives the code alone and logs it with the code's fixed sentence.

Defaults when the site has not said otherwise (``HOME/policy.toml`` absent or silent):
- every study needs the steward's approval of its exact spec hash: there is no setting to turn that off;
- the site policy is :class:`~fedhealth.governance.SitePolicy`'s default (k = 10, any recipe and owner, no
  epsilon cap, secure aggregation not required);
- ``consent_model = "auto"``: while the site's consent registry holds no record at all, the site has made no
  patient-level consent statement and every patient is used (opt-out: nobody has denied); as soon as it
  holds one record, only patients with a permit in force for the study's purpose are used (opt-in). A site
  states ``consent_model = "opt-in"`` or ``"opt-out"`` in ``policy.toml`` to fix the model either way.
  Every ``consent.applied`` entry names the model that was applied.

Other gates (privacy) may append to the same log through ``ctx.state[AUDIT_LOG_STATE]`` in their
``before_data`` / ``after_training`` hooks; entries appended there are covered by the head this gate attests.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pydantic_core
from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.exc import OperationalError

from fedhealth.agent._client import OrchestratorClient, OrchestratorRefused, RetryPolicy
from fedhealth.agent._home import SiteHome
from fedhealth.agent._pipeline import PassGate, TaskContext, TaskRefused
from fedhealth.core import (
    Clock,
    ConfigError,
    CryptoError,
    FedHealthError,
    InputError,
    ServiceUnavailableError,
    SystemClock,
    canonical_json,
    create_private_file,
)
from fedhealth.crypto import IdentityKey, PublicIdentity
from fedhealth.data import TabularDataset
from fedhealth.governance import (
    ANY_PURPOSE,
    GOVERNANCE_METADATA,
    ApprovalRegistry,
    AuditEventType,
    AuditLog,
    CommitmentKeys,
    CommitmentKind,
    ConsentModel,
    ConsentRegistry,
    Decision,
    LogHead,
    PolicyError,
    PolicyRequest,
    Rule,
    SignedSpec,
    SitePolicy,
    StudyApproval,
    WithdrawalNotice,
    check_cohort,
    commitments_to,
    create_governance_tables,
    evaluate_policy,
    first_refusal,
    read_stored_log,
    record_anchor,
    record_decision,
    record_task_refusal,
    spec_hash,
)
from fedhealth.protocol import FailureCode, StudySpec, Task, TaskKind
from fedhealth.runtime import (
    SCALING_ROUND,
    federated_scaling_requested,
    planned_epsilon,
    recipe_capabilities,
    session_attempts,
)

log = logging.getLogger("fedhealth.agent")

STATE_KEY = "governance"
AUDIT_LOG_STATE = "governance.audit_log"
SPEC_SIGNATURE_CODE = "spec_signature"
SITE_POLICY_CODE = "site_policy"
SPEC_MISMATCH_CODE = "spec_mismatch"
CONSENT_CODE = "consent"
WITHDRAWALS_PATH = "/api/v1/agent/governance/withdrawals"
# failure codes the agent itself gives (SiteAgent's _failure_code): a task that ended without being refused
FAILURE_CODES = frozenset(c.value for c in FailureCode if not c.is_refusal)


class ConsentModelSetting(StrEnum):
    """``consent_model`` in ``policy.toml``: ``auto`` decides by whether the registry holds any record."""

    AUTO = "auto"
    OPT_IN = "opt-in"
    OPT_OUT = "opt-out"


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteSettings:
    """The steward's standing settings from ``policy.toml``: the site policy and the consent model."""

    policy: SitePolicy
    consent_model: ConsentModelSetting = ConsentModelSetting.AUTO
    source_sha256: str | None = None  # of the file's bytes; None: no file, defaults apply

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_json(),
            "consent_model": self.consent_model.value,
            "sha256": self.source_sha256,
        }


def load_site_settings(path: Path) -> SiteSettings:
    """Read ``policy.toml`` (absent: the defaults). Besides the :class:`SitePolicy` keys it takes
    ``consent_model`` (auto, opt-in or opt-out). Raises :class:`PolicyError` naming the bad key."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return SiteSettings(policy=SitePolicy())
    except OSError as exc:
        raise PolicyError(f"cannot read site policy {path}: {exc.strerror}") from exc
    try:
        parsed = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"site policy {path} is not valid TOML: {exc}") from exc
    model_text = parsed.pop("consent_model", ConsentModelSetting.AUTO.value)
    try:
        model = ConsentModelSetting(model_text)
    except ValueError:
        choices = [m.value for m in ConsentModelSetting]
        raise PolicyError(f"consent_model must be one of {choices}, got {model_text!r}") from None
    return SiteSettings(
        policy=SitePolicy.from_mapping(parsed),
        consent_model=model,
        source_sha256=hashlib.sha256(raw).hexdigest(),
    )


def site_engine(path: Path) -> Engine:
    """The site database: WAL, so the agent and the steward's commands can use it at the same time. Created
    0600 before SQLite opens it (its -wal and -shm files take the same mode)."""
    create_private_file(path)
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})

    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL, not NORMAL: in WAL mode NORMAL does not sync a commit, so a power cut could take back audit
        # entries whose head an attestation already gave the orchestrator, and the restarted site would
        # sign other entries under the same numbers, a fork of the anchored head
        # (tests/agent/test_crash_consistency_attacks.py).
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    event.listen(engine, "connect", _pragmas)
    return engine


def _create_tables(engine: Engine) -> None:
    attempts = 20
    for attempt in range(attempts):
        try:
            create_governance_tables(engine)
            return
        except OperationalError as exc:  # another process of this site created them at the same moment
            retryable = "already exists" in str(exc) or "locked" in str(exc)
            if not retryable or attempt == attempts - 1:
                raise


_CONSENT = GOVERNANCE_METADATA.tables["gov_consent_records"]


class SiteGovernance:
    """A site's governance state, opened from its home: audit log, approvals, consent, settings.

    Opened by the agent (through :class:`GovernanceGate`) and by the data steward's commands; both write the
    same log, signed with the site's identity key (a steward's decision names the steward as its actor).
    """

    def __init__(self, home: SiteHome, *, clock: Clock | None = None) -> None:
        settings = home.require()
        tightened = home.secure()
        if tightened:
            log.warning("site home %s: %s", home.root, tightened.summary())
        self.home = home
        self.site: str = settings["site"]
        self.engine = site_engine(home.database_path)
        _create_tables(self.engine)
        self.log = AuditLog(
            self.engine, home.identity(), f"site:{self.site}", clock or SystemClock(), salted=True
        )
        self.approvals = ApprovalRegistry(self.engine, self.log)
        self.commitments = CommitmentKeys(self.engine, self.log)
        self._record_enrollment(settings)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> SiteGovernance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record_enrollment(self, settings: Mapping[str, str]) -> None:
        """The first entry of a site's log states who the site is (once, even with several processes)."""
        with self.log.transaction() as conn:
            if self.log.head().seq == 0:
                self.log.append(
                    AuditEventType.ENROLLMENT,
                    {
                        "site": self.site,
                        "orchestrator": settings.get("orchestrator"),
                        "enrolled_at": settings.get("enrolled_at"),
                        "public_key": self.log.public_key.raw.hex(),
                    },
                    connection=conn,
                )

    def consent(self, model: ConsentModel = ConsentModel.OPT_IN) -> ConsentRegistry:
        return ConsentRegistry(self.engine, self.log, model=model)

    def has_consent_records(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(_CONSENT.c.record_id).limit(1)).first() is not None

    def has_objections(self) -> bool:
        """Whether any patient has denied or withdrawn (for any purpose, at any time): rows without patient
        ids can then no longer be used under opt-out, since none of them can be told apart from the
        patient's."""
        c = _CONSENT.c
        query = select(c.record_id).where((c.decision == "deny") | c.withdrawn_at.is_not(None)).limit(1)
        with self.engine.connect() as conn:
            return conn.execute(query).first() is not None

    def resolve_consent_model(self, setting: ConsentModelSetting) -> tuple[ConsentModel, str]:
        """The model to apply now and why (a sentence for the log)."""
        if setting is ConsentModelSetting.OPT_IN:
            return ConsentModel.OPT_IN, "the site's policy sets the opt-in consent model"
        if setting is ConsentModelSetting.OPT_OUT:
            return ConsentModel.OPT_OUT, "the site's policy sets the opt-out consent model"
        if self.has_consent_records():
            return ConsentModel.OPT_IN, "the site holds consent records, so only a permit in force counts"
        return (
            ConsentModel.OPT_OUT,
            "the site has imported no consent record: no patient has denied, every patient is used",
        )

    def permitted_upper_bound(self, purpose: str, at: datetime) -> int:
        """Distinct patients with a permit in force for ``purpose`` at ``at``, whatever else they said: an
        upper bound of any opt-in cohort, read from the registry alone (no dataset)."""
        c = _CONSENT.c
        query = select(func.count(func.distinct(c.patient_id))).where(
            (c.decision == "permit")
            & c.purpose.in_([purpose, ANY_PURPOSE])
            & ((c.valid_from.is_(None)) | (c.valid_from <= at))
            & ((c.valid_until.is_(None)) | (c.valid_until > at))
            & ((c.withdrawn_at.is_(None)) | (c.withdrawn_at > at))
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def submit(self, spec: StudySpec | Mapping[str, Any], signed: SignedSpec | None = None) -> StudyApproval:
        """Register a spec for the steward's review (idempotent); a signed one is verified first."""
        body = spec.model_dump(mode="json") if isinstance(spec, StudySpec) else dict(spec)
        if signed is not None:
            if spec_hash(signed.spec) != spec_hash(body):
                raise InputError("the signature is over another spec")
            return self.approvals.submit(signed)
        return self.approvals.submit(body)

    def approve(
        self,
        spec: StudySpec | Mapping[str, Any],
        *,
        reason: str,
        steward: str,
        signed: SignedSpec | None = None,
    ) -> StudyApproval:
        """The steward approves this exact spec (registering it first if the site has not seen it yet)."""
        record = self.submit(spec, signed)
        return self.approvals.approve(record.spec_hash, reason=reason, steward=steward)

    def reject(self, spec: StudySpec | Mapping[str, Any], *, reason: str, steward: str) -> StudyApproval:
        record = self.submit(spec)
        return self.approvals.reject(record.spec_hash, reason=reason, steward=steward)


def requested_epsilon(spec: StudySpec, site: str) -> float | None:
    """The epsilon the whole study would spend on the site's dataset, as the policy's cap sees it: the
    privacy runtime's planned epsilon for this site (record level, at the spec's delta). None for a study
    without differential privacy; infinite for one whose privacy cannot be planned (it cannot fit a cap). The
    privacy gate's ledger remains the authority on what is actually spent."""
    if spec.privacy is None:
        return None
    try:
        return float(planned_epsilon(spec, site))
    except FedHealthError:
        return math.inf


@dataclass
class _TaskNotes:
    """What the gate learned about one task (kept in ``ctx.state``)."""

    spec_hash: str
    refused_here: bool = False
    completed: bool = False
    dataset_fingerprint: str | None = None
    consent_snapshot: str | None = None
    consent_model: ConsentModel | None = None
    subject: dict[str, Any] = field(default_factory=dict)


class GovernanceGate(PassGate):
    """The first gate of every task (module docstring)."""

    def __init__(self, governance: SiteGovernance) -> None:
        self.governance = governance
        self.log = governance.log
        self._settings: SiteSettings | None = None
        self._epsilon_cache: dict[str, float | None] = {}
        self._anchored: set[tuple[str, int, int, str]] = set()
        self._logged_settings: str | None = None
        self._scan_log()
        self.settings()  # a broken policy.toml stops the agent at start, with the key named

    @classmethod
    def from_home(cls, home: SiteHome) -> GovernanceGate:
        return cls(SiteGovernance(home))

    def _scan_log(self) -> None:
        """Recover what earlier runs recorded: the anchors held, the settings last logged."""
        for entry in read_stored_log(self.governance.engine).entries:
            if entry.type == AuditEventType.ANCHOR_RECORDED:
                head = entry.payload.get("orchestrator_head", {})
                self._anchored.add(
                    (
                        str(entry.payload.get("study_id")),
                        int(entry.payload.get("round", -1)),
                        int(head.get("seq", -1)),
                        str(head.get("hash")),
                    )
                )
            elif (
                entry.type == AuditEventType.CONFIGURATION_CHANGED
                and entry.payload.get("setting") == "site_policy"
            ):
                self._logged_settings = _settings_digest(entry.payload.get("value"))

    # --- settings ------------------------------------------------------------------------------------------

    def settings(self) -> SiteSettings:
        """``policy.toml`` as it is now (re-read for every task; a change is logged once)."""
        current = load_site_settings(self.governance.home.policy_path)
        digest = _settings_digest(current.to_json())
        if digest != self._logged_settings:
            self.log.append(
                AuditEventType.CONFIGURATION_CHANGED,
                {
                    "setting": "site_policy",
                    "source": str(self.governance.home.policy_path),
                    "value": current.to_json(),
                },
            )
            self._logged_settings = digest
        self._settings = current
        return current

    # --- the pipeline --------------------------------------------------------------------------------------

    def before_data(self, ctx: TaskContext) -> None:
        with self.log.batch():  # one commit for the task's received, anchor and decision entries
            self._before_data(ctx)

    def _before_data(self, ctx: TaskContext) -> None:
        task = ctx.task
        spec = task.spec.model_dump(mode="json")
        digest = spec_hash(spec)
        notes = _TaskNotes(
            spec_hash=digest,
            subject={
                "task_id": task.task_id,
                "study_id": task.study_id,
                "round": task.round,
                "spec_hash": digest,
                "dataset": task.dataset,
            },
        )
        ctx.state[STATE_KEY] = notes
        ctx.state[AUDIT_LOG_STATE] = self.log
        self.log.append(
            AuditEventType.TASK_RECEIVED,
            {
                "task_id": task.task_id,
                "study_id": task.study_id,
                "round": task.round,
                "kind": task.kind.value,
                "spec_hash": digest,
                "dataset": task.dataset,
            },
        )
        self._record_anchors(task)
        mismatch = _mismatch(task, self.governance.site)
        if mismatch is not None:
            self._refuse(
                ctx, SPEC_MISMATCH_CODE, f"the task does not do what its study spec says: {mismatch}"
            )
        try:
            settings = self.settings()
        except PolicyError as exc:
            self._refuse(ctx, SITE_POLICY_CODE, f"the site policy is unusable, so no task runs: {exc}")
        signed = self._signed_spec(ctx, spec)
        try:
            self.governance.submit(spec, signed)
        except (CryptoError, InputError) as exc:
            self._refuse(ctx, SPEC_SIGNATURE_CODE, f"the study spec's signature does not verify: {exc}")
        decisions = [
            self.governance.approvals.check(spec),
            *evaluate_policy(settings.policy, self._request(task)),
        ]
        for decision in decisions:
            record_decision(self.log, decision, subject=notes.subject)
        refusal = first_refusal(decisions)
        if refusal is not None:
            self._refuse(ctx, refusal.rule.value, refusal.reason)
        if _on_training_rows(task) and recipe_capabilities(task.recipe).reads_data:
            self._cohort_before_data(ctx, settings)

    def _signed_spec(self, ctx: TaskContext, spec: Mapping[str, Any]) -> SignedSpec | None:
        task = ctx.task
        if task.spec_signature is None and task.owner_public_key is None:
            return None
        if task.spec_signature is None or task.owner_public_key is None:
            self._refuse(
                ctx,
                SPEC_SIGNATURE_CODE,
                "the task carries a spec signature without its key, or a key without it",
            )
        try:
            signed = SignedSpec(
                spec=dict(spec),
                owner=task.spec.owner,
                signature=bytes.fromhex(task.spec_signature or ""),
                owner_key=PublicIdentity(bytes.fromhex(task.owner_public_key or "")),
            )
            signed.verify()
        except (ValueError, CryptoError) as exc:
            self._refuse(
                ctx,
                SPEC_SIGNATURE_CODE,
                f"the study spec is not signed by its owner {task.spec.owner!r} as the task claims ({exc})",
            )
        return signed

    def _request(self, task: Task) -> PolicyRequest:
        digest = spec_hash(task.spec.model_dump(mode="json"))
        if digest not in self._epsilon_cache:
            self._epsilon_cache[digest] = requested_epsilon(task.spec, self.governance.site)
        return PolicyRequest(
            recipe=task.recipe.name,
            owner=task.spec.owner,
            dataset=task.dataset,
            requested_epsilon=self._epsilon_cache[digest],
            # secure only if the task carries its secure round (or, for a collective session, its masked
            # session) too: a task without one is a downgrade
            secure_aggregation=task.spec.secure_aggregation is not None
            and (task.secure_round is not None or task.collective is not None),
        )

    def _cohort_before_data(self, ctx: TaskContext, settings: SiteSettings) -> None:
        """Under opt-in, the registry bounds the cohort: refuse now if even that bound is below k."""
        model, _ = self.governance.resolve_consent_model(settings.consent_model)
        if model is not ConsentModel.OPT_IN:
            return
        bound = self.governance.permitted_upper_bound(ctx.task.spec.purpose, self.log.clock.now())
        if bound >= settings.policy.min_cohort_k:
            return
        decision = check_cohort(settings.policy, bound)
        notes: _TaskNotes = ctx.state[STATE_KEY]
        record_decision(self.log, decision, subject={**notes.subject, "stage": "before data"})
        self._refuse(ctx, decision.rule.value, decision.reason)

    def prepare_data(self, ctx: TaskContext, dataset: TabularDataset) -> TabularDataset:
        with self.log.batch():
            return self._prepare_data(ctx, dataset)

    def _prepare_data(self, ctx: TaskContext, dataset: TabularDataset) -> TabularDataset:
        """Keep only the rows, training and held-out alike, of patients whose consent permits the study's
        purpose today: an evaluation's metrics, a training round's metrics on the held-out split and the
        standardization statistics are computed on patients too. Training tasks then apply the cohort rule
        to the training rows kept."""
        notes: _TaskNotes = ctx.state[STATE_KEY]
        training = _on_training_rows(ctx.task)
        settings = self._settings or self.settings()
        model, why = self.governance.resolve_consent_model(settings.consent_model)
        train_ids = _row_ids(dataset.patient_ids_train, dataset.num_train, "row", model)
        test_ids = _row_ids(dataset.patient_ids_test, dataset.num_test, "test-row", model)
        without_ids = "training" if dataset.patient_ids_train is None else "held-out"
        if train_ids is None or test_ids is None:
            self._refuse(
                ctx,
                CONSENT_CODE,
                f"dataset {ctx.task.dataset!r} has no patient ids for its {without_ids} rows, "
                f"so consent ({why}) cannot be checked",
            )
        if (dataset.patient_ids_train is None or dataset.patient_ids_test is None) and (
            self.governance.has_objections()
        ):  # opt-out, rows named by position, and somebody said no: none of the rows can be told from theirs
            self._refuse(
                ctx,
                CONSENT_CODE,
                f"dataset {ctx.task.dataset!r} has no patient ids for its {without_ids} rows, "
                f"so consent ({why}) cannot be checked: a patient has denied or withdrawn",
            )
        # Both parts, whatever the task: training rounds report metrics on the held-out part, evaluations
        # read it, and both see features standardized with the training part's statistics.
        used = [*train_ids, *test_ids]
        result = self.governance.consent(model).filter(
            used,
            ctx.task.spec.purpose,
            self.log.clock.now(),
            task_id=ctx.task.task_id,
            study_id=ctx.task.study_id,
        )
        kept = np.zeros(len(used), dtype=np.bool_)
        kept[list(result.kept_indices)] = True
        keep_train, keep_test = kept[: len(train_ids)], kept[len(train_ids) :]
        if training:
            cohort = check_cohort(settings.policy, int(keep_train.sum()))
            record_decision(
                self.log, cohort, subject={**notes.subject, "snapshot_hash": result.snapshot_hash}
            )
            if not cohort.allowed:
                self._refuse(ctx, cohort.rule.value, cohort.reason)
        if _reads_held_out(ctx.task):
            held_out = _held_out_decision(settings.policy, int(keep_test.sum()))
            record_decision(
                self.log,
                held_out,
                subject={**notes.subject, "snapshot_hash": result.snapshot_hash, "rows": "held-out"},
            )
            if not held_out.allowed:
                # the held-out rows are not handed on, so no figure of them is computed, let alone released;
                # the task itself goes on: a training round still trains on its >= k training rows, a
                # collective session still takes part, and an evaluation answers with no figure (inside a
                # secure sum it adds zeros: a refusal would leave the round short of its threshold)
                keep_test = np.zeros_like(keep_test)
                kept[len(train_ids) :] = False
        selected = dataset if kept.all() else dataset.select(keep_train, keep_test)
        notes.dataset_fingerprint = selected.fingerprint
        notes.consent_snapshot = result.snapshot_hash
        notes.consent_model = model
        return selected

    def after_training(self, ctx: TaskContext) -> None:
        notes: _TaskNotes = ctx.state[STATE_KEY]
        notes.completed = True
        self.log.append(
            AuditEventType.TASK_COMPLETED,
            {
                "task_id": ctx.task.task_id,
                "study_id": ctx.task.study_id,
                "round": ctx.task.round,
                "kind": ctx.task.kind.value,
                "outcome": "completed",
                "spec_hash": notes.spec_hash,
            },
        )

    def on_refused(self, ctx: TaskContext, refusal: TaskRefused) -> None:
        notes: _TaskNotes | None = ctx.state.get(STATE_KEY)
        if notes is not None and notes.refused_here:
            return
        # refused by another gate (privacy): the reason goes in this log too
        record_task_refusal(
            self.log,
            task_id=ctx.task.task_id,
            study_id=ctx.task.study_id,
            rule=refusal.code,
            reason=refusal.reason,
            site=self.governance.site,
            round=ctx.task.round,
            spec_hash=notes.spec_hash if notes is not None else None,
        )

    def on_failed(self, ctx: TaskContext, error: BaseException) -> None:
        try:
            self.log.append(
                AuditEventType.TASK_COMPLETED,
                {
                    "task_id": ctx.task.task_id,
                    "study_id": ctx.task.study_id,
                    "round": ctx.task.round,
                    "kind": ctx.task.kind.value,
                    "outcome": "failed",
                    "error": f"{type(error).__name__}: {error}"[:500],
                },
            )
            self.attest(ctx)
        except FedHealthError:
            log.exception("could not log the failure of task %s", ctx.task.task_id)

    def attest(self, ctx: TaskContext) -> None:
        with self.log.batch():
            self._attest(ctx)

    def _attest(self, ctx: TaskContext) -> None:
        notes: _TaskNotes | None = ctx.state.get(STATE_KEY)
        if notes is not None and notes.completed and ctx.task.kind is TaskKind.TRAIN:
            notes.completed = False  # attest may be called again: one update.sent per update
            self.log.append(
                AuditEventType.UPDATE_SENT,
                {
                    "task_id": ctx.task.task_id,
                    "study_id": ctx.task.study_id,
                    "round": ctx.task.round,
                    "model_in": ctx.task.model_digest,
                    "dataset_fingerprint": notes.dataset_fingerprint,
                    "consent_snapshot": notes.consent_snapshot,
                },
            )
        head = self.log.head()
        ctx.attestation["audit_head"] = head.to_json()  # with the site's signature of that entry
        # Keyed commitments, never the bare hashes: those would let anyone who knows every record but one
        # test a guess about the last (governance._commitments).
        for kind, digest in (
            (CommitmentKind.DATASET_FINGERPRINT, notes.dataset_fingerprint if notes is not None else None),
            (CommitmentKind.CONSENT_SNAPSHOT, notes.consent_snapshot if notes is not None else None),
        ):
            if digest is not None:
                ctx.attestation[kind.value] = self.governance.commitments.commit(
                    kind=kind, study_id=ctx.task.study_id, task_id=ctx.task.task_id, digest=digest
                )
        if notes is not None and notes.consent_model is not None:
            # the policy's rule for patients without a record, stated so the model card can say it: a fact
            # of the site's governance, the same for every patient (docs/privacy.md)
            ctx.attestation["consent_model"] = notes.consent_model.value

    # --- helpers -------------------------------------------------------------------------------------------

    def _refuse(self, ctx: TaskContext, code: str, reason: str) -> NoReturn:
        """Log the refusal here and stop the task (raises :class:`TaskRefused`)."""
        notes: _TaskNotes | None = ctx.state.get(STATE_KEY)
        record_task_refusal(
            self.log,
            task_id=ctx.task.task_id,
            study_id=ctx.task.study_id,
            rule=code,
            reason=reason,
            site=self.governance.site,
            round=ctx.task.round,
            spec_hash=notes.spec_hash if notes is not None else None,
        )
        if notes is not None:
            notes.refused_here = True
        raise TaskRefused(code, reason)

    def _record_anchors(self, task: Task) -> None:
        for commitment in task.commitments:
            head = commitment.orchestrator_head
            key = (commitment.study_id, commitment.round, head.seq, head.hash)
            if key in self._anchored:
                continue
            record_anchor(
                self.log,
                study_id=commitment.study_id,
                round=commitment.round,
                orchestrator_head=LogHead.from_json(head.to_head_json()),
            )
            self._anchored.add(key)


def _on_training_rows(task: Task) -> bool:
    """Whether the task computes on the training rows (the cohort rule applies): training, and a federated
    study's scaling pre-step (its sums are over the kept training rows)."""
    if task.kind is TaskKind.TRAIN:
        return True
    return task.kind is TaskKind.COLLECTIVE and task.round == SCALING_ROUND


def _reports_held_out(task: Task) -> bool:
    """Whether the task reports figures of its held-out rows to the orchestrator: training rounds (their
    local model's metrics) and evaluations. Below k neither is refused: its held-out rows are withheld
    (:func:`_reads_held_out`)."""
    return task.kind in (TaskKind.TRAIN, TaskKind.EVALUATE)


def _reads_held_out(task: Task) -> bool:
    """Whether a figure of the task's held-out rows may leave the site, so that its held-out rows are handed
    on only when at least k remain: the tasks of :func:`_reports_held_out`, and a collective session (a
    boosting session sums its sites' validation figures, and a Cox model's session releases each site's
    C-index by name); not the federated scaling pre-step, which reads the training rows only. A session is
    never refused for it: below k the site takes part without its held-out rows."""
    if task.kind is TaskKind.COLLECTIVE:
        return task.round != SCALING_ROUND
    return _reports_held_out(task)


def _held_out_decision(policy: SitePolicy, held_out: int) -> Decision:
    """Are there at least k held-out patients after consent? Below k the site releases no figure of them (a
    crafted model would turn the loss of one held-out row into that patient's value). The reason never
    states a count."""
    k = policy.min_cohort_k
    if held_out >= k:
        return Decision.allow(Rule.MIN_COHORT, f"the held-out part after consent has at least k={k}")
    return Decision.refuse(
        Rule.MIN_COHORT,
        f"the held-out part after consent is smaller than the site's minimum k={k}: "
        "no metric of it is released",
    )


def _mismatch(task: Task, site: str) -> str | None:
    """What the task would run that its spec (the approved thing) does not say, if anything: the agent trains
    with the task's own recipe, dataset and seed, so each must be the spec's, and only in the role the spec
    gives this site (the steward approved "this site trains / evaluates / takes no part")."""
    spec = task.spec
    if task.kind in (TaskKind.TRAIN, TaskKind.COLLECTIVE) and site not in spec.train_sites:
        return f"it asks this site to train; the spec's training sites are {sorted(spec.train_sites)}"
    if task.kind is TaskKind.EVALUATE and site not in spec.evaluation_sites:
        return (
            f"it asks this site to evaluate; the spec's evaluation sites are {sorted(spec.evaluation_sites)}"
        )
    if task.recipe != spec.recipe:
        return "its recipe differs from the spec's"
    if task.dataset != spec.dataset:
        return f"it names dataset {task.dataset!r}, the spec {spec.dataset!r}"
    if task.seed != spec.seed:
        return "its seed differs from the spec's"
    last = spec.rounds + 1  # the evaluation round follows the training rounds
    if task.kind is TaskKind.TRAIN and not 1 <= task.round <= spec.rounds:
        return f"training round {task.round} is outside the spec's {spec.rounds} rounds"
    if task.kind is TaskKind.EVALUATE and task.round != last:
        return f"an evaluation in round {task.round}; the spec evaluates in round {last}"
    if task.kind is TaskKind.COLLECTIVE and federated_scaling_requested(spec.recipe):
        if task.round != SCALING_ROUND:
            return f"a collective session in round {task.round}; the spec has one, in round {SCALING_ROUND}"
    elif task.kind is TaskKind.COLLECTIVE and not 1 <= task.round <= session_attempts(spec):
        return (
            f"a collective session in round {task.round}; the spec allows sessions in rounds 1 to "
            f"{session_attempts(spec)} (the first and its retries)"
        )
    return None


def _row_ids(ids: Sequence[str] | None, rows: int, prefix: str, model: ConsentModel) -> Sequence[str] | None:
    """The patient id of each row; without ids, under opt-out every row named by its position (the caller
    refuses them too once anyone has denied), and under opt-in None: consent cannot be checked."""
    if ids is not None:
        return ids
    if model is ConsentModel.OPT_OUT:
        return [f"{prefix}:{i}" for i in range(rows)]
    return None


def _settings_digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value if value is not None else {})).hexdigest()


# --- withdrawals -------------------------------------------------------------------------------------------


def withdrawal_notices(governance: SiteGovernance) -> list[WithdrawalNotice]:
    """Every withdrawal notice in the site's log (to send, or send again: the orchestrator is idempotent)."""
    notices = []
    for entry in read_stored_log(governance.engine).entries:
        if entry.type == AuditEventType.CONSENT_WITHDRAWN and "notice_id" in entry.payload:
            notices.append(
                WithdrawalNotice(
                    notice_id=str(entry.payload["notice_id"]),
                    purpose=str(entry.payload["purpose"]),
                    withdrawn_at=datetime.fromisoformat(str(entry.payload["withdrawn_at"])),
                    snapshot_hashes=tuple(str(h) for h in entry.payload["affected_snapshots"]),
                )
            )
    return notices


def report_withdrawals(
    home: SiteHome, notices: Iterable[WithdrawalNotice], *, identity: IdentityKey | None = None
) -> list[str]:
    """Send withdrawal notices (never a patient id) to the orchestrator, authenticated as this site. Returns
    the digests of the model versions the orchestrator flagged. Raises :class:`ServiceUnavailableError` if
    it cannot be reached.

    The orchestrator knows a consent snapshot only by the keyed commitments this site attested to it (one
    per task), so each notice goes out with those commitments in place of the snapshot hashes."""
    engine = site_engine(home.database_path)
    try:
        notices = [
            WithdrawalNotice(
                notice_id=n.notice_id,
                purpose=n.purpose,
                withdrawn_at=n.withdrawn_at,
                snapshot_hashes=tuple(
                    commitments_to(engine, CommitmentKind.CONSENT_SNAPSHOT, n.snapshot_hashes)
                ),
            )
            for n in notices
        ]
    finally:
        engine.dispose()
    client = OrchestratorClient(
        home.orchestrator,
        home.name,
        identity or home.identity(),
        ca_pem=home.ca_pem(),
        retry=RetryPolicy(base_s=0.2, max_s=2.0, max_elapsed_s=15.0),
    )
    flagged: list[str] = []
    try:
        for notice in notices:
            # the client's own call: retries, an answer bounded in size and time, any error body a refusal
            try:
                response = client.call(
                    "sending a withdrawal notice", "POST", WITHDRAWALS_PATH, json=notice.to_json()
                )
            except OrchestratorRefused as exc:
                raise ConfigError(
                    f"the orchestrator refused withdrawal notice {notice.notice_id}: {exc.status} {exc}"
                ) from exc
            try:
                answer = pydantic_core.from_json(response.content)
            except ValueError:
                answer = None
            listed = answer.get("flagged") if isinstance(answer, dict) else None
            if not isinstance(listed, list) or not all(isinstance(d, str) for d in listed):
                raise ServiceUnavailableError(
                    f"the orchestrator's answer to withdrawal notice {notice.notice_id} is not a list of "
                    "flagged model versions"
                )
            flagged.extend(listed)
    finally:
        client.close()
    return sorted(set(flagged))
