"""Governance at the orchestrator: its audit log, round commitments, provenance, and the routes for them.

:class:`GovernanceExtension` plugs into the round engine as an observer and adds routes:

- The orchestrator keeps its own hash-chained log (``gov_audit_entries`` in its database, signed with the
  orchestrator's signing key): site enrollments (with the public key), owner signing keys, studies submitted
  (spec hash, signature), every task's outcome (a site's refusal as ``task.refused`` with the site's rule and
  reason), budget spends the sites attest, each model version released, and each round's commitment.
- At the end of every round it appends a ``round.committed`` entry holding the log head each participating
  site attested with its result or refusal (:func:`fedhealth.governance.commit_round`); the next tasks sent
  to those sites carry that commitment (``Task.commitments``) and each site logs it, so neither side can
  rewrite its log before those points unnoticed.
- Each model version gets its provenance (parent, round, contributing sites with their dataset fingerprints
  and consent snapshots, spec hash, software version, DP parameters, epsilon per site), and the evaluation
  round's per-site metrics are recorded for the model card.
- A site reports a consent withdrawal as snapshot hashes (``POST /api/v1/agent/governance/withdrawals``,
  authenticated as that site); every version trained on one of those snapshots *at that site*, and every
  version derived from one, is flagged.
- Spec signatures: a researcher registers an Ed25519 public key once (``PUT /api/v1/governance/owner-key``;
  an admin may replace it), then submits ``{spec, signature}`` to ``POST /api/v1/governance/studies``; the
  orchestrator verifies the signature against the registered key and forwards signature and key in every
  task, so each site can check that the spec is the one its owner signed. The plain ``POST /api/v1/studies``
  still accepts unsigned specs (sites see them as unsigned).

Everything the observer remembers across requests (owner keys, signatures, commitments, enrollments) is read
back from the log itself, incrementally, so a restarted orchestrator, or another orchestrator process on the
same PostgreSQL database, sees the same state.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections import deque
from collections.abc import Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine, select

import fedhealth
from fedhealth.core import ConflictError, CryptoError, FedHealthError, InputError, NotFoundError
from fedhealth.crypto import PublicIdentity
from fedhealth.governance import (
    GOVERNANCE_METADATA,
    AuditEventType,
    AuditLog,
    LogHead,
    ModelProvenance,
    ProvenanceStore,
    SignedSpec,
    commit_round,
    export_stored_log,
    model_card_markdown,
    parse_public_key,
    record_task_refusal,
    spec_hash,
    to_prov_json,
)
from fedhealth.orchestrator._auth import Principal
from fedhealth.orchestrator._hooks import NullObserver
from fedhealth.orchestrator._http import Admin, ApiError, ApprovalWait, Reader, Researcher, Site, Svc
from fedhealth.orchestrator._report import study_info
from fedhealth.orchestrator._service import (
    ExtensionContext,
    OrchestratorService,
    OrchestratorSettings,
    Registration,
)
from fedhealth.orchestrator._store import (
    ModelVersion,
    RoundRow,
    SiteStatus,
    Store,
    StudyRow,
    TaskRow,
    shown_id,
)
from fedhealth.protocol import (
    FailureCode,
    LogHeadInfo,
    RoundCommitment,
    SiteAttestation,
    StudyInfo,
    StudySpec,
    Task,
    TaskKind,
    TaskStatus,
)
from fedhealth.runtime import recipe_capabilities, site_level_epsilon

log = logging.getLogger("fedhealth.orchestrator")

ACTOR = "orchestrator"
# What a provenance record says for a site that stated no fingerprint or snapshot (a synthetic model reads
# no data; a client that attests nothing): never a made-up digest of data.
NO_DATA = "no-data"
UNATTESTED = "unattested"
NO_SNAPSHOT = "0" * 64  # "no consent snapshot": a site that read no patient rows, or did not attest one
# failure codes of the site agent that mean "could not", not "would not": logged as failed, not refused
FAILURE_CODES = frozenset(c.value for c in FailureCode if not c.is_refusal)
# commitments a task carries per site: the newest few that hold the site's head (the site skips known ones)
COMMITMENTS_PER_TASK = 4
DEFAULT_INTENDED_USE = "Research within the study named above. Not validated for clinical decisions."

# what an evaluation task's metrics say about training (zero or absent there): left out of the model card
_TRAINING_METRICS = frozenset({"num_samples", "train_loss", "duration_s"})
_REFUSALS = frozenset(c.value for c in FailureCode if c.is_refusal)
_ENTRIES = GOVERNANCE_METADATA.tables["gov_audit_entries"]
_WATCHED = (
    AuditEventType.ENROLLMENT.value,
    AuditEventType.STUDY_SUBMITTED.value,
    AuditEventType.CONFIGURATION_CHANGED.value,
    AuditEventType.ROUND_COMMITTED.value,
)


# --- wire bodies of the governance routes ------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OwnerKeyBody(_Body):
    public_key: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="Ed25519 public key, hex")]


class SignedStudyBody(_Body):
    spec: StudySpec
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$", description="Ed25519 signature, hex")]


_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"


class WithdrawalBody(_Body):
    """A site's :class:`fedhealth.governance.WithdrawalNotice`: snapshot hashes, never a patient id."""

    # no control characters: they mean nothing here, and PostgreSQL refuses a NUL in any text it stores
    notice_id: Annotated[str, Field(min_length=1, max_length=200, pattern=_PRINTABLE)]
    purpose: Annotated[str, Field(min_length=1, max_length=200, pattern=_PRINTABLE)]
    withdrawn_at: Annotated[str, Field(max_length=40, pattern=_PRINTABLE)]
    snapshot_hashes: Annotated[
        list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]], Field(max_length=10_000)
    ]


