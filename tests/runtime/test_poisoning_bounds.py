"""Ring-wrap and weight poisoning (issue 10, finding 6): what one malicious site can do to a round.

Under secure aggregation a site can send raw ring values instead of an encoded vector; the server cannot see
them, only their sum. The decoded sum is checked against what the contributors can produce, per segment and
across segments. In plain mode a site's reported sample count is bounded by the protocol and capped by the
study, and the server can bound each update's L2 norm.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fedhealth.protocol import (
    MAX_SITE_SAMPLES,
    DpMode,
    PrivacySpec,
    SecureAggregationSpec,
    SiteMetrics,
    StrategySpec,
    StudySpec,
    TaskKind,
)
from fedhealth.runtime import (
    MAX_LOSS,
    SecureSumRejected,
    aggregate,
    decode_sum,
    encode_contribution,
    secure_codec,
    summarize,
)
from support import synthetic_recipe

SITES = ["site-a", "site-b", "site-c", "site-d"]
N_PARAMS = 6


def _spec(*, weight_cap: int = 100_000, norm: float | None = None, site_dp: bool = False) -> StudySpec:
    return StudySpec(
        name="poison",
        dataset="none",
        recipe=synthetic_recipe(N_PARAMS),
        strategy=StrategySpec(weight_cap=weight_cap, max_update_norm=norm),
        rounds=1,
        train_sites=SITES,
        min_sites=2,
        privacy=PrivacySpec(mode=DpMode.SITE_CENTRAL, delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0)
        if site_dp
        else None,
        secure_aggregation=SecureAggregationSpec(
            site_keys={s: f"{i:064x}" for i, s in enumerate(SITES)}, update_clip=1.0
        ),
    )


def _honest(spec: StudySpec, n: int, value: float, rng: np.random.Generator) -> np.ndarray:
    metrics = SiteMetrics(num_samples=n, num_eval_samples=50, train_loss=0.5, accuracy=0.8, auc=0.7)
    delta = {"weight": np.full(N_PARAMS, value, np.float32)}
    return encode_contribution(secure_codec(spec, TaskKind.TRAIN), spec, metrics, delta, rng=rng)


def _ring_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0], dtype=np.uint64)
    for v in vectors:
        total += v
    return (total % (1 << 32)).astype(np.uint32)


def _offsets(codec):
    out, pos = [], 0
    for seg in codec.segments:
        out.append((seg.name, pos))
        pos += seg.length
    return out


def _position(spec: StudySpec, name: str) -> int:
    return dict(_offsets(secure_codec(spec, TaskKind.TRAIN)))[name]


# --- secure mode: the attack as the issue describes it ----------------------------------------------------


def test_a_wrapped_total_weight_of_one_instead_of_nine_hundred_is_rejected():
    spec = _spec()
    rng = np.random.default_rng(0)
    honest = [_honest(spec, 300, 0.01, rng) for _ in range(3)]
    rogue = _honest(spec, 1, 0.0, rng)
    # the rogue's weight entry is the ring value that makes the summed weight wrap to 1 (900 honest + w = 1)
    rogue[_position(spec, "weight")] = np.uint32((1 - 900) % (1 << 32))
    total = _ring_sum([*honest, rogue])
    codec = secure_codec(spec, TaskKind.TRAIN)
    assert codec.decode(total, 4)["weight"][0] == 1  # the codec alone accepts it: the mean would be 900x
    with pytest.raises(SecureSumRejected, match=r"total weight of 1 from 4 sites \(possible: 4 to 400000\)"):
        decode_sum(codec, spec, total, 4)


def test_a_wrapped_weight_tuned_to_look_possible_is_caught_by_the_summed_update():
    spec = _spec()
    rng = np.random.default_rng(1)
    honest = [_honest(spec, 300, 0.01, rng) for _ in range(3)]
    rogue = _honest(spec, 1, 0.0, rng)
    rogue[_position(spec, "weight")] = np.uint32((4 - 900) % (1 << 32))  # a total weight of 4: 1 per site
    with pytest.raises(SecureSumRejected, match="summed update coordinate"):
        decode_sum(secure_codec(spec, TaskKind.TRAIN), spec, _ring_sum([*honest, rogue]), 4)


def test_a_wrapped_evaluation_count_is_rejected():
    spec = _spec()
    rng = np.random.default_rng(2)
    vectors = [_honest(spec, 100, 0.0, rng) for _ in range(4)]
    vectors[3][_position(spec, "eval_n")] = np.uint32((10 - 150) % (1 << 32))  # 10 records, 160 correct
    with pytest.raises(SecureSumRejected, match="correct predictions out of"):
        decode_sum(secure_codec(spec, TaskKind.TRAIN), spec, _ring_sum(vectors), 4)


def test_a_sum_beyond_what_the_contributors_can_reach_is_a_rejection_not_an_input_error_elsewhere():
    spec = _spec()
    codec = secure_codec(spec, TaskKind.TRAIN)
    total = np.full(codec.length, np.uint32((1 << 32) - 1))
    with pytest.raises(SecureSumRejected, match="exceeds what 4 sites can contribute"):
        decode_sum(codec, spec, total, 4)


def test_under_site_level_dp_every_contributor_weighs_exactly_one():
    spec = _spec(site_dp=True)
    rng = np.random.default_rng(3)
    vectors = [_honest(spec, 500, 0.01, rng) for _ in range(4)]
    assert (
        decode_sum(secure_codec(spec, TaskKind.TRAIN), spec, _ring_sum(vectors), 4).metrics["num_samples"]
        == 4
    )
    vectors[0][_position(spec, "weight")] = np.uint32(0)  # a weight of 0: it cannot be, each weighs 1
    with pytest.raises(SecureSumRejected, match="possible: 4 to 4"):
        decode_sum(secure_codec(spec, TaskKind.TRAIN), spec, _ring_sum(vectors), 4)


def test_a_summed_update_longer_than_the_norm_bound_allows_is_rejected():
    spec = _spec(norm=0.1)
    rng = np.random.default_rng(4)
    vectors = [_honest(spec, 10, 1.0, rng) for _ in range(4)]  # each site scales itself to norm 0.1
    decoded = decode_sum(secure_codec(spec, TaskKind.TRAIN), spec, _ring_sum(vectors), 4)
    assert np.linalg.norm(decoded.mean_delta["weight"]) == pytest.approx(0.1, rel=1e-3)
    start = _position(spec, "delta")
    codec = secure_codec(spec, TaskKind.TRAIN)
    vectors[0][start : start + N_PARAMS] = codec.encode(
        {**_zero_values(codec), "delta": np.full(N_PARAMS, 10.0)}
    )[start : start + N_PARAMS]  # an update of norm 24.5 at weight 10, within the per-coordinate clip
    with pytest.raises(SecureSumRejected, match="L2 norm"):
        decode_sum(codec, spec, _ring_sum(vectors), 4)


def _zero_values(codec) -> dict[str, np.ndarray]:
    return {s.name: np.zeros(s.length) for s in codec.segments}


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.integers(0, 10**6), min_size=1, max_size=4),
    value=st.sampled_from([-1e3, -1.0, -0.3, 0.0, 0.3, 1.0, 1e3]),
    loss=st.sampled_from([0.0, 0.7, 99.0, 1e6]),
    accuracy=st.sampled_from([0.0, 0.5, 1.0]),
    auc=st.sampled_from([None, 0.0, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_honest_contributions_at_the_edges_of_their_ranges_are_never_rejected(
    weights, value, loss, accuracy, auc, seed
):
    spec = _spec()
    codec = secure_codec(spec, TaskKind.TRAIN)
    rng = np.random.default_rng(seed)
    vectors = []
    for n in weights:
        metrics = SiteMetrics(
            num_samples=n, num_eval_samples=n % 1000, train_loss=loss, accuracy=accuracy, auc=auc
        )
        delta = {"weight": np.full(N_PARAMS, value, np.float32)}
        vectors.append(encode_contribution(codec, spec, metrics, delta, rng=rng))
    decoded = decode_sum(codec, spec, _ring_sum(vectors), len(vectors))
    assert np.all(np.abs(decoded.mean_delta["weight"]) <= 1.0 + 1e-3)
    # the loss travels as weight * loss: its rounding error is the codec's bound over the summed weight
    tolerance = codec.error_bound("loss", len(vectors)) / max(1, decoded.metrics["num_samples"])
    assert decoded.metrics["train_loss"] <= MAX_LOSS + tolerance


# --- plain mode -------------------------------------------------------------------------------------------


def test_the_protocol_refuses_a_sample_count_beyond_any_hospital():
    SiteMetrics(num_samples=MAX_SITE_SAMPLES)
    for n in (MAX_SITE_SAMPLES + 1, 2**62, 2**63):
        with pytest.raises(ValidationError):
            SiteMetrics(num_samples=n)
        with pytest.raises(ValidationError):
            SiteMetrics.model_validate_json(f'{{"num_samples": 1, "num_eval_samples": {n}}}')


def test_a_site_claiming_a_huge_sample_count_cannot_set_the_plain_model_alone():
    strategy = StrategySpec(weight_cap=1000)
    params = {"w": np.zeros(2, np.float32)}
    honest = [(400, {"w": np.array([0.1, 0.1], np.float32)}) for _ in range(3)]
    rogue = (MAX_SITE_SAMPLES, {"w": np.array([5.0, -5.0], np.float32)})
    new, _ = aggregate(strategy, params, [*honest, rogue], {})
    # the rogue weighs the cap (1000), not a billion: (3 * 400 * 0.1 + 1000 * 5) / 2200
    np.testing.assert_allclose(new["w"], [(120 + 5000) / 2200, (120 - 5000) / 2200], rtol=1e-6)
    uncapped, _ = aggregate(StrategySpec(weight_cap=MAX_SITE_SAMPLES), params, [*honest, rogue], {})
    np.testing.assert_allclose(uncapped["w"], [5.0, -5.0], atol=1e-5)  # what an uncapped weight does


def test_the_server_scales_a_plain_update_down_to_the_norm_bound_before_averaging():
    strategy = StrategySpec(max_update_norm=1.0)
    params = {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}
    small = {"w": np.array([0.3, 0.0], np.float32), "b": np.array([0.4], np.float32)}  # norm 0.5: kept
    large = {"w": np.array([30.0, 0.0], np.float32), "b": np.array([40.0], np.float32)}  # norm 50: to 1
    new, _ = aggregate(strategy, params, [(1, small), (1, large)], {})
    np.testing.assert_allclose(new["w"], [(0.3 + 0.6) / 2, 0.0], rtol=1e-6)
    np.testing.assert_allclose(new["b"], [(0.4 + 0.8) / 2], rtol=1e-6)
    unbounded, _ = aggregate(StrategySpec(), params, [(1, small), (1, large)], {})
    np.testing.assert_allclose(unbounded["w"], [15.15, 0.0], rtol=1e-6)


def test_one_site_cannot_set_a_plain_rounds_train_loss_alone():
    """The round's train loss weighs each site as the update does (its count capped at ``weight_cap``) and
    clips each loss at MAX_LOSS, as the secure sum does: one site claiming 10^9 samples at a loss of 1e99
    (both within what the protocol accepts) made the round's loss 1e99, whatever the honest sites said."""
    spec = _spec(weight_cap=100)
    honest = [SiteMetrics(num_samples=100, train_loss=0.5) for _ in range(3)]
    hostile = SiteMetrics(num_samples=10**9, train_loss=1e99)
    figures = summarize(spec.strategy, [*honest, hostile])
    assert figures["train_loss"] == pytest.approx((3 * 100 * 0.5 + 100 * MAX_LOSS) / 400)
    assert summarize(spec.strategy, honest)["train_loss"] == pytest.approx(0.5)

    # the same site inside a secure sum weighs and counts the same (its loss clipped, its weight capped)
    codec = secure_codec(spec, TaskKind.TRAIN)
    rng = np.random.default_rng(0)
    delta = {"weight": np.zeros(N_PARAMS, np.float32)}
    vectors = [encode_contribution(codec, spec, m, delta, rng=rng) for m in [*honest, hostile]]
    secure = decode_sum(codec, spec, _ring_sum(vectors), 4)
    assert secure.metrics["train_loss"] == pytest.approx(figures["train_loss"], rel=1e-6)
