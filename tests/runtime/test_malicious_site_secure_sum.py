"""A malicious site in a secure round that keeps every segment of its vector inside the codec's own range but
makes the segments disagree (docs/secure-aggregation.md, "Poisoning"): the cross-segment checks the existing
poisoning tests do not reach (``Σ auc ≤ auc_n``, ``Σ loss ≤ 100 · Σ weight``, and ``correct ≤ eval_n`` in an
evaluation round) refuse the decoded sum, while the honest sum of the same round decodes."""

from __future__ import annotations

import numpy as np
import pytest

from fedhealth.protocol import SecureAggregationSpec, SiteMetrics, StudySpec, TaskKind
from fedhealth.runtime import MAX_LOSS, SecureSumRejected, decode_sum, encode_contribution, secure_codec
from support import synthetic_recipe

SITES = ["site-a", "site-b", "site-c", "site-d"]
N_PARAMS = 5


def _spec() -> StudySpec:
    return StudySpec(
        name="rogue",
        dataset="none",
        recipe=synthetic_recipe(N_PARAMS),
        rounds=1,
        train_sites=SITES,
        min_sites=2,
        secure_aggregation=SecureAggregationSpec(
            site_keys={s: f"{i:064x}" for i, s in enumerate(SITES)}, update_clip=1.0
        ),
    )


def _ring_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros(vectors[0].shape, dtype=np.uint64)
    for v in vectors:
        total += v
    return (total % (1 << 32)).astype(np.uint32)


def _honest(spec: StudySpec, kind: TaskKind, rng: np.random.Generator) -> np.ndarray:
    metrics = SiteMetrics(
        num_samples=300, num_eval_samples=50, train_loss=0.5, eval_loss=0.6, accuracy=0.8, auc=0.7
    )
    delta = {"weight": np.full(N_PARAMS, 0.01, np.float32)} if kind is TaskKind.TRAIN else None
    return encode_contribution(secure_codec(spec, kind), spec, metrics, delta, rng=rng)


def _rogue(
    spec: StudySpec, kind: TaskKind, changes: dict[str, float], rng: np.random.Generator
) -> np.ndarray:
    """A vector encoded with the round's own codec (every value within its segment's range), with the values
    an honest site derives from one set of metrics replaced by ``changes``."""
    codec = secure_codec(spec, kind)
    values: dict[str, object] = {s.name: np.zeros(s.length) for s in codec.segments}
    values.update(eval_n=50, eval_sites=1, correct=40, accuracy=0.8, auc=0.7, auc_n=1, eval_loss=0.6)
    if kind is TaskKind.TRAIN:
        values.update(delta=np.zeros(N_PARAMS), weight=1, loss=0.5)
    values.update(changes)
    return codec.encode(values, rng=rng)


ATTACKS = [
    # an AUC of 1 reported without counting itself among the sites with an AUC: the mean AUC above 1
    (TaskKind.TRAIN, {"auc": 1.0, "auc_n": 0}, "AUCs summing to"),
    # weight 1 but the largest loss the segment holds: the round's mean training loss in the hundreds
    (TaskKind.TRAIN, {"loss": 100_000 * MAX_LOSS}, "summed loss"),
    # an evaluation round: a site with no held-out record claims the most correct predictions
    (TaskKind.EVALUATE, {"eval_n": 0, "correct": 900_000}, "correct predictions out of"),
    # an accuracy of 1 not counted among the sites with held-out figures: the mean accuracy above 1
    (TaskKind.EVALUATE, {"accuracy": 1.0, "eval_sites": 0}, "accuracies summing to"),
]


@pytest.mark.parametrize(("kind", "changes", "words"), ATTACKS)
def test_a_site_whose_segments_disagree_gets_the_round_rejected(kind, changes, words):
    spec = _spec()
    codec = secure_codec(spec, kind)
    rng = np.random.default_rng(7)
    honest = [_honest(spec, kind, rng) for _ in range(3)]
    # the same round with a fourth honest site decodes: the refusal below is the rogue's
    decode_sum(codec, spec, _ring_sum([*honest, _honest(spec, kind, rng)]), 4)
    # the rogue's vector is within every segment's range: the codec alone accepts it
    total = _ring_sum([*honest, _rogue(spec, kind, changes, rng)])
    codec.decode(total, 4)
    with pytest.raises(SecureSumRejected, match=words):
        decode_sum(codec, spec, total, 4)
