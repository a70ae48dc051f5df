"""SCAFFOLD through the real services: three hospitals whose images are small DICOM files train the torch CNN
with control variates over the orchestrator's SecAgg+ rounds (Δy and Δc inside the secure sum, each c_i in
its site's home), and the model, server control variate included, is the in-memory SCAFFOLD run's."""

from __future__ import annotations

import numpy as np
import pytest
from imaging_files import dicom_square_folder

from fedhealth.core import decode_tensors
from fedhealth.data import open_dataset
from fedhealth.learning import CONTROL_VARIATE_PREFIX
from fedhealth.protocol import (
    RecipeSpec,
    SecureAggregationSpec,
    StrategySpec,
    StudySpec,
    StudyStatus,
    TaskKind,
    TaskStatus,
)
from fedhealth.runtime import initial_model, param_specs, run_study_in_memory
from fedhealth.sim import LocalFederation

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SITES = {"hospital-a": 16, "hospital-b": 20, "hospital-c": 24}  # images per site (3/4 train: k >= 10)
SCAFFOLD = {
    "input_size": 8,
    "batch_size": 8,
    "optimizer": "sgd",
    "learning_rate": 0.05,
    "local_epochs": 1,
    "scaffold": True,
}


def test_a_scaffold_study_runs_through_secure_aggregation_and_moves_the_server_control_variate(tmp_path):
    uris = {
        site: f"dicom://{dicom_square_folder(tmp_path / site, n, side=8, seed=i)}?size=8&test_fraction=0.25"
        for i, (site, n) in enumerate(SITES.items())
    }
    with LocalFederation(tmp_path / "fed", env={"FEDHEALTH_TORCH_THREADS": "1"}) as fed:
        fed.start_orchestrator()
        for site in SITES:
            fed.add_site(site)
            fed.start_agent(site, {"squares": uris[site]})
        fed.wait_for_sites(list(SITES))
        spec = StudySpec(
            name="scaffold-secure",
            dataset="squares",
            recipe=RecipeSpec(name="torch", params=SCAFFOLD),
            # the secure sum's range is weight_cap x update_clip: small ones give a fine fixed point
            # (at the defaults, 1e6 x 1, a step of the sum is ~1e-3/site, too coarse to compare to 1e-5)
            strategy=StrategySpec(name="scaffold", weight_cap=64),
            rounds=2,
            train_sites=sorted(SITES),
            min_sites=3,
            round_deadline_s=120.0,
            seed=3,
            secure_aggregation=SecureAggregationSpec(site_keys=fed.site_keys(list(SITES)), update_clip=10.0),
        )
        final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=120)
        assert final.status is StudyStatus.COMPLETED, final.reason
        model, _ = decode_tensors(fed.model_bytes(final.study_id), param_specs(spec.recipe))
        homes = {site: fed.site_home(site).root for site in SITES}
        orchestrator_log = (fed.logs / "orchestrator.log").read_text()
    train_rounds = [r for r in final.rounds if r.kind is TaskKind.TRAIN]
    assert len(train_rounds) == 2
    assert all(t.status is TaskStatus.COMPLETED for r in final.rounds for t in r.tasks)
    assert all(t.metrics is None for r in final.rounds for t in r.tasks)  # figures only inside the sums
    assert all((r.metrics or {}).get("sites") == 3 for r in train_rounds)
    for t in train_rounds[-1].tasks:  # each site's update went through every SecAgg+ stage
        assert f"task {t.task_id}: unmask message received" in orchestrator_log

    # the server's control variate c started at zero and moved by the sites' summed Δc
    variates = [name for name in model if name.startswith(CONTROL_VARIATE_PREFIX)]
    assert variates
    start = initial_model(spec.recipe, spec.seed)
    assert all(not start[name].any() for name in variates)
    assert max(float(np.abs(model[name]).max()) for name in variates) > 1e-3
    # each site kept its own c_i at home: round 2's, and round 1's (what a rerun of round 2 would start from)
    for site, home in homes.items():
        kept = sorted(p.name for p in (home / "recipe-state").rglob("*.safetensors"))
        assert kept == ["round-1.safetensors", "round-2.safetensors"], site

    # the same study computed in memory the plain way: the secure sum's fixed point is all that differs
    reference = run_study_in_memory(spec, {site: open_dataset(uri) for site, uri in uris.items()})
    for name, value in reference.params.items():
        np.testing.assert_allclose(model[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
