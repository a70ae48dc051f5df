"""Held-out metrics inside a secure sum (docs/privacy.md, *Every value a site releases*): a site with fewer
than k held-out patients withholds its held-out figures (docs/governance.md, step 10), and under secure
aggregation those figures travel only inside the masked vector, so a withholding site adds zeros there. What
the orchestrator decodes must then neither show a figure nobody released nor be dragged by the zeros."""

from __future__ import annotations

import numpy as np
import pytest

from fedhealth.protocol import SecureAggregationSpec, SiteMetrics, StudySpec, TaskKind
from fedhealth.runtime import SecureSumRejected, decode_sum, encode_contribution, secure_codec
from support import logreg_recipe

SITES = ["site-a", "site-b", "site-c"]
RELEASED = SiteMetrics(num_samples=0, num_eval_samples=40, eval_loss=0.5, accuracy=0.8, auc=0.75)
WITHHELD = SiteMetrics(num_samples=0)  # what a site with 1..k-1 held-out patients reports: no figure


def _spec() -> StudySpec:
    return StudySpec(
        name="held-out-secure",
        dataset="cohort",
        recipe=logreg_recipe(2),
        rounds=1,
        train_sites=SITES,
        min_sites=2,
        secure_aggregation=SecureAggregationSpec(
            site_keys={s: f"{i:064x}" for i, s in enumerate(SITES)}, update_clip=1.0
        ),
    )


def _decoded(reports: list[SiteMetrics]) -> dict[str, object]:
    spec = _spec()
    codec = secure_codec(spec, TaskKind.EVALUATE)
    rng = np.random.default_rng(3)
    vectors = [encode_contribution(codec, spec, m, rng=rng) for m in reports]
    total = np.zeros(vectors[0].shape, dtype=np.uint64)
    for v in vectors:
        total += v
    ring = (total % (1 << 32)).astype(np.uint32)
    return decode_sum(codec, spec, ring, len(reports)).metrics


def test_a_secure_sum_of_sites_that_all_withheld_shows_no_held_out_figure():
    metrics = _decoded([WITHHELD, WITHHELD])
    assert {"accuracy", "auc", "eval_loss", "num_eval_samples", "pooled_accuracy"}.isdisjoint(metrics)
    assert metrics["sites"] == 2
    # control: one site that released its figures shows them
    assert _decoded([RELEASED, WITHHELD])["num_eval_samples"] == 40


def test_a_withholding_site_does_not_drag_down_the_mean_accuracy_of_a_secure_sum():
    metrics = _decoded([RELEASED, RELEASED, WITHHELD])
    assert metrics["accuracy"] == pytest.approx(0.8, abs=1e-3)
    assert metrics["eval_loss"] == pytest.approx(0.5, abs=1e-3)


def test_held_out_records_that_no_site_released_figures_for_reject_the_sum_rather_than_divide_by_zero():
    """A malicious site puts held-out records in the sum but counts itself among no site with held-out
    figures, beside sites that all withheld theirs: the mean would be a division by zero sites."""
    spec = _spec()
    codec = secure_codec(spec, TaskKind.EVALUATE)
    rng = np.random.default_rng(5)
    honest = [encode_contribution(codec, spec, WITHHELD, rng=rng) for _ in range(2)]
    values: dict[str, object] = {s.name: np.zeros(s.length) for s in codec.segments}
    values.update(eval_n=12, correct=6, accuracy=0.5, eval_loss=0.7)  # eval_sites left at 0
    total = np.zeros(honest[0].shape, dtype=np.uint64)
    for v in [*honest, codec.encode(values, rng=rng)]:
        total += v
    ring = (total % (1 << 32)).astype(np.uint32)
    with pytest.raises(SecureSumRejected, match="from 0 sites with held-out figures"):
        decode_sum(codec, spec, ring, 3)
