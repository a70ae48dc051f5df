"""Decisions with reasons, and the one place they are written to an audit log.

Every governance check (study approval, each site-policy rule, the cohort size after consent) returns a
:class:`Decision` naming the rule that decided and why. :func:`record_decision` is the single choke point that
logs them (Datasette's ``track_event`` idea), so every decision has one entry shape an auditor can query.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fedhealth.governance._audit import AuditEntry, AuditEventType, AuditLog
from fedhealth.governance._errors import TaskRefusedError


class Rule(StrEnum):
    """The rule a decision applied. Its value is the refusal code the orchestrator receives."""

    STUDY_APPROVAL = "study_approval"
    ALLOWED_RECIPES = "allowed_recipes"
    ALLOWED_OWNERS = "allowed_owners"
    MAX_EPSILON = "max_epsilon"
    SECURE_AGGREGATION = "require_secure_aggregation"
    MIN_COHORT = "min_cohort_k"


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Whether an action is allowed, by which rule, and why (a sentence for the steward and the auditor)."""

    allowed: bool
    reason: str
    rule: Rule

    @classmethod
    def allow(cls, rule: Rule, reason: str) -> Decision:
        return cls(allowed=True, reason=reason, rule=rule)

    @classmethod
    def refuse(cls, rule: Rule, reason: str) -> Decision:
        return cls(allowed=False, reason=reason, rule=rule)

    def require(self) -> None:
        """Raise :class:`TaskRefusedError` if this decision refuses."""
        if not self.allowed:
            raise TaskRefusedError(self)

    def to_json(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "reason": self.reason, "rule": self.rule.value}


def first_refusal(decisions: Iterable[Decision]) -> Decision | None:
    """The first decision that refuses, or None when all allow."""
    return next((d for d in decisions if not d.allowed), None)


def record_decision(log: AuditLog, decision: Decision, *, subject: Mapping[str, Any]) -> AuditEntry:
    """Write one decision to ``log`` (a ``policy.decision`` entry). ``subject`` says what was decided about:
    task, study, spec hash, dataset."""
    return log.append(AuditEventType.POLICY_DECISION, {**decision.to_json(), "subject": dict(subject)})


def record_task_refusal(
    log: AuditLog,
    *,
    task_id: str,
    study_id: str,
    rule: str,
    reason: str,
    site: str | None = None,
    round: int | None = None,
    spec_hash: str | None = None,
) -> AuditEntry:
    """Write a ``task.refused`` entry. The site calls it when it refuses, with its decision's reason; the
    orchestrator calls it with the ``code`` of the site's ``TaskFailure`` and that code's fixed sentence."""
    payload: dict[str, Any] = {"task_id": task_id, "study_id": study_id, "rule": rule, "reason": reason}
    if site is not None:
        payload["site"] = site
    if round is not None:
        payload["round"] = round
    if spec_hash is not None:
        payload["spec_hash"] = spec_hash
    return log.append(AuditEventType.TASK_REFUSED, payload)
