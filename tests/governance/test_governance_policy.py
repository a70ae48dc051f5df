"""Site policy: each rule refuses with its own rule name and a reason; policy files are strict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedhealth.governance import (
    Decision,
    PolicyError,
    PolicyRequest,
    Rule,
    SitePolicy,
    TaskRefusedError,
    check_cohort,
    evaluate_policy,
    first_refusal,
)

STRICT = SitePolicy(
    min_cohort_k=20,
    allowed_recipes=frozenset({"logreg"}),
    allowed_owners=frozenset({"alice"}),
    max_epsilon={"icu-2024": 3.0},
    require_secure_aggregation=True,
)


def request(**changes: object) -> PolicyRequest:
    base: dict[str, object] = {
        "recipe": "logreg",
        "owner": "alice",
        "dataset": "icu-2024",
        "requested_epsilon": 1.0,
        "secure_aggregation": True,
        "epsilon_spent": 0.5,
    }
    return PolicyRequest(**{**base, **changes})  # type: ignore[arg-type]


def test_a_request_within_every_rule_is_allowed_by_each_rule_in_order():
    decisions = evaluate_policy(STRICT, request())
    assert [d.rule for d in decisions] == [
        Rule.ALLOWED_RECIPES,
        Rule.ALLOWED_OWNERS,
        Rule.MAX_EPSILON,
        Rule.SECURE_AGGREGATION,
    ]
    assert all(d.allowed for d in decisions)
    assert first_refusal(decisions) is None


@pytest.mark.parametrize(
    ("changes", "rule", "words"),
    [
        ({"recipe": "xgboost"}, Rule.ALLOWED_RECIPES, "xgboost"),
        ({"owner": "mallory"}, Rule.ALLOWED_OWNERS, "mallory"),
        ({"requested_epsilon": 2.6}, Rule.MAX_EPSILON, "exceeds"),
        ({"requested_epsilon": None}, Rule.MAX_EPSILON, "no differential privacy"),
        ({"secure_aggregation": False}, Rule.SECURE_AGGREGATION, "requires secure aggregation"),
    ],
    ids=["recipe", "owner", "epsilon-over-cap", "no-dp-under-cap", "secure-aggregation"],
)
def test_each_rule_refuses_with_its_rule_name(changes, rule, words):
    refusal = first_refusal(evaluate_policy(STRICT, request(**changes)))
    assert refusal is not None
    assert refusal.rule is rule
    assert words in refusal.reason
    assert [d.rule for d in evaluate_policy(STRICT, request(**changes)) if not d.allowed] == [rule]


def test_the_epsilon_cap_applies_to_the_total_including_what_was_already_spent():
    assert first_refusal(evaluate_policy(STRICT, request(requested_epsilon=2.5, epsilon_spent=0.5))) is None
    refusal = first_refusal(evaluate_policy(STRICT, request(requested_epsilon=2.5, epsilon_spent=0.51)))
    assert refusal is not None
    assert refusal.rule is Rule.MAX_EPSILON


def test_a_dataset_without_its_own_cap_falls_back_to_the_default_cap():
    policy = SitePolicy(default_max_epsilon=1.0)
    assert first_refusal(evaluate_policy(policy, request(dataset="other", requested_epsilon=0.4))) is None
    assert first_refusal(evaluate_policy(policy, request(dataset="other", requested_epsilon=0.6))) is not None
    assert first_refusal(evaluate_policy(SitePolicy(), request(requested_epsilon=None))) is None


def test_the_cohort_rule_refuses_below_k_without_stating_the_count():
    assert check_cohort(STRICT, 20).allowed
    refusal = check_cohort(STRICT, 3)
    assert not refusal.allowed
    assert refusal.rule is Rule.MIN_COHORT
    assert "k=20" in refusal.reason
    assert "3" not in refusal.reason.replace("k=20", "")


def test_an_empty_allow_list_allows_nothing_and_no_list_allows_anything():
    assert first_refusal(evaluate_policy(SitePolicy(allowed_recipes=frozenset()), request())) is not None
    assert first_refusal(evaluate_policy(SitePolicy(), request(recipe="anything"))) is None


def test_a_refusing_decision_raises_when_required():
    with pytest.raises(TaskRefusedError, match="min_cohort_k"):
        check_cohort(STRICT, 1).require()
    Decision.allow(Rule.MIN_COHORT, "fine").require()


def test_a_policy_loads_from_toml_and_json_alike(tmp_path: Path):
    toml = tmp_path / "policy.toml"
    toml.write_text(
        'min_cohort_k = 20\nallowed_recipes = ["logreg"]\nallowed_owners = ["alice"]\n'
        "require_secure_aggregation = true\n[max_epsilon]\nicu-2024 = 3.0\n"
    )
    js = tmp_path / "policy.json"
    js.write_text(json.dumps(STRICT.to_json()))
    assert SitePolicy.load(toml) == SitePolicy.load(js) == STRICT


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("min_cohort = 5\n", "unknown site policy keys ['min_cohort']"),
        ("min_cohort_k = 0\n", "min_cohort_k"),
        ("min_cohort_k = true\n", "min_cohort_k"),
        ('allowed_recipes = "logreg"\n', "allowed_recipes"),
        ("[max_epsilon]\nicu = -1\n", "icu"),
        ("default_max_epsilon = nan\n", "default_max_epsilon"),
        ('require_secure_aggregation = "yes"\n', "require_secure_aggregation"),
        ("min_cohort_k = \n", "not valid TOML"),
    ],
    ids=[
        "unknown-key",
        "k-zero",
        "k-bool",
        "recipes-not-list",
        "negative-cap",
        "nan-cap",
        "flag-not-bool",
        "syntax",
    ],
)
def test_a_bad_policy_file_is_refused_naming_the_key(tmp_path: Path, content: str, words: str):
    path = tmp_path / "policy.toml"
    path.write_text(content)
    with pytest.raises(PolicyError, match=words.replace("[", r"\[").replace("]", r"\]")):
        SitePolicy.load(path)


def test_a_policy_file_of_another_kind_or_missing_is_refused(tmp_path: Path):
    other = tmp_path / "policy.yaml"
    other.write_text("min_cohort_k: 5\n")
    with pytest.raises(PolicyError, match=r"\.toml or \.json"):
        SitePolicy.load(other)
    with pytest.raises(PolicyError, match="cannot read"):
        SitePolicy.load(tmp_path / "absent.toml")
