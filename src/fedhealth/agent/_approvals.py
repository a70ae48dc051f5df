"""A site's side of study approvals: the specs awaiting its data steward, the steward's review, the reports.

- :func:`sync_approvals` fetches the specs of the studies awaiting this site
  (``GET /api/v1/agent/approvals``), verifies each owner's signature, registers the spec locally
  (``pending`` for the steward), and reports any decision the steward already made on one of them. The
  agent runs it between polls; ``fedhealth site approvals`` runs it before listing.
- :func:`review` is what ``fedhealth site approvals show HASH`` records: the steward displayed the full spec
  and its plain-language summary (a ``study.reviewed`` entry in the site's log). ``fedhealth site approve``
  refuses a hash without one: a steward approves what they have read, not a hash alone.
- :func:`report_decision` tells the orchestrator the steward's decision (state only; the reason stays here).

The site's gate still checks the approval on every task: what the orchestrator is told only lets a study
start without a round that would fail for want of a decision.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, select

from fedhealth.agent._client import OrchestratorClient, RetryPolicy
from fedhealth.agent._datasets import DatasetSummary, columns_used
from fedhealth.agent._governance import SiteGovernance, requested_epsilon
from fedhealth.agent._home import SiteHome
from fedhealth.core import CryptoError, FedHealthError, InputError, ServiceUnavailableError
from fedhealth.crypto import PublicIdentity
from fedhealth.governance import (
    GOVERNANCE_METADATA,
    ApprovalRegistry,
    ApprovalStatus,
    AuditEventType,
    AuditLog,
    SignedSpec,
    StudyApproval,
)
from fedhealth.learning import CombinationPattern, RecipeError
from fedhealth.protocol import (
    ApprovalReport,
    ApprovalState,
    DpMode,
    PendingSpec,
    PendingSpecs,
    StudySpec,
    TaskKind,
    secure_round_plan,
)
from fedhealth.runtime import study_recipe

log = logging.getLogger("fedhealth.agent")
APPROVALS_PATH = "/api/v1/agent/approvals"
_ENTRIES = GOVERNANCE_METADATA.tables["gov_audit_entries"]


def site_client(home: SiteHome, *, url: str | None = None, max_elapsed_s: float = 15.0) -> OrchestratorClient:
    """A client authenticated as this site, for one-off requests from the steward's commands."""
    return OrchestratorClient(
        url or home.orchestrator,
        home.name,
        home.identity(),
        ca_pem=home.ca_pem(),
        client_cert=home.client_cert(),
        retry=RetryPolicy(base_s=0.2, max_s=2.0, max_elapsed_s=max_elapsed_s),
    )


def fetch_pending(client: OrchestratorClient) -> list[PendingSpec]:
    response = client.call("fetching the specs awaiting approval", "GET", APPROVALS_PATH)
    try:
        return PendingSpecs.model_validate_json(response.content).specs
    except ValueError as exc:  # pydantic's ValidationError: tried again at the next synchronisation
        raise ServiceUnavailableError(
            "the specs awaiting approval: the answer is not a list of specs"
        ) from exc


def report_decision(client: OrchestratorClient, spec_hash: str, state: ApprovalState) -> None:
    body = ApprovalReport(spec_hash=spec_hash, state=state)
    client.call(
        "reporting the steward's decision",
        "POST",
        APPROVALS_PATH,
        content=body.model_dump_json(),
        headers={"Content-Type": "application/json"},
    )


def report_approval(
    home: SiteHome, spec_hash: str, *, approved: bool, url: str | None = None, max_elapsed_s: float = 15.0
) -> None:
    """Tell the orchestrator this site's steward approved (or rejected) ``spec_hash``."""
    client = site_client(home, url=url, max_elapsed_s=max_elapsed_s)
    try:
        report_decision(client, spec_hash, ApprovalState.APPROVED if approved else ApprovalState.REJECTED)
    finally:
        client.close()


