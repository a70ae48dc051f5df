"""Through the real orchestrator and agents, logistic regression still gives the models pinned in
tests/pinned_models.json (recorded on main before recipes became plug-ins, issue 11): the
orchestrator's model digest of each study's final model equals the recorded sha256."""

from __future__ import annotations

import json

import pytest

from fedhealth.protocol import StudyStatus
from fedhealth.sim import LocalFederation
from pinned_models import HEART, PINNED, every_study
from support import BREAST_SITES, heart_data_dir

pytestmark = pytest.mark.e2e

RECORDED: dict[str, str] = json.loads(PINNED.read_text())
KEYS = ("breast/fedavg/0", "breast/fedadam/1", "heart/fedyogi/2", "heart/fedprox/4")


def test_services_release_the_pinned_logreg_models(tmp_path):
    data_dir = heart_data_dir()
    studies = [p for p in every_study() if p.key in KEYS]
    assert sorted(p.key for p in studies) == sorted(KEYS)
    sites = dict(zip(sorted(BREAST_SITES), HEART, strict=True))  # each agent holds one of each
    with LocalFederation(tmp_path, log_level="warning", env={"FEDHEALTH_DATA_DIR": str(data_dir)}) as fed:
        fed.start_orchestrator()
        for (breast_site, uri), (k, center) in zip(
            sorted(BREAST_SITES.items()), enumerate(HEART), strict=True
        ):
            fed.add_site(breast_site)
            fed.start_agent(breast_site, {"breast-cancer": uri})
            fed.add_site(center)
            fed.start_agent(center, {"heart-disease": f"builtin://heart-disease/{k}"})
        fed.wait_for_sites([*sites, *HEART])
        for pinned in studies:
            spec = pinned.spec.model_copy(update={"round_deadline_s": 120.0})
            final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=300, interval=0.2)
            assert final.status is StudyStatus.COMPLETED, (pinned.key, final.reason)
            assert final.model_digest == RECORDED[pinned.key], pinned.key
