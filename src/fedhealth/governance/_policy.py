"""Site policy: the data steward's standing rules, evaluated for every task before any data is loaded.

A policy file (TOML or JSON) looks like::

    min_cohort_k = 20                      # fewest patients (after consent) a task may train on
    allowed_recipes = ["logreg"]           # omit: any recipe
    allowed_owners = ["alice", "bob"]      # omit: any study owner
    require_secure_aggregation = true
    default_max_epsilon = 3.0              # cap for datasets not listed below; omit: no cap
    [max_epsilon]                          # total epsilon a dataset may spend, per dataset
    icu-2024 = 1.0

Unknown keys are refused (a typo must not silently disable a rule). Every rule returns a :class:`Decision`;
:func:`evaluate_policy` returns one per rule, in a fixed order, so the audit log shows all of them.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhealth.governance._decision import Decision, Rule
from fedhealth.governance._errors import PolicyError

_KEYS = frozenset(
    {
        "min_cohort_k",
        "allowed_recipes",
        "allowed_owners",
        "max_epsilon",
        "default_max_epsilon",
        "require_secure_aggregation",
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SitePolicy:
    """A site's standing rules. ``None`` for an allow-list means "any"; an empty set allows nothing."""

    min_cohort_k: int = 10
    allowed_recipes: frozenset[str] | None = None
    allowed_owners: frozenset[str] | None = None
    max_epsilon: Mapping[str, float] = field(default_factory=dict)
    default_max_epsilon: float | None = None
    require_secure_aggregation: bool = False

    def __post_init__(self) -> None:
        if (
            isinstance(self.min_cohort_k, bool)
            or not isinstance(self.min_cohort_k, int)
            or self.min_cohort_k < 1
        ):
            raise PolicyError(f"min_cohort_k must be an integer >= 1, got {self.min_cohort_k!r}")
        for name, cap in [*self.max_epsilon.items(), ("default_max_epsilon", self.default_max_epsilon)]:
            if cap is None and name == "default_max_epsilon":
                continue
            if (
                isinstance(cap, bool)
                or not isinstance(cap, int | float)
                or not math.isfinite(cap)
                or cap <= 0
            ):
                raise PolicyError(f"max_epsilon for {name!r} must be a finite number > 0, got {cap!r}")
        if not isinstance(self.require_secure_aggregation, bool):
            raise PolicyError("require_secure_aggregation must be true or false")

    def epsilon_cap(self, dataset: str) -> float | None:
        """The total epsilon ``dataset`` may spend; None means no cap."""
        return self.max_epsilon.get(dataset, self.default_max_epsilon)

    @classmethod
    def from_mapping(cls, value: Mapping[str, Any]) -> SitePolicy:
        """Build a policy from parsed TOML/JSON, refusing unknown keys and wrong types with the key's name."""
        if not isinstance(value, Mapping):
            raise PolicyError("a site policy is a table of settings")
        unknown = sorted(set(value) - _KEYS)
        if unknown:
            raise PolicyError(f"unknown site policy keys {unknown}; known keys are {sorted(_KEYS)}")
        caps = value.get("max_epsilon", {})
        if not isinstance(caps, Mapping) or not all(isinstance(k, str) for k in caps):
            raise PolicyError("max_epsilon must be a table of dataset name = epsilon")
        return cls(
            min_cohort_k=value.get("min_cohort_k", 10),
            allowed_recipes=_name_set(value, "allowed_recipes"),
            allowed_owners=_name_set(value, "allowed_owners"),
            max_epsilon=dict(caps),
            default_max_epsilon=value.get("default_max_epsilon"),
            require_secure_aggregation=value.get("require_secure_aggregation", False),
        )

    @classmethod
    def load(cls, path: Path) -> SitePolicy:
        """Read a ``.toml`` or ``.json`` policy file."""
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PolicyError(f"cannot read site policy {path}: {exc.strerror}") from exc
        try:
            if path.suffix.lower() == ".json":
                parsed = json.loads(raw)
            elif path.suffix.lower() == ".toml":
                parsed = tomllib.loads(raw.decode("utf-8"))
            else:
                raise PolicyError(f"site policy {path} must end in .toml or .json")
        except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise PolicyError(f"site policy {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
        return cls.from_mapping(parsed)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "min_cohort_k": self.min_cohort_k,
            "max_epsilon": dict(sorted(self.max_epsilon.items())),
            "require_secure_aggregation": self.require_secure_aggregation,
        }
        if self.allowed_recipes is not None:
            out["allowed_recipes"] = sorted(self.allowed_recipes)
        if self.allowed_owners is not None:
            out["allowed_owners"] = sorted(self.allowed_owners)
        if self.default_max_epsilon is not None:
            out["default_max_epsilon"] = self.default_max_epsilon
        return out