class ProvenanceFormat(StrEnum):
    JSON = "json"
    PROV_JSON = "prov-json"


# --- the observer ------------------------------------------------------------------------------------------


class GovernanceObserver(NullObserver):
    """Keeps the orchestrator's audit log and provenance as studies move (module docstring)."""

    def __init__(self, store: Store, settings: OrchestratorSettings) -> None:
        self.store = store
        self.engine: Engine = store.engine
        self.log = AuditLog(self.engine, settings.signing_key, ACTOR, settings.clock)
        self.provenance = ProvenanceStore(self.engine, audit_log=self.log)
        self.public_key = settings.signing_key.public()
        self._seen_seq = 0
        self._owner_keys: dict[str, PublicIdentity] = {}
        self._signatures: dict[str, tuple[str, str]] = {}  # study id -> (signature hex, owner key hex)
        self._commitments: dict[str, deque[RoundCommitment]] = {}
        self._enrolled: dict[str, str] = {}  # site -> public key hex, as logged
        self._pending: dict[str, tuple[str, str]] = {}  # spec hash -> signature, key (being submitted)
        self._refresh()
        self._sync_enrollments()

    # --- state read back from the log ----------------------------------------------------------------------

    def _refresh(self) -> None:
        """Read the entries appended since the last call (by this process or another) that state things."""
        c = _ENTRIES.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(c.seq, c.type, c.payload, c.entry_hash, c.signature)
                .where((c.log_id == self.log.log_id) & (c.seq > self._seen_seq) & c.type.in_(_WATCHED))
                .order_by(c.seq)
            ).all()
        for seq, kind, text, digest, signature in rows:
            self._seen_seq = max(self._seen_seq, int(seq))
            try:
                head = LogHead(seq=int(seq), entry_hash=str(digest), signature=bytes.fromhex(signature))
                self._learn(head, str(kind), json.loads(text))
            except (ValueError, KeyError, TypeError, FedHealthError):
                log.warning("audit entry %s (%s) could not be read back; skipped", seq, kind)

    def _learn(self, head: LogHead, kind: str, payload: dict[str, Any]) -> None:
        if kind == AuditEventType.ENROLLMENT.value:
            self._enrolled[payload["site"]] = payload["public_key"]
        elif kind == AuditEventType.CONFIGURATION_CHANGED.value and payload.get("setting") == "owner_key":
            key = parse_public_key(payload["public_key"])
            if key is not None:
                self._owner_keys[payload["user"]] = key
        elif kind == AuditEventType.STUDY_SUBMITTED.value and payload.get("signature"):
            self._signatures[payload["study_id"]] = (payload["signature"], payload["owner_key"])
        elif kind == AuditEventType.ROUND_COMMITTED.value:
            commitment = RoundCommitment(
                study_id=payload["study_id"],
                round=payload["round"],
                model_digest=payload.get("model_digest"),
                orchestrator_head=LogHeadInfo.of(head),
            )
            for site in payload.get("site_heads", {}):
                self._commitments.setdefault(site, deque(maxlen=COMMITMENTS_PER_TASK)).append(commitment)

    def _sync_enrollments(self) -> None:
        """Log every enrolled site's public key once (and again after a re-enrollment with a new key)."""
        self._refresh()  # the enrollment route logs each enrollment itself: learn those first
        for site in self.store.list_sites():
            if (
                site.status is SiteStatus.ACTIVE
                and site.public_key
                and self._enrolled.get(site.name) != site.public_key
            ):
                self.log.append(
                    AuditEventType.ENROLLMENT,
                    {
                        "site": site.name,
                        "public_key": site.public_key,
                        "enrolled_at": site.enrolled_at.isoformat() if site.enrolled_at else None,
                    },
                )
                self._enrolled[site.name] = site.public_key

    def owner_key(self, user: str) -> PublicIdentity | None:
        self._refresh()
        return self._owner_keys.get(user)

    def register_owner_key(self, user: str, key: PublicIdentity, *, by: str) -> None:
        self.log.append(
            AuditEventType.CONFIGURATION_CHANGED,
            {
                "setting": "owner_key",
                "user": user,
                "public_key": key.raw.hex(),
                "fingerprint": key.fingerprint,
                "by": by,
            },
            actor=f"user:{by}",
        )
        self._refresh()

    def expect_signature(self, digest: str, signature: str, key: PublicIdentity) -> None:
        """The next study created with this spec hash was submitted with this verified signature."""
        self._pending[digest] = (signature, key.raw.hex())

    def forget_signature(self, digest: str) -> None:
        self._pending.pop(digest, None)

    def signature_of(self, study_id: str) -> tuple[str, str] | None:
        """(signature hex, owner key hex) of a signed study's spec; None if it was submitted unsigned."""
        self._refresh()
        return self._signatures.get(study_id)

    # --- observer events -----------------------------------------------------------------------------------

    def study_created(self, study: StudyRow, owner: str) -> None:
        self._sync_enrollments()
        digest = spec_hash(study.spec.model_dump(mode="json"))
        signed = self._pending.pop(digest, None)
        payload: dict[str, Any] = {
            "spec_hash": digest,
            "study": study.name,
            "study_id": study.id,
            "owner": owner,
            "signed": signed is not None,
            "purpose": study.spec.purpose,
            "train_sites": list(study.spec.train_sites),
            "eval_sites": list(study.spec.evaluation_sites),
        }
        if signed is not None:
            payload["signature"], payload["owner_key"] = signed
        self.log.append(AuditEventType.STUDY_SUBMITTED, payload, actor=f"user:{owner}")
        self._refresh()
        # the study's initial model is the root of its lineage
        self._record(
            ModelProvenance(
                model_digest=study.model_digest,
                parent_digest=None,
                study_id=study.id,
                round=0,
                n_sites=0,
                dataset_fingerprints={},
                consent_snapshots={},
                spec_hash=digest,
                software_version=fedhealth.__version__,
                dp_params=provenance_dp_params(study.spec, 0),
                created_at=study.created_at,
            )
        )

    def task_closed(self, task: TaskRow) -> None:
        if task.site not in self._enrolled:
            self._sync_enrollments()
        number = self.store.get_round(task.round_id).number
        base: dict[str, Any] = {
            "task_id": task.id,
            "study_id": task.study_id,
            "site": task.site,
            "round": number,
            "kind": task.kind.value,
        }
        head = task.attestation.audit_head if task.attestation is not None else None
        if head is not None:
            base["site_head"] = {"seq": head.seq, "hash": head.hash}
        if task.status is TaskStatus.FAILED:
            code, _, _ = (task.reason or "").partition(": ")
            if code in _REFUSALS:
                # the code's own fixed sentence, never text the site composed (it could carry PHI)
                record_task_refusal(
                    self.log,
                    task_id=task.id,
                    study_id=task.study_id,
                    rule=code,
                    reason=FailureCode(code).message,
                    site=task.site,
                    round=number,
                    spec_hash=spec_hash(self.store.spec(task.study_id).model_dump(mode="json")),
                )
                return
        payload = {**base, "outcome": task.status.value}
        if task.status is not TaskStatus.COMPLETED and task.reason:
            payload["reason"] = task.reason
        if task.result_digest:
            payload["result_digest"] = task.result_digest
        self.log.append(AuditEventType.TASK_COMPLETED, payload)
        privacy = task.attestation.privacy if task.attestation is not None else None
        if privacy is not None:
            # what the site's ledger attested with this task (the site's own log holds its charge)
            self.log.append(AuditEventType.BUDGET_SPENT, {**base, **privacy.model_dump(mode="json")})

    def tasks_closed(self, tasks: list[TaskRow]) -> None:
        with self.log.batch():  # one commit for the lot
            for task in tasks:
                self.task_closed(task)

    def round_finished(
        self, study: StudyRow, round_row: RoundRow, tasks: list[TaskRow], version: ModelVersion | None
    ) -> None:
        # Provenance first (it writes to the orchestrator's database, which may hold the log too), then the
        # round's audit entries in one commit: this runs between a round's close and the next one's tasks.
        if version is not None:
            self._record(self._provenance(study, round_row, tasks, version))
        if round_row.kind is TaskKind.EVALUATE:
            self._record_metrics(round_row, tasks)
        heads = {
            t.site: LogHead.from_json(t.attestation.audit_head.to_head_json())
            for t in tasks
            if t.attestation is not None and t.attestation.audit_head is not None
        }
        with self.log.batch():
            if round_row.kind is TaskKind.COLLECTIVE:
                self._session_ended(study, round_row, tasks)
            if version is not None:
                self._release(
                    study,
                    round_row,
                    version,
                    sites=sorted(t.site for t in tasks if t.status is TaskStatus.COMPLETED),
                )
            if heads:
                model = version.digest if version is not None else round_row.model_in_digest
                commit_round(
                    self.log, study_id=study.id, round=round_row.number, model_digest=model, site_heads=heads
                )
        if heads:
            self._refresh()

    def _session_ended(self, study: StudyRow, round_row: RoundRow, tasks: list[TaskRow]) -> None:
        """One entry per collective session, when it ends: who took part, when, how many collectives ran,
        and how it ended (a session's calls are not audited one by one: there can be thousands)."""
        session = (round_row.metrics or {}).get("session") or {}
        self.log.append(
            AuditEventType.SESSION_ENDED,
            {
                "study_id": study.id,
                "round": round_row.number,
                "sites": sorted(t.site for t in tasks),
                "outcome": round_row.status.value,
                "calls": int(session.get("calls", 0)),
                "attempt": session.get("attempt"),
                "started_at": round_row.started_at.isoformat(),
                "ended_at": round_row.ended_at.isoformat() if round_row.ended_at else None,
                "reason": round_row.reason,
                "spec_hash": spec_hash(study.spec.model_dump(mode="json")),
            },
        )

    def _provenance(
        self, study: StudyRow, round_row: RoundRow, tasks: list[TaskRow], version: ModelVersion
    ) -> ModelProvenance:
        completed = [t for t in tasks if t.status is TaskStatus.COMPLETED]
        fingerprints: dict[str, str] = {}
        snapshots: dict[str, str] = {}
        consent_models: dict[str, str] = {}
        no_data = not recipe_capabilities(study.spec.recipe).reads_data
        for t in completed:
            attestation = t.attestation
            fingerprint = attestation.dataset_fingerprint if attestation is not None else None
            fingerprints[t.site] = fingerprint or (NO_DATA if no_data else UNATTESTED)
            snapshot = attestation.consent_snapshot if attestation is not None else None
            snapshots[t.site] = snapshot or NO_SNAPSHOT
            if attestation is not None and attestation.consent_model is not None:
                consent_models[t.site] = attestation.consent_model.value
        epsilons = provenance_epsilons(study.spec, {t.site: t.attestation for t in completed})
        return ModelProvenance(
            model_digest=version.digest,
            parent_digest=version.parent_digest,
            study_id=study.id,
            round=round_row.number,
            n_sites=len(fingerprints),
            dataset_fingerprints=fingerprints,
            consent_snapshots=snapshots,
            spec_hash=spec_hash(study.spec.model_dump(mode="json")),
            software_version=fedhealth.__version__,
            dp_params=provenance_dp_params(study.spec, round_row.number),
            epsilon_spent=epsilons,
            consent_models=consent_models,
            created_at=version.created_at,
        )

    def _release(
        self, study: StudyRow, round_row: RoundRow, version: ModelVersion, *, sites: list[str]
    ) -> None:
        self.log.append(
            AuditEventType.MODEL_RELEASED,
            {
                "model_digest": version.digest,
                "parent_digest": version.parent_digest,
                "study_id": study.id,
                "round": round_row.number,
                "sites": sites,
            },
        )

    def _record(self, provenance: ModelProvenance) -> None:
        try:
            self.provenance.record(provenance)
        except ConflictError:
            # content addressing: another study produced byte-identical parameters (same recipe, seed and
            # data); its provenance stays, and this study's release is still in the log
            log.info("model %s already has provenance from another study", provenance.model_digest[:16])
        except NotFoundError:
            log.warning(
                "model %s: its parent has no provenance; recorded as a root", provenance.model_digest[:16]
            )
            fields = provenance.to_json()
            fields["parent_digest"] = None
            self._record(ModelProvenance.from_json(fields))

    def _record_metrics(self, round_row: RoundRow, tasks: list[TaskRow]) -> None:
        for t in tasks:
            if t.status is TaskStatus.COMPLETED and t.metrics is not None:
                values = {
                    k: float(v)
                    for k, v in t.metrics.model_dump().items()
                    if isinstance(v, int | float) and k not in _TRAINING_METRICS
                }
                try:
                    self.provenance.record_metrics(round_row.model_in_digest, t.site, values)
                except NotFoundError:
                    log.warning("no provenance for the evaluated model %s", round_row.model_in_digest[:16])
                    return

    def decorate_task(self, task: Task) -> Task:
        try:
            self._refresh()
            site = self.store.get_task(task.task_id).site
            if site not in self._enrolled:
                self._sync_enrollments()
            update: dict[str, Any] = {}
            commitments = list(self._commitments.get(site, ()))
            if commitments:
                update["commitments"] = [*task.commitments, *commitments]
            signed = self._signatures.get(task.study_id)
            if signed is not None:
                update["spec_signature"], update["owner_public_key"] = signed
            return task.model_copy(update=update) if update else task
        except Exception:  # a task must still go out: without its commitments, never not at all
            log.exception("could not add the governance fields to task %s", task.task_id)
            return task

    # --- withdrawals ---------------------------------------------------------------------------------------

    def withdrawal(self, site: str, body: WithdrawalBody) -> list[str]:
        """Log a site's withdrawal notice and flag the model versions it affects; returns their digests."""
        flags = self.provenance.flag_withdrawal(body.snapshot_hashes, site=site, notice_id=body.notice_id)
        self.log.append(
            AuditEventType.CONSENT_WITHDRAWN,
            {
                "site": site,
                "notice_id": body.notice_id,
                "purpose": body.purpose,
                "withdrawn_at": body.withdrawn_at,
                "affected_snapshots": sorted(set(body.snapshot_hashes)),
                "flagged_models": [f.model_digest for f in flags],
            },
            actor=f"site:{site}",
        )
        return [f.model_digest for f in flags]


