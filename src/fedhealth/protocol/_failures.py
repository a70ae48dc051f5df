"""Why a site did not do a task: a closed set of codes, each with one fixed, PHI-free sentence.

A site sends only the code (``TaskFailure.code``); the sentence the orchestrator logs and reports is looked
up here, on the orchestrator's side, so no text a site composed (a file path, a patient id in a parse error,
a count) can reach the orchestrator's log, database, audit entries or reports. The details stay in the
site's own log and audit log.

A *refusal* is a rule of the site that said no (its steward's approval, its policy, its budget, consent); a
*failure* is a task the site could not do (its dataset is missing or malformed, the task is unusable, the
training crashed). The orchestrator logs the former as ``task.refused`` and the latter as a failed task.
"""

from __future__ import annotations

from enum import StrEnum


class FailureCode(StrEnum):
    """Every reason a site may give for not doing a task (the value is what travels)."""

    # refusals: a rule of the site said no
    STUDY_APPROVAL = "study_approval"
    ALLOWED_RECIPES = "allowed_recipes"
    ALLOWED_OWNERS = "allowed_owners"
    MAX_EPSILON = "max_epsilon"
    REQUIRE_SECURE_AGGREGATION = "require_secure_aggregation"
    MIN_COHORT = "min_cohort_k"
    SPEC_MISMATCH = "spec_mismatch"
    SPEC_SIGNATURE = "spec_signature"
    SITE_POLICY = "site_policy"
    CONSENT = "consent"
    BUDGET_EXCEEDED = "budget_exceeded"
    BUDGET_NOT_SET = "budget_not_set"
    BUDGET_ALREADY_CHARGED = "budget_already_charged"
    INVALID_PRIVACY = "invalid_privacy"
    PEER_KEY_CHANGED = "peer_key_changed"
    PEER_KEY_MISMATCH = "peer_key_mismatch"
    SECURE_ROUND_MISSING = "secure_round_missing"
    SECURE_ROUND_MISMATCH = "secure_round_mismatch"
    ALREADY_UNMASKED = "already_unmasked"
    SECURE_ROUND_REFUSED = "secure_round_refused"
    COLLECTIVE_REFUSED = "collective_refused"
    REFUSED = "refused"  # a site rule without a code of its own here (newer agent, custom gate)
    # failures: the site could not do it
    DATASET_UNAVAILABLE = "dataset_unavailable"
    DATASET_INVALID = "dataset_invalid"
    INVALID_RECIPE = "invalid_recipe"
    INVALID_TASK = "invalid_task"
    TRAINING_FAILED = "training_failed"
    DEADLINE_PASSED = "deadline_passed"
    INTERNAL_ERROR = "internal_error"

    @property
    def message(self) -> str:
        """The fixed sentence shown for this code wherever the orchestrator shows a reason."""
        return _MESSAGES[self]

    @property
    def is_refusal(self) -> bool:
        """A rule of the site said no (else: the site could not do the task)."""
        return self not in _FAILURES


_FAILURES = frozenset(
    {
        FailureCode.DATASET_UNAVAILABLE,
        FailureCode.DATASET_INVALID,
        FailureCode.INVALID_RECIPE,
        FailureCode.INVALID_TASK,
        FailureCode.TRAINING_FAILED,
        FailureCode.DEADLINE_PASSED,
        FailureCode.INTERNAL_ERROR,
    }
)

_MESSAGES: dict[FailureCode, str] = {
    FailureCode.STUDY_APPROVAL: "the site's data steward has not approved this exact study spec",
    FailureCode.ALLOWED_RECIPES: "the site's policy does not allow this study's recipe",
    FailureCode.ALLOWED_OWNERS: "the site's policy does not allow studies of this owner",
    FailureCode.MAX_EPSILON: "the study's epsilon is above the site policy's cap",
    FailureCode.REQUIRE_SECURE_AGGREGATION: "the site's policy requires secure aggregation",
    FailureCode.MIN_COHORT: "fewer patients than the site's minimum cohort size remain for this study",
    FailureCode.SPEC_MISMATCH: "the task does not do what its study spec says",
    FailureCode.SPEC_SIGNATURE: "the study spec's owner signature does not verify",
    FailureCode.SITE_POLICY: "the site's policy file is unusable, so the site runs no task",
    FailureCode.CONSENT: "the site cannot check consent for this dataset",
    FailureCode.BUDGET_EXCEEDED: "the task would exceed the site's privacy budget for this dataset",
    FailureCode.BUDGET_NOT_SET: "the site has set no privacy budget for this dataset",
    FailureCode.BUDGET_ALREADY_CHARGED: "the site already charged its budget for this task id",
    FailureCode.INVALID_PRIVACY: "the site cannot honour the study's privacy settings",
    FailureCode.PEER_KEY_CHANGED: "a peer's identity key differs from the key this site pinned",
    FailureCode.PEER_KEY_MISMATCH: "a peer's identity key is not the one the approved spec names",
    FailureCode.SECURE_ROUND_MISSING: "the spec requires secure aggregation and the task came without its "
    "secure round: the site sends nothing in clear",
    FailureCode.SECURE_ROUND_MISMATCH: "the secure round's set-up is not what the approved spec prescribes",
    FailureCode.ALREADY_UNMASKED: "the site already answered the unmask stage of this round",
    FailureCode.SECURE_ROUND_REFUSED: "the site refused the secure round's set-up",
    FailureCode.COLLECTIVE_REFUSED: "the site stopped the collective session: a key, signature or result "
    "failed its checks",
    FailureCode.REFUSED: "a rule of the site refused the task",
    FailureCode.DATASET_UNAVAILABLE: "the site's dataset for this study is not available",
    FailureCode.DATASET_INVALID: "the site's dataset does not fit the study (format, schema or values)",
    FailureCode.INVALID_RECIPE: "the site does not have the study's recipe at its version, or the recipe "
    "refuses its parameters",
    FailureCode.INVALID_TASK: "the task or its model failed the site's checks",
    FailureCode.TRAINING_FAILED: "training or evaluation failed at the site",
    FailureCode.DEADLINE_PASSED: "the round's deadline passed before the site's work on the task ended",
    FailureCode.INTERNAL_ERROR: "the site agent hit an internal error",
}


def failure_code(value: str) -> FailureCode:
    """``value`` as a code; a refusal code this table does not know becomes :attr:`FailureCode.REFUSED`
    (the site's own log keeps the original), so an unlisted rule still refuses, never crashes the agent."""
    try:
        return FailureCode(value)
    except ValueError:
        return FailureCode.REFUSED
