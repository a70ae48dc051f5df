"""The site's task gate: every governance check a task must pass, in order, each decision logged.

The agent calls :meth:`TaskGate.admit` when a task arrives, before it touches the dataset:

1. study approval (the exact spec hash) and the site-policy rules (recipe, owner, epsilon cap, secure
   aggregation): all evaluated and logged; the first refusal refuses the task. No data has been read.
2. only then the patient ids of the dataset are listed (``load_patient_ids``: ids only, no features),
   filtered by consent for the study's purpose on the task date (snapshot stored and logged), and
3. the cohort rule (at least k patients after consent) is checked.

A refused task gets a ``task.refused`` entry in the site log with the decision's reason; the agent sends the
refusal's ``rule`` alone as the ``TaskFailure.code``, and the orchestrator logs it with
:func:`record_task_refusal` and the code's fixed sentence (the site's own words never leave it). An
admitted task's ``consent.kept_indices`` are the only rows the agent may load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from fedhealth.governance._approval import ApprovalRegistry, spec_hash
from fedhealth.governance._audit import AuditEventType, AuditLog
from fedhealth.governance._consent import ConsentFilterResult, ConsentRegistry
from fedhealth.governance._decision import Decision, first_refusal, record_decision, record_task_refusal
from fedhealth.governance._policy import PolicyRequest, SitePolicy, check_cohort, evaluate_policy


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRequest:
    """What the gate needs to know about a task, taken from the task and its study spec by the agent.

    ``spec`` is the full spec the task claims (``StudySpec.model_dump(mode="json")``); ``purpose`` is the
    study's consent purpose code; ``requested_epsilon`` is None for a study without differential privacy.
    """

    task_id: str
    study_id: str
    round: int
    spec: Mapping[str, Any]
    purpose: str
    recipe: str
    owner: str
    dataset: str
    requested_epsilon: float | None
    secure_aggregation: bool
    epsilon_spent: float = 0.0

    def policy_request(self) -> PolicyRequest:
        return PolicyRequest(
            recipe=self.recipe,
            owner=self.owner,
            dataset=self.dataset,
            requested_epsilon=self.requested_epsilon,
            secure_aggregation=self.secure_aggregation,
            epsilon_spent=self.epsilon_spent,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    """The gate's answer: ``refusal`` is the first refusing decision; ``consent`` None if refused before."""

    spec_hash: str
    decisions: tuple[Decision, ...]
    refusal: Decision | None
    consent: ConsentFilterResult | None

    @property
    def allowed(self) -> bool:
        return self.refusal is None


class TaskGate:
    """Approval, policy, consent and cohort checks for one site, logged to the site's audit log."""

    def __init__(
        self,
        *,
        audit_log: AuditLog,
        approvals: ApprovalRegistry,
        policy: SitePolicy,
        consent: ConsentRegistry,
        site: str | None = None,
    ) -> None:
        self._log = audit_log
        self._approvals = approvals
        self._policy = policy
        self._consent = consent
        self._site = site

    @property
    def policy(self) -> SitePolicy:
        return self._policy

    def admit(
        self,
        request: TaskRequest,
        load_patient_ids: Callable[[], Sequence[str]],
        *,
        on: date | datetime | None = None,
    ) -> Admission:
        """Run every check; ``load_patient_ids`` is called only if approval and policy allow the task."""
        digest = spec_hash(request.spec)
        subject: dict[str, Any] = {
            "task_id": request.task_id,
            "study_id": request.study_id,
            "round": request.round,
            "spec_hash": digest,
            "dataset": request.dataset,
        }
        self._log.append(
            AuditEventType.TASK_RECEIVED,
            {
                "task_id": request.task_id,
                "study_id": request.study_id,
                "round": request.round,
                "spec_hash": digest,
            },
        )
        decisions = [
            self._approvals.check(request.spec),
            *evaluate_policy(self._policy, request.policy_request()),
        ]
        for decision in decisions:
            record_decision(self._log, decision, subject=subject)
        refusal = first_refusal(decisions)
        if refusal is not None:
            return self._refuse(request, digest, decisions, refusal, consent=None)
        result = self._consent.filter(
            load_patient_ids(),
            request.purpose,
            on if on is not None else self._log.clock.now(),
            task_id=request.task_id,
            study_id=request.study_id,
        )
        cohort = check_cohort(self._policy, result.kept_count)
        record_decision(self._log, cohort, subject={**subject, "snapshot_hash": result.snapshot_hash})
        decisions.append(cohort)
        if not cohort.allowed:
            return self._refuse(request, digest, decisions, cohort, consent=result)
        return Admission(spec_hash=digest, decisions=tuple(decisions), refusal=None, consent=result)

    def _refuse(
        self,
        request: TaskRequest,
        digest: str,
        decisions: list[Decision],
        refusal: Decision,
        *,
        consent: ConsentFilterResult | None,
    ) -> Admission:
        record_task_refusal(
            self._log,
            task_id=request.task_id,
            study_id=request.study_id,
            rule=refusal.rule.value,
            reason=refusal.reason,
            site=self._site,
            round=request.round,
            spec_hash=digest,
        )
        return Admission(spec_hash=digest, decisions=tuple(decisions), refusal=refusal, consent=consent)