def provenance_dp_params(spec: StudySpec, rounds: int | None = None) -> dict[str, Any]:
    """A version's DP parameters: the spec's privacy section, and what its epsilons mean. ``epsilon_spent``
    is record level (each site's patients, as its ledger charges them) at ``epsilon_delta`` (the spec's
    delta) in every mode; site modes add ``site_level_epsilon``, a whole site's participation over the
    first ``rounds`` rounds at the same delta."""
    if spec.privacy is None:
        return {}
    params = spec.privacy.model_dump(mode="json", exclude_none=True)
    params["level"] = "record"
    params["epsilon_delta"] = spec.privacy.delta
    site_level = site_level_epsilon(spec, rounds) if rounds != 0 else None  # the initial model: none yet
    if site_level is not None and math.isfinite(site_level):
        params["site_level_epsilon"] = site_level
    return dict(params)


def provenance_epsilons(
    spec: StudySpec, attestations: Mapping[str, SiteAttestation | None]
) -> dict[str, float]:
    """Each site's cumulative record-level epsilon for the study at the spec's delta, as its ledger attested
    it. A site that stated it only at its budget's delta is left out: that figure beside the spec's delta
    would overstate the guarantee (a budget at delta 1e-3 gives a smaller epsilon than 1e-5 does)."""
    if spec.privacy is None:
        return {}
    out: dict[str, float] = {}
    for site, attestation in attestations.items():
        spent = attestation.privacy if attestation is not None else None
        if spent is None or spent.spec_study_epsilon is None or spent.spec_delta != spec.privacy.delta:
            continue
        out[site] = spent.spec_study_epsilon
    return out