def register_pending(governance: SiteGovernance, pending: PendingSpec) -> StudyApproval:
    """Register a pending spec for the steward; a signed one must verify under its enclosed owner key."""
    body = pending.spec.model_dump(mode="json")
    signed = None
    if pending.spec_signature is not None or pending.owner_public_key is not None:
        try:
            signed = SignedSpec(
                spec=body,
                owner=pending.spec.owner,
                signature=bytes.fromhex(pending.spec_signature or ""),
                owner_key=PublicIdentity(bytes.fromhex(pending.owner_public_key or "")),
            )
        except ValueError as exc:
            raise CryptoError(f"study {pending.study_id}: malformed owner signature") from exc
    record = governance.submit(body, signed)
    if record.spec_hash != pending.spec_hash:
        raise InputError(f"study {pending.study_id}: the spec does not hash to {pending.spec_hash[:12]}")
    return record


_STATE = {ApprovalStatus.APPROVED: ApprovalState.APPROVED, ApprovalStatus.REJECTED: ApprovalState.REJECTED}


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncResult:
    registered: tuple[str, ...]  # spec hashes awaiting this site's steward
    reported: tuple[str, ...]  # spec hashes whose decision was reported
    refused: tuple[str, ...]  # "study id: why" for specs that could not be registered (bad signature...)


def sync_approvals(governance: SiteGovernance, client: OrchestratorClient) -> SyncResult:
    """Fetch the specs awaiting this site, register them, and report the decisions already made."""
    registered: list[str] = []
    reported: list[str] = []
    refused: list[str] = []
    for pending in fetch_pending(client):
        try:
            record = register_pending(governance, pending)
        except (CryptoError, InputError) as exc:
            log.warning("study %s: spec not registered: %s", pending.study_id, exc)
            refused.append(f"{pending.study_id}: {exc}")
            continue
        state = _STATE.get(record.status)
        if state is None:
            registered.append(record.spec_hash)
        else:
            report_decision(client, record.spec_hash, state)
            reported.append(record.spec_hash)
    return SyncResult(registered=tuple(registered), reported=tuple(reported), refused=tuple(refused))


class ApprovalSync:
    """Runs :func:`sync_approvals` from the agent's loop at most every ``every_s`` seconds; never fatal."""

    def __init__(self, home: SiteHome, client: OrchestratorClient, *, every_s: float = 30.0) -> None:
        self.home = home
        self.client = client
        self.every_s = every_s
        self._next = 0.0
        self._governance: SiteGovernance | None = None

    def maybe_sync(self) -> None:
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.every_s
        try:
            if self._governance is None:
                self._governance = SiteGovernance(self.home)
            result = sync_approvals(self._governance, self.client)
        except FedHealthError as exc:
            log.warning("could not synchronise study approvals: %s", exc)
            return
        for digest in result.registered:
            log.info(
                "spec %s awaits the data steward (fedhealth site approvals show %s)", digest[:12], digest
            )

    def close(self) -> None:
        if self._governance is not None:
            self._governance.close()
            self._governance = None


# --- the steward's review ---------------------------------------------------------------------------------


def review(approvals: ApprovalRegistry, log: AuditLog, spec_hash: str, *, steward: str) -> StudyApproval:
    """Record that the steward displayed this spec in full (``fedhealth site approvals show``)."""
    record = approvals.get(spec_hash)
    log.append(
        AuditEventType.STUDY_REVIEWED,
        {"spec_hash": record.spec_hash, "study": record.study, "steward": steward},
        actor=f"steward:{steward}",
    )
    return record


def was_reviewed(engine: Engine, spec_hash: str) -> bool:
    """Whether a ``study.reviewed`` entry for this hash is in the site's log."""
    c = _ENTRIES.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(c.payload).where(
                (c.type == AuditEventType.STUDY_REVIEWED.value) & c.payload.contains(spec_hash)
            )
        ).all()
    return bool(rows)


