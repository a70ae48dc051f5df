"""When the agent reads a dataset (issue 15: the schema is checked when a dataset is added and before each
task). A study's first task opens the source again, so a new study sees the warehouse's current rows and a
source whose columns no longer fit the pinned schema is refused before any row is computed on; the tasks of
one study share the snapshot its first task read, so every round trains on the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from site_fixtures import SITE, agent, approve, make_home, task

from fedhealth.agent._datasets import with_schema
from fedhealth.data import inspect_dataset
from fedhealth.privacy import BudgetLedger, sqlite_engine
from fedhealth.protocol import FailureCode, PrivacySpec, StudySpec
from support import logreg_recipe

DELTA = 1e-5


def write_csv(path: Path, n: int, *, marker: str = "marker") -> Path:
    rows = [f"p{i:04d},{i % 7 / 3:.3f},{i % 5 - 2},{i % 2}" for i in range(n)]
    path.write_text(f"patient_id,age,{marker},label\n" + "\n".join(rows) + "\n")
    return path


def ledger(home) -> BudgetLedger:
    engine = sqlite_engine(home.database_path)
    BudgetLedger.create_schema(engine)
    return BudgetLedger(engine)


SPEC = StudySpec(
    name="snapshot-study",
    dataset="cohort",
    recipe=logreg_recipe(2, learning_rate=0.5),
    rounds=2,
    train_sites=[SITE],
    privacy=PrivacySpec(
        delta=DELTA, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps_per_round=3
    ),
)


@pytest.fixture
def site(tmp_path):
    home = make_home(tmp_path / "site")
    ledger(home).set_budget("cohort", 50.0, DELTA)
    approve(home, SPEC)
    return home


@pytest.fixture
def pinned_uri(tmp_path):
    """A CSV of 40 patients added as `site dataset add` adds it: with its schema pinned to a private copy."""
    (tmp_path / "ward").mkdir()
    csv = write_csv(tmp_path / "ward" / "cohort.csv", 40)
    uri = f"file://{csv}?label=label&id=patient_id"
    schema = inspect_dataset(uri).schema
    assert schema is not None
    pinned = tmp_path / "cohort.schema.json"
    pinned.write_text(json.dumps(schema.to_json()))
    return csv, with_schema(uri, pinned)


def of_study(spec: StudySpec, study_id: str, task_id: str, round: int = 1):
    return task(spec, round=round).model_copy(update={"study_id": study_id, "task_id": task_id})


def test_the_rounds_of_one_study_share_a_snapshot_and_a_new_study_reads_the_new_rows(site, pinned_uri):
    csv, uri = pinned_uri
    a, client = agent(site, {"cohort": uri})
    a.handle(of_study(SPEC, "st-1", "tk-1"))
    write_csv(csv, 60)  # the warehouse gains 20 patients while the study runs
    a.handle(of_study(SPEC, "st-1", "tk-2", round=2))
    a.handle(of_study(SPEC, "st-2", "tk-3"))
    assert client.failures == []
    samples = [r.metrics.num_samples for r in client.results if r.metrics is not None]
    assert len(samples) == 3
    assert samples[0] == samples[1]  # one study, one snapshot
    assert samples[2] > samples[1]  # the next study sees the rows added since


def test_a_source_that_no_longer_fits_its_pinned_schema_refuses_the_next_study_and_charges_nothing(
    site, pinned_uri
):
    csv, uri = pinned_uri
    a, client = agent(site, {"cohort": uri})
    a.handle(of_study(SPEC, "st-1", "tk-1"))
    assert client.failures == []
    spent = ledger(site).statement("cohort").spent_epsilon
    assert spent > 0
    write_csv(csv, 40, marker="troponin")  # a column renamed in the warehouse
    a.handle(of_study(SPEC, "st-2", "tk-2"))
    [failure] = client.failures
    assert failure.code is FailureCode.DATASET_INVALID
    sent = failure.model_dump_json()
    for secret in (str(csv), "cohort.csv", "troponin", "p0000"):
        assert secret not in sent
    assert ledger(site).statement("cohort").spent_epsilon == spent  # nothing more charged
    assert ledger(site).pending("cohort") == []
    # and the refusal is not sticky: once the source fits again, the next study trains
    write_csv(csv, 40)
    a.handle(of_study(SPEC, "st-3", "tk-3"))
    assert len(client.failures) == 1
    assert len(client.results) == 2