def site_anchor_heads(entries: Iterable[Any], site: str) -> list[dict[str, Any]]:
    """The heads of ``site``'s log held by the orchestrator's round commitments, with their round."""
    out = []
    for entry in entries:
        if entry.type == AuditEventType.ROUND_COMMITTED:
            head = entry.payload.get("site_heads", {}).get(site)
            if head is not None:
                out.append({**head, "study_id": entry.payload["study_id"], "round": entry.payload["round"]})
    return out


# --- the extension -----------------------------------------------------------------------------------------


class GovernanceExtension:
    """The orchestrator's governance: observer (audit, commitments, provenance) and routes.

    The observer is this extension's state: built when the orchestrator starts, read by its own routes.
    """

    def __init__(self) -> None:
        self._observer: GovernanceObserver | None = None

    def start(self, context: ExtensionContext) -> Registration:
        self._observer = GovernanceObserver(context.store, context.settings)
        return Registration(observer=self._observer, spec_signatures=self._observer.signature_of)

    @property
    def observer(self) -> GovernanceObserver:
        """The running observer (404 before the orchestrator started this extension)."""
        if self._observer is None:
            raise ApiError(404, "governance is not enabled on this orchestrator")
        return self._observer

    def routers(self) -> list[APIRouter]:
        return [_operator_router(self), _agent_router(self)]