def spec_summary(spec: StudySpec, site: str, dataset: DatasetSummary | None) -> list[str]:
    """The plain-language summary a steward reads before approving: what runs, on which columns, how often,
    under which protection, what it costs the privacy budget and what leaves the site."""
    try:
        resolved = study_recipe(spec.recipe)
    except RecipeError as exc:  # a recipe this site does not have: every task here would be refused
        resolved = None
        model = f"recipe {spec.recipe.name!r} (NOT installed at this site: {exc})"
        reads_data, n_params = True, 0
    else:
        model, reads_data = resolved.describe(), resolved.capabilities.reads_data
        rounds_recipe = resolved.pattern is CombinationPattern.ROUNDS
        n_params = sum(_size(s.shape) for s in resolved.param_specs()) if rounds_recipe else 0
    lines = [
        f"Study {spec.name!r} by {spec.owner!r}, for the purpose {spec.purpose!r}"
        + (f": {spec.description}" if spec.description else "."),
        f"Model: {model}; recipe {spec.recipe.name!r} version {spec.recipe.version}; combined by "
        f"{spec.strategy.name.value}.",
    ]
    if not reads_data:
        lines.append(f"Data: none is read (dataset {spec.dataset!r} is named but not opened).")
    else:
        lines.append("Data: " + columns_used(spec, dataset) + ".")
        width = resolved.data_schema().n_features if resolved is not None else None
        if dataset is not None and width is not None and len(dataset.features) != width:
            lines.append(
                f"WARNING: the model expects {width} features; this dataset has "
                f"{len(dataset.features)}, so every task here would fail."
            )
    role = []
    if site in spec.train_sites:
        role.append("trains")
    if site in spec.evaluation_sites:
        role.append("evaluates the final model")
    lines.append(
        f"Rounds: {spec.rounds} training round(s), then one evaluation round; each round waits at most "
        f"{spec.round_deadline_s:g} s and needs {spec.min_sites} of {len(spec.train_sites)} training "
        "site(s). "
        f"This site {' and '.join(role) or 'takes no part'}. Sites: {', '.join(spec.train_sites)}."
    )
    sa = spec.secure_aggregation
    n = len(spec.train_sites)
    if sa is not None:
        plan = secure_round_plan(spec, TaskKind.TRAIN)
        lines.append(
            f"Secure aggregation: on (SecAgg+ over {n} sites, threshold {plan.threshold}, tolerating "
            f"{plan.collusion} colluding site(s)): the orchestrator sees only the sum of the sites' updates "
            "and metrics, never this site's own; the spec names every site's key fingerprint."
        )
    else:
        lines.append("Secure aggregation: off: the orchestrator sees this site's update and metrics.")
    privacy = spec.privacy
    if privacy is None:
        lines.append("Differential privacy: none: the released model carries no formal privacy guarantee.")
    else:
        eps = requested_epsilon(spec, site)
        charge = (
            f"this study will charge at most epsilon = {eps:.3g} (delta = {privacy.delta:g}) "
            f"to this site's budget for {spec.dataset!r}"
            if eps is not None and eps != float("inf")
            else "its epsilon cannot be planned, so the site's budget will refuse it"
        )
        level = {
            DpMode.RECORD: "each patient's record (DP-SGD inside this site)",
            DpMode.SITE_CENTRAL: "each site's whole update (noise added by the orchestrator)",
            DpMode.SITE_DISTRIBUTED: "each site's whole update (noise shared among the sites)",
        }[privacy.mode]
        lines.append(f"Differential privacy: protects {level}; {charge}.")
    leaves = f"each training round, one model update of {n_params} numbers"
    if sa is None:
        leaves += " and this site's sample count, loss, accuracy and AUC"
    else:
        leaves += " masked inside the secure sum"
    lines.append(
        f"What leaves this site: {leaves}; after the last round, evaluation metrics; with every result, "
        "audit-log heads, the dataset's fingerprint and the consent snapshot hash. Never patient rows, "
        "ids, column values or file paths."
    )
    return lines


def _size(shape: Sequence[int]) -> int:
    size = 1
    for dim in shape:
        size *= int(dim)
    return size
