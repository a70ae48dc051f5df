"""A recipe from a package outside fedhealth's source tree runs a federated study end to end through the
real orchestrator and agents: the processes find it through its ``fedhealth.recipes`` entry point (the
package and its dist-info on their PYTHONPATH, no install); a site without the package refuses its tasks
with ``invalid_recipe`` before touching its data, and the round goes on with the others."""

from __future__ import annotations

import hashlib

import pytest

from fedhealth.core import encode_tensors
from fedhealth.learning import reload_recipes
from fedhealth.protocol import FailureCode, RecipeSpec, StudySpec, StudyStatus, TaskKind, TaskStatus
from fedhealth.runtime import run_study_in_memory
from fedhealth.sim import LocalFederation
from support import BREAST_SITES, TOY_PLUGIN_PATH, TOY_RECIPE, breast_datasets

pytestmark = pytest.mark.e2e

SITES = sorted(BREAST_SITES)
LACKING = SITES[-1]  # its agent runs without the plug-in
WITH = SITES[:-1]


def test_a_third_party_recipe_trains_through_the_services_and_a_site_without_it_refuses(
    tmp_path, monkeypatch
):
    spec = StudySpec(
        name="toy-centroid",
        dataset="breast-cancer",
        recipe=RecipeSpec(name=TOY_RECIPE, params={"n_features": 30}),
        rounds=2,
        train_sites=SITES,
        eval_sites=WITH,
        min_sites=len(WITH),
        round_deadline_s=120.0,
        seed=3,
    )
    with LocalFederation(tmp_path, log_level="warning", python_path=[TOY_PLUGIN_PATH]) as fed:
        fed.start_orchestrator()
        for site in SITES:
            fed.add_site(site)
            fed.start_agent(
                site, {"breast-cancer": BREAST_SITES[site]}, python_path=() if site == LACKING else None
            )
        fed.wait_for_sites(SITES)
        final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=300, interval=0.2)
        per_site = fed.report(final.study_id)["evaluation"]["per_site"]
    assert final.status is StudyStatus.COMPLETED, final.reason
    training = [r for r in final.rounds if r.kind is TaskKind.TRAIN]
    assert len(training) == 2
    for r in training:
        outcome = {t.site: (t.status, t.reason) for t in r.tasks}
        invalid = FailureCode.INVALID_RECIPE
        assert outcome[LACKING] == (TaskStatus.FAILED, f"{invalid.value}: {invalid.message}")
        assert all(outcome[s][0] is TaskStatus.COMPLETED for s in WITH)

    # the very model the same study computes in one process over the sites that trained
    monkeypatch.syspath_prepend(str(TOY_PLUGIN_PATH))
    reload_recipes()
    try:
        alone = spec.model_copy(update={"train_sites": WITH})
        reference = run_study_in_memory(alone, breast_datasets({s: BREAST_SITES[s] for s in WITH}))
    finally:
        reload_recipes()
    assert final.model_digest == hashlib.sha256(encode_tensors(reference.params)).hexdigest()
    for site in WITH:
        assert per_site[site]["accuracy"] == reference.evaluation[site].accuracy
        assert per_site[site]["accuracy"] > 0.85