# --- handlers: plain functions of the service and the extension's observer --------------------------------


def register_signing_key(observer: GovernanceObserver, user: Principal, body: OwnerKeyBody) -> dict[str, str]:
    """Register the caller's spec-signing key; a different key than the one registered is 409."""
    key = _key(body.public_key)
    current = observer.owner_key(user.name)
    if current is not None and current != key:
        raise ApiError(409, "a different signing key is registered for you; an admin may replace it")
    if current is None:
        observer.register_owner_key(user.name, key, by=user.name)
    return {"user": user.name, "fingerprint": key.fingerprint}


def set_owner_key(
    svc: OrchestratorService, observer: GovernanceObserver, admin: Principal, name: str, body: OwnerKeyBody
) -> dict[str, str]:
    """An admin sets or replaces a user's spec-signing key (404 for an unknown user)."""
    if svc.store.get_user(name) is None:
        raise ApiError(404, f"user {shown_id(name)} does not exist")
    key = _key(body.public_key)
    observer.register_owner_key(name, key, by=admin.name)
    return {"user": name, "fingerprint": key.fingerprint}


async def submit_signed_study(
    svc: OrchestratorService,
    observer: GovernanceObserver,
    owner: Principal,
    body: SignedStudyBody,
    approval_wait_s: float | None = None,
) -> StudyInfo:
    """Store a study its owner signed, once the signature verifies against the owner's registered key."""
    spec = body.spec
    if spec.owner != owner.name:
        raise ApiError(422, "invalid study", f"the spec's owner must be the submitting user ({owner.name!r})")
    key = observer.owner_key(owner.name)
    if key is None:
        raise ApiError(409, "no signing key is registered for you: PUT /api/v1/governance/owner-key first")
    signed = SignedSpec(
        spec=spec.model_dump(mode="json"),
        owner=owner.name,
        signature=bytes.fromhex(body.signature),
        owner_key=key,
    )
    try:
        signed.verify({owner.name: key})
    except CryptoError as exc:
        raise ApiError(422, "invalid study signature", str(exc) or "the signature does not verify") from exc
    observer.expect_signature(signed.spec_hash, body.signature, key)
    try:
        study = await svc.engine.create_study(spec, owner.name, approval_wait_s=approval_wait_s)
    except NotFoundError as exc:
        raise ApiError(422, "invalid study", str(exc)) from exc
    finally:
        observer.forget_signature(signed.spec_hash)
    return study_info(svc.store, study.id)


