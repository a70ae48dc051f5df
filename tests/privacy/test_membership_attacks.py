"""Membership-inference attacks (fedhealth.privacy._membership): the figures on hand-checked examples, and the
attacks on synthetic models: one that memorizes its training records must be attackable, one whose output
ignores its training data must not."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fedhealth.core import InputError
from fedhealth.privacy import (
    MembershipAttack,
    MembershipMeasurement,
    MembershipReport,
    attack_figures,
    cross_entropy_of_confidence,
    lira_scores,
    logit_confidence,
    loss_attack_scores,
    roc_auc,
    tpr_at_fpr,
)

# 100 non-members scored 0..99, four members: checked by hand below
HAND_NON_MEMBERS = np.arange(100.0)
HAND_MEMBERS = np.array([99.5, 98.5, 50.0, 10.0])
HAND_SCORES = np.concatenate([HAND_NON_MEMBERS, HAND_MEMBERS])
HAND_IS_MEMBER = np.arange(104) >= 100


def test_tpr_at_one_percent_fpr_on_a_hand_checked_example() -> None:
    # "score >= 98.5" calls the members 99.5 and 98.5 and one non-member (99): FPR 1/100, TPR 2/4; the next
    # threshold down (98) would call a second non-member
    assert tpr_at_fpr(HAND_SCORES, HAND_IS_MEMBER, 0.01) == 0.5
    assert tpr_at_fpr(HAND_SCORES, HAND_IS_MEMBER, 0.0) == 0.25  # only "score >= 99.5" calls no non-member
    assert tpr_at_fpr(HAND_SCORES, HAND_IS_MEMBER, 0.5) == 0.75  # ">= 50" calls 50 non-members (50..99)
    assert tpr_at_fpr(HAND_SCORES, HAND_IS_MEMBER, 1.0) == 1.0


def test_auc_counts_ties_one_half_on_a_hand_checked_example() -> None:
    # members beat 100, 99, 50 (+ half a tie with 50) and 10 (+ half a tie with 10) of the 100 non-members
    assert roc_auc(HAND_SCORES, HAND_IS_MEMBER) == pytest.approx((100 + 99 + 50.5 + 10.5) / 400)


def test_auc_equals_scikit_learn_with_many_ties() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 7, 500).astype(float)
    member = rng.random(500) < 0.3
    assert roc_auc(scores, member) == pytest.approx(roc_auc_score(member, scores), abs=1e-12)


def test_figures_refuse_bad_input() -> None:
    with pytest.raises(InputError, match="at least one member and one non-member"):
        roc_auc([0.1, 0.2], np.array([True, True]))
    with pytest.raises(InputError, match="boolean vector of length 3"):
        tpr_at_fpr([0.1, 0.2, 0.3], np.array([1, 0, 1]))
    with pytest.raises(InputError, match="finite"):
        roc_auc([0.1, float("nan")], np.array([True, False]))
    with pytest.raises(InputError, match="fpr"):
        tpr_at_fpr([0.1, 0.2], np.array([True, False]), 1.5)
    with pytest.raises(InputError, match="lie in"):
        logit_confidence([1.2])


def test_logit_confidence_and_loss_agree_and_stay_finite_at_certainty() -> None:
    p = np.array([0.0, 0.25, 0.5, 0.9, 1.0])
    phi = logit_confidence(p)
    assert np.isfinite(phi).all()
    assert phi[1:4] == pytest.approx(np.log(p[1:4] / (1 - p[1:4])))
    assert cross_entropy_of_confidence(phi[1:4]) == pytest.approx(-np.log(p[1:4]))


# --- attacks on synthetic models ---------------------------------------------------------------------------

POOL, FEATURES, MODELS = 200, 120, 9


def _trained_on_halves(fit_and_score, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """LiRA's setup: MODELS models, each trained on a random half of one pool of records; each model's
    logit-scaled confidence in every record's label, and which records it trained on."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(POOL, FEATURES))
    y = (X[:, 0] + rng.normal(scale=2.0, size=POOL) > 0).astype(int)  # a weak signal: room to memorize
    conf = np.empty((MODELS, POOL))
    inside = np.zeros((MODELS, POOL), dtype=bool)
    for j in range(MODELS):
        inside[j, rng.permutation(POOL)[: POOL // 2]] = True
        p1 = fit_and_score(X[inside[j]], y[inside[j]], X, rng)
        conf[j] = logit_confidence(np.where(y == 1, p1, 1 - p1))
    return conf, inside


def _memorizing(X_train, y_train, X, rng) -> np.ndarray:
    # more features than records and almost no regularization: it fits its training labels exactly
    return LogisticRegression(C=1e3, max_iter=2000).fit(X_train, y_train).predict_proba(X)[:, 1]


def _ignoring_its_data(X_train, y_train, X, rng) -> np.ndarray:
    w = rng.normal(scale=0.1, size=X.shape[1])
    return 1 / (1 + np.exp(-X @ w))


@functools.cache
def _models(kind: str) -> tuple[np.ndarray, np.ndarray]:  # trained once for the three attacks
    return _trained_on_halves(_memorizing if kind == "memorizing" else _ignoring_its_data)


def _each_as_target(conf: np.ndarray, inside: np.ndarray, attack: MembershipAttack):
    """Every model in turn the target, the others its shadows; scores and membership pooled."""
    scores, members = [], []
    for t in range(MODELS):
        shadows = np.arange(MODELS) != t
        if attack is MembershipAttack.LOSS:
            scores.append(loss_attack_scores(cross_entropy_of_confidence(conf[t])))
        else:
            scores.append(lira_scores(conf[t], conf[shadows], inside[shadows], attack=attack))
        members.append(inside[t])
    return attack_figures(np.concatenate(scores), np.concatenate(members))


@pytest.mark.parametrize("attack", list(MembershipAttack))
def test_a_memorizing_model_is_attackable(attack: MembershipAttack) -> None:
    figures = _each_as_target(*_models("memorizing"), attack)
    assert figures.auc > 0.75
    if attack is not MembershipAttack.LOSS:  # Carlini et al.'s point: a loss threshold exposes few records
        assert figures.tpr_at_fpr > 0.05  # confidently, LiRA many (a guess gets 1 % at 1 % FPR)
    assert figures.members == figures.non_members == MODELS * POOL // 2


@pytest.mark.parametrize("attack", list(MembershipAttack))
def test_a_model_that_ignores_its_training_data_is_not_attackable(attack: MembershipAttack) -> None:
    figures = _each_as_target(*_models("ignoring"), attack)
    # 900 members against 900 non-members: a guess's AUC has a standard deviation of about 0.014
    assert figures.auc == pytest.approx(0.5, abs=0.05)
    assert figures.tpr_at_fpr < 0.05


def test_online_lira_uses_the_in_models_and_offline_only_the_out_models() -> None:
    # record 0: in-models say 5, out-models 0; the target's 5 is "in"-like. Record 1 the same, target at 0.
    shadow = np.array([[5.0, 5.0], [5.2, 5.2], [0.0, 0.0], [0.2, 0.2], [4.8, -0.2], [-0.1, 4.9]])
    inside = np.array([[1, 1], [1, 1], [0, 0], [0, 0], [1, 0], [0, 1]], dtype=bool)
    online = lira_scores([5.0, 0.0], shadow, inside)
    offline = lira_scores([5.0, 0.0], shadow, inside, attack=MembershipAttack.LIRA_OFFLINE)
    assert online[0] > 0 > online[1]
    assert offline[0] > offline[1]
    # offline ignores the in-models: changing them leaves its scores alone
    moved = np.where(inside, shadow + 3.0, shadow)
    assert lira_scores([5.0, 0.0], moved, inside, attack=MembershipAttack.LIRA_OFFLINE) == pytest.approx(
        offline
    )


def test_lira_refuses_shapes_that_do_not_fit() -> None:
    with pytest.raises(InputError, match="shape"):
        lira_scores([0.0, 1.0], np.zeros((3, 3)), np.zeros((3, 3), dtype=bool))
    with pytest.raises(InputError, match="two shadow models"):
        lira_scores([0.0], np.zeros((1, 1)), np.zeros((1, 1), dtype=bool))
    with pytest.raises(InputError, match="loss attack"):
        lira_scores([0.0], np.zeros((2, 1)), np.zeros((2, 1), dtype=bool), attack=MembershipAttack.LOSS)


def test_a_report_round_trips_through_json_and_bad_files_are_named() -> None:
    figures = attack_figures(HAND_SCORES, HAND_IS_MEMBER)
    row = MembershipMeasurement(
        dataset="heart-disease",
        setting="DP-SGD",
        target_epsilon=1.0,
        epsilon=0.998,
        delta=1e-5,
        attack=MembershipAttack.LIRA_ONLINE,
        figures=figures,
        test_auc=0.8,
    )
    report = MembershipReport(measurements=(row,), measured_at="2026-12-06T10:00:00Z", setup={"models": 8})
    again = MembershipReport.from_json(json.loads(json.dumps(report.to_json())))
    assert again == report
    with pytest.raises(InputError, match="not a membership benchmark result"):
        MembershipReport.from_json({"measurements": []})
    broken = report.to_json()
    broken["measurements"][0]["auc"] = 1.5
    with pytest.raises(InputError, match="auc must be a number in"):
        MembershipReport.from_json(broken)
