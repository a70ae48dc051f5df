"""The studies whose final models are pinned in pinned_models.json, and how to rerun one of them.

Shared by test_pinned_models.py (which checks each digest) and by its regeneration (`python
tests/pinned_models.py OUT.json`, to be run only on a tree whose models are known to be right: the
digests were recorded on main before recipes became plug-ins, issue 11).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedhealth.core import encode_tensors
from fedhealth.data import open_dataset
from fedhealth.learning import BREAST_CANCER_PRESETS, HEART_DISEASE_DP_PRESETS, HEART_DISEASE_PRESETS
from fedhealth.protocol import DpMode, PrivacySpec, SecureAggregationSpec, StudySpec
from fedhealth.runtime import preset_study, run_study_in_memory
from fedhealth.sim._bench import HEART_DISEASE_CENTERS, heart_disease_methods
from fedhealth.sim._privacy_bench import dp_preset_study
from support import BREAST_SITES, synthetic_recipe

PINNED = Path(__file__).with_name("pinned_models.json")
SEEDS = range(5)
HEART = list(HEART_DISEASE_CENTERS)
BREAST = sorted(BREAST_SITES)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pinned:
    """One study of the pinned set: its key in the JSON file, its spec, its sites' datasets (URIs) and the
    generator of the orchestrator's central noise (site-central DP only)."""

    key: str
    spec: StudySpec
    uris: Mapping[str, str]
    central_seed: int | None = None

    @property
    def heart(self) -> bool:
        return any(uri.startswith("builtin://heart-disease") for uri in self.uris.values())


def model_digest(params: Mapping[str, np.ndarray]) -> str:
    """sha256 of the model's safetensors bytes: the orchestrator's model digest of the same parameters."""
    return hashlib.sha256(encode_tensors(dict(params))).hexdigest()


def _heart_uris(sites: list[str]) -> dict[str, str]:
    uris = {c: f"builtin://heart-disease/{k}" for k, c in enumerate(HEART)}
    uris["pooled"] = "builtin://heart-disease/pooled"
    return {s: uris[s] for s in {*sites, *HEART}}


def heart_plain() -> Iterator[Pinned]:
    """Every row of docs/benchmarks.md's Fed-Heart-Disease table, seeds 0-4, as the benchmark runs them."""
    for method, preset, train_sites in heart_disease_methods():
        for seed in SEEDS:
            spec = preset_study(
                HEART_DISEASE_PRESETS[preset],
                name=f"hd-{method}-{seed}",
                dataset="heart-disease",
                train_sites=train_sites,
                eval_sites=HEART,
                min_sites=len(train_sites),
                seed=seed,
            )
            yield Pinned(key=f"heart/{method}/{seed}", spec=spec, uris=_heart_uris(train_sites))


def heart_record_dp() -> Iterator[Pinned]:
    """Every record-level DP preset (DP-SGD, noise calibrated from the target) and the same recipe without
    noise, seeds 0-4, with the sites' reproducible noise."""
    rows: list[tuple[str, Any, dict[str, Any]]] = [
        (f"{eps:g}/{delta:g}", preset, {}) for (eps, delta), preset in HEART_DISEASE_DP_PRESETS.items()
    ]
    rows.append(("no-dp", HEART_DISEASE_DP_PRESETS[(1.0, 1e-3)], {"noise_multiplier": 0.0}))
    for label, preset, extra in rows:
        for seed in SEEDS:
            spec = dp_preset_study(
                preset,
                name=f"dp-{seed}",
                dataset="heart-disease",
                train_sites=HEART,
                eval_sites=HEART,
                min_sites=4,
                seed=seed,
                **extra,
            )
            yield Pinned(key=f"heart-dp/{label}/{seed}", spec=spec, uris=_heart_uris(HEART))


def heart_site_dp() -> Iterator[Pinned]:
    """Site-level DP (central noise from a seeded orchestrator generator; distributed shares at the sites)
    on the FedAvg preset."""
    for mode in (DpMode.SITE_CENTRAL, DpMode.SITE_DISTRIBUTED):
        for seed in (0, 1):
            privacy = PrivacySpec(mode=mode, delta=1e-5, noise_multiplier=0.8, max_grad_norm=0.5)
            secure = SecureAggregationSpec(
                site_keys={s: f"{i:064x}" for i, s in enumerate(HEART)}, update_clip=50
            )
            spec = preset_study(
                HEART_DISEASE_PRESETS["fedavg"],
                name=f"site-dp-{seed}",
                dataset="heart-disease",
                train_sites=HEART,
                min_sites=4,
                seed=seed,
                privacy=privacy,
                secure_aggregation=secure if mode is DpMode.SITE_DISTRIBUTED else None,
            )
            yield Pinned(
                key=f"heart-site-dp/{mode.value}/{seed}",
                spec=spec,
                uris=_heart_uris(HEART),
                central_seed=seed,
            )


def breast() -> Iterator[Pinned]:
    """The demo's federation (no dataset download needed): every breast-cancer preset, two seeds, and
    record-level DP-SGD on it."""
    for name, preset in BREAST_CANCER_PRESETS.items():
        sites = BREAST[:1] if name == "local" else BREAST
        for seed in (0, 1):
            spec = preset_study(
                preset,
                name=f"bc-{name}",
                dataset="breast-cancer",
                train_sites=sites,
                eval_sites=BREAST,
                seed=seed,
            )
            yield Pinned(key=f"breast/{name}/{seed}", spec=spec, uris=BREAST_SITES)
    for seed in (0, 1):
        privacy = PrivacySpec(
            delta=1e-5, noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=0.1, steps_per_round=5
        )
        spec = preset_study(
            replace(BREAST_CANCER_PRESETS["fedavg"], rounds=3),
            name="bc-dp",
            dataset="breast-cancer",
            train_sites=BREAST,
            seed=seed,
            privacy=privacy,
        )
        yield Pinned(key=f"breast-dp/record/{seed}", spec=spec, uris=BREAST_SITES)


def synthetic() -> Iterator[Pinned]:
    """The transport benchmarks' data-free recipe."""
    for seed in (0, 3):
        spec = StudySpec(
            name="synthetic",
            dataset="none",
            recipe=synthetic_recipe(1000),
            rounds=3,
            train_sites=BREAST[:3],
            seed=seed,
        )
        yield Pinned(key=f"synthetic/{seed}", spec=spec, uris={})


def every_study() -> Iterator[Pinned]:
    yield from heart_plain()
    yield from heart_record_dp()
    yield from heart_site_dp()
    yield from breast()
    yield from synthetic()


def final_model(pinned: Pinned, data_dir: Path | str | None) -> dict[str, np.ndarray]:
    datasets = {site: open_dataset(uri, data_dir) for site, uri in pinned.uris.items()}
    sites = {*pinned.spec.train_sites, *pinned.spec.evaluation_sites}
    central = np.random.default_rng(pinned.central_seed) if pinned.central_seed is not None else None
    return run_study_in_memory(pinned.spec, {s: datasets.get(s) for s in sites}, central_rng=central).params


def main(out: str) -> None:
    digests = {p.key: model_digest(final_model(p, None)) for p in every_study()}
    Path(out).write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
