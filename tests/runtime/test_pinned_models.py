"""Final models pinned bit for bit: logistic regression (every Fed-Heart-Disease method of
docs/benchmarks.md and every breast-cancer preset), DP logistic regression (record level with DP-SGD at every
preset target, site-central and site-distributed) and the synthetic recipe give exactly the models they gave
on main before recipes became plug-ins (issue 11), recorded in tests/pinned_models.json (see
tests/pinned_models.py)."""

from __future__ import annotations

import json

import pytest

from pinned_models import PINNED, Pinned, every_study, final_model, model_digest
from support import heart_data_dir

RECORDED: dict[str, str] = json.loads(PINNED.read_text())
GROUPS = sorted({key.rsplit("/", 1)[0] for key in RECORDED})


def _studies(group: str) -> list[Pinned]:
    return [p for p in every_study() if p.key.rsplit("/", 1)[0] == group]


def test_every_pinned_study_is_recorded_and_every_record_has_its_study():
    keys = [p.key for p in every_study()]
    assert len(keys) == len(set(keys)) == len(RECORDED) == 115
    assert set(keys) == set(RECORDED)


@pytest.mark.slow
@pytest.mark.parametrize("group", GROUPS)
def test_final_models_equal_the_models_recorded_before_the_recipe_port(group):
    studies = _studies(group)
    assert studies
    data_dir = heart_data_dir() if studies[0].heart else None
    changed = [p.key for p in studies if model_digest(final_model(p, data_dir)) != RECORDED[p.key]]
    assert not changed, f"{len(changed)} of {len(studies)} final models changed: {changed}"