# --- routes ------------------------------------------------------------------------------------------------


def _operator_router(governance: GovernanceExtension) -> APIRouter:
    router = APIRouter(prefix="/api/v1/governance", tags=["governance"])

    @router.get("/audit", response_class=PlainTextResponse)
    async def export_audit(svc: Svc, _: Reader) -> PlainTextResponse:
        """The orchestrator's audit log as JSON Lines (header with the writer key, then one entry a line)."""
        observer = governance.observer

        def export() -> str:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "audit.jsonl"
                export_stored_log(observer.engine, path, log_id=observer.log.log_id)
                return path.read_text(encoding="utf-8")

        return PlainTextResponse(await anyio.to_thread.run_sync(export), media_type="application/x-ndjson")

    @router.get("/audit/verify")
    async def verify_audit(svc: Svc, _: Reader) -> dict[str, Any]:
        """Verify the orchestrator's log against the orchestrator's own key; name the first bad entry."""
        observer = governance.observer
        key = observer.public_key
        report = await anyio.to_thread.run_sync(lambda: observer.log.verify({key.fingerprint: key}))
        bad = report.first_bad
        return {
            "ok": report.ok,
            "checked": report.checked,
            "head": report.head.to_json(),
            "first_bad": None
            if bad is None
            else {"seq": bad.seq, "problem": bad.problem.value, "detail": bad.detail},
            "summary": report.summary(),
            "public_key": key.raw.hex(),
        }

    @router.get("/anchors/{site}")
    async def anchors(svc: Svc, _: Reader, site: str) -> dict[str, Any]:
        """The heads of a site's log that the orchestrator's round commitments hold."""
        observer = governance.observer
        entries = await anyio.to_thread.run_sync(observer.log.entries)
        return {"site": site, "heads": site_anchor_heads(entries, site)}

    @router.get("/models/{model}/provenance")
    async def provenance(
        svc: Svc,
        _: Reader,
        model: str,
        fmt: Annotated[ProvenanceFormat, Query(alias="format")] = ProvenanceFormat.JSON,
    ) -> dict[str, Any]:
        """A model version's lineage, newest first, with the consent-withdrawal flags on each version."""
        store = governance.observer.provenance

        def read() -> dict[str, Any]:
            lineage = store.lineage(store.resolve(model))
            flags = [f for p in lineage for f in store.flags(p.model_digest)]
            if fmt is ProvenanceFormat.PROV_JSON:
                return to_prov_json(lineage, flags=flags)
            return {"lineage": [p.to_json() for p in lineage], "flags": [f.to_json() for f in flags]}

        return await anyio.to_thread.run_sync(read)

    @router.get("/models/{model}/card", response_class=PlainTextResponse)
    async def card(
        svc: Svc,
        _: Reader,
        model: str,
        intended_use: Annotated[str, Query(max_length=4000)] = DEFAULT_INTENDED_USE,
    ) -> PlainTextResponse:
        """The model card (Markdown): intended use, data, per-site metrics, privacy guarantee, consent."""
        store = governance.observer.provenance

        def render() -> str:
            digest = store.resolve(model)
            return model_card_markdown(
                store.lineage(digest),
                intended_use=intended_use,
                site_metrics=store.metrics(digest),
                flags=store.flags(digest),
            )

        return PlainTextResponse(await anyio.to_thread.run_sync(render), media_type="text/markdown")

    @router.put("/owner-key")
    async def register_own_key(svc: Svc, user: Researcher, body: OwnerKeyBody) -> dict[str, str]:
        """Register the caller's spec-signing key. Once set, only an admin may replace it."""
        return register_signing_key(governance.observer, user, body)

    @router.put("/owner-keys/{name}")
    async def replace_key(svc: Svc, admin: Admin, name: str, body: OwnerKeyBody) -> dict[str, str]:
        """An admin sets or replaces a user's spec-signing key."""
        return set_owner_key(svc, governance.observer, admin, name, body)

    @router.post("/studies", response_model=StudyInfo, status_code=201)
    async def create_signed_study(
        svc: Svc, owner: Researcher, body: SignedStudyBody, approval_wait_s: ApprovalWait = None
    ) -> StudyInfo:
        """Submit a study signed by its owner (the signature is checked against the registered key)."""
        return await submit_signed_study(svc, governance.observer, owner, body, approval_wait_s)

    return router


def _agent_router(governance: GovernanceExtension) -> APIRouter:
    router = APIRouter(prefix="/api/v1/agent/governance", tags=["agent"])

    @router.post("/withdrawals")
    async def withdrawal(svc: Svc, site: Site, body: WithdrawalBody) -> dict[str, Any]:
        """A site reports a consent withdrawal (snapshot hashes only); affected model versions are flagged."""
        flagged = governance.observer.withdrawal(site, body)
        return {"notice_id": body.notice_id, "flagged": flagged}

    return router


def _key(hex_key: str) -> PublicIdentity:
    key = parse_public_key(hex_key)
    if key is None:
        raise InputError("public_key is not an Ed25519 public key")
    return key