def _name_set(value: Mapping[str, Any], key: str) -> frozenset[str] | None:
    names = value.get(key)
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise PolicyError(f"{key} must be a list of names")
    return frozenset(names)


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyRequest:
    """What a task asks of the site, in the terms of the policy.

    ``requested_epsilon`` is the epsilon the study will spend on ``dataset`` (None: the study has no
    differential privacy, i.e. no bound); ``epsilon_spent`` is what the dataset has already spent (from the
    privacy ledger), so the cap applies to the total. ``secure_aggregation`` says whether the task's result
    goes only into a secure sum: the study's spec asks for it *and* the task carries its secure round (the
    spec's flag alone is not enough: a task stripped of its round is a downgrade to plaintext).
    """

    recipe: str
    owner: str
    dataset: str
    requested_epsilon: float | None
    secure_aggregation: bool
    epsilon_spent: float = 0.0


def evaluate_policy(policy: SitePolicy, request: PolicyRequest) -> list[Decision]:
    """One decision per pre-data rule (recipe, owner, epsilon cap, secure aggregation), in that order.

    The cohort rule needs the post-consent count, so it is :func:`check_cohort`, evaluated after the consent
    filter and still before any training data is loaded.
    """
    return [
        _check_allow_list(policy.allowed_recipes, request.recipe, Rule.ALLOWED_RECIPES, "recipe"),
        _check_allow_list(policy.allowed_owners, request.owner, Rule.ALLOWED_OWNERS, "study owner"),
        _check_epsilon(policy, request),
        _check_secure_aggregation(policy, request),
    ]


def _check_allow_list(allowed: frozenset[str] | None, value: str, rule: Rule, what: str) -> Decision:
    if allowed is None:
        return Decision.allow(rule, f"the site allows any {what}")
    if value in allowed:
        return Decision.allow(rule, f"{what} {value!r} is allowed")
    return Decision.refuse(rule, f"{what} {value!r} is not among the site's allowed {sorted(allowed)}")


def _check_epsilon(policy: SitePolicy, request: PolicyRequest) -> Decision:
    cap = policy.epsilon_cap(request.dataset)
    if cap is None:
        return Decision.allow(Rule.MAX_EPSILON, f"dataset {request.dataset!r} has no epsilon cap")
    if request.requested_epsilon is None:
        return Decision.refuse(
            Rule.MAX_EPSILON,
            f"the study has no differential privacy, but dataset {request.dataset!r} is capped at "
            f"epsilon {cap:g}",
        )
    total = request.epsilon_spent + request.requested_epsilon
    if not math.isfinite(total) or total > cap:
        return Decision.refuse(
            Rule.MAX_EPSILON,
            f"epsilon {request.requested_epsilon:g} on top of {request.epsilon_spent:g} already spent "
            f"exceeds dataset {request.dataset!r}'s cap of {cap:g}",
        )
    return Decision.allow(Rule.MAX_EPSILON, f"epsilon total {total:g} is within the cap of {cap:g}")


def _check_secure_aggregation(policy: SitePolicy, request: PolicyRequest) -> Decision:
    if not policy.require_secure_aggregation:
        return Decision.allow(Rule.SECURE_AGGREGATION, "the site does not require secure aggregation")
    if request.secure_aggregation:
        return Decision.allow(Rule.SECURE_AGGREGATION, "the study uses secure aggregation, as required")
    return Decision.refuse(
        Rule.SECURE_AGGREGATION,
        "the site requires secure aggregation; the study does not use it, or the task came without its "
        "secure round",
    )


def check_cohort(policy: SitePolicy, cohort_size: int) -> Decision:
    """Is the post-consent cohort at least k? The reason never states a count (it may leave the site)."""
    if cohort_size >= policy.min_cohort_k:
        return Decision.allow(
            Rule.MIN_COHORT, f"the cohort after consent has at least k={policy.min_cohort_k}"
        )
    return Decision.refuse(
        Rule.MIN_COHORT,
        f"the cohort after consent is smaller than the site's minimum k={policy.min_cohort_k}",
    )
