"""A whole study with a site whose held-out part is smaller than its k (docs/privacy.md, *Every value a site
releases*), in one process: the real agents with their real gates on real site homes, and the real round
engine, store and blob store, each agent's upload stored as the upload route stores it (no HTTP). The site
trains in every round, withholds its held-out figures, answers the evaluation with none, and the study
completes with a report that says so and shows no count of that site."""

from __future__ import annotations

import asyncio
from pathlib import Path

from site_fixtures import RecordingClient, approve, make_home, task

from fedhealth.agent import AgentSettings, SiteAgent, default_gates
from fedhealth.core import SystemClock, read_header
from fedhealth.governance import spec_hash
from fedhealth.orchestrator import (
    BlobStore,
    RoundEngine,
    Store,
    build_report,
    make_engine,
    report_markdown,
    sqlite_url,
    upgrade_database,
)
from fedhealth.orchestrator._blobs import BlobKind
from fedhealth.orchestrator._notify import TaskNotifier
from fedhealth.protocol import (
    RESULT_METADATA_KEY,
    ApprovalState,
    ResultManifest,
    StudySpec,
    StudyStatus,
    TaskKind,
    TaskStatus,
)
from support import logreg_recipe

PATIENTS = [f"p{i:04d}" for i in range(40)]
HELD_OUT = {0.3: 12, 0.05: 2}  # test fraction -> held-out patients of the 40 (stratified)


class KeepingClient(RecordingClient):
    """Also keeps each upload's body, for the orchestrator's store."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def upload_result(self, task_id: str, body: bytes, *, max_elapsed_s: float | None = None) -> None:
        super().upload_result(task_id, body, max_elapsed_s=max_elapsed_s)
        self.bodies.append(body)


def write_csv(path: Path) -> Path:
    rows = [f"{p},{i % 7 / 3:.3f},{i % 5 - 2},{i % 2}" for i, p in enumerate(PATIENTS)]
    path.write_text("patient_id,age,marker,label\n" + "\n".join(rows) + "\n")
    return path


def run_study(tmp_path: Path, fractions: dict[str, float]) -> tuple[Store, str]:
    """Run a one-round study over ``fractions``' sites (each holding out that fraction) to its end."""
    spec = StudySpec.model_validate(
        {
            "name": "held-out-study",
            "dataset": "cohort",
            "recipe": logreg_recipe(2, learning_rate=0.5),
            "rounds": 1,
            "train_sites": sorted(fractions),
            "min_sites": len(fractions),
            "round_deadline_s": 3600.0,
        }
    )
    data = write_csv(tmp_path / "cohort.csv")
    agents = {}
    for site, fraction in fractions.items():
        home = make_home(tmp_path / site, site=site)
        approve(home, spec)
        uri = f"file://{data}?label=label&id=patient_id&test_fraction={fraction}"
        settings = AgentSettings(
            orchestrator_url="https://x.invalid",
            site=site,
            identity=home.identity(),
            datasets={"cohort": uri},
            home=home.root,
        )
        client = KeepingClient()
        agents[site] = (SiteAgent(settings, client=client, gates=default_gates(home)), client)  # type: ignore[arg-type]
    db = make_engine(sqlite_url(tmp_path / "orchestrator.sqlite"))
    upgrade_database(db)
    store = Store(db)
    blobs = BlobStore(tmp_path / "blobs")
    clock = SystemClock()

    async def main() -> str:
        engine = RoundEngine(store, blobs, clock, TaskNotifier())
        try:
            digest = spec_hash(spec.model_dump(mode="json"))
            for site in fractions:
                store.create_site(site, clock.now())
                store.record_approval(site, digest, ApprovalState.APPROVED, clock.now())
            study_id = (await engine.create_study(spec)).id
            while store.get_study(study_id).status is StudyStatus.RUNNING:
                (r,) = [x for x in store.open_rounds() if x.study_id == study_id]
                for t in store.tasks_of_round(r.id):
                    site_agent, client = agents[t.site]
                    wire = task(spec, kind=r.kind, round=r.number, task_id=t.id)
                    site_agent.handle(wire.model_copy(update={"study_id": study_id}))
                    await asyncio.sleep(0)
                    if client.failures:  # as the failure route stores it: the code and its fixed sentence
                        failure = client.failures.pop()
                        assert store.close_task(
                            t.id, TaskStatus.FAILED, f"{failure.code}: {failure.reason}", clock.now()
                        )
                    elif r.kind is TaskKind.TRAIN:
                        body = client.bodies.pop()
                        _, metadata = read_header(body)
                        manifest = ResultManifest.model_validate_json(metadata[RESULT_METADATA_KEY])
                        assert manifest.metrics is not None
                        assert store.complete_task(
                            t.id,
                            digest=blobs.put(body, kind=BlobKind.UPDATE),
                            num_samples=manifest.metrics.num_samples,
                            metrics=manifest.metrics,
                            when=clock.now(),
                        )
                    else:
                        manifest = client.evaluations.pop()
                        assert store.complete_task(
                            t.id, digest=None, num_samples=0, metrics=manifest.metrics, when=clock.now()
                        )
                    await engine.task_closed(r.id, t.id)
            return study_id
        finally:
            await engine.close()

    study_id = asyncio.run(main())
    return store, study_id


def test_a_study_with_a_site_below_k_held_out_patients_completes_and_its_report_says_withheld(tmp_path):
    store, study_id = run_study(tmp_path, {"north": 0.3, "small": 0.05})
    report = build_report(store, study_id)
    assert report["status"] == "completed", report["reason"]
    (training,) = report["rounds"]
    # the small site trained: both sites' training rows count, and only north's held-out figures are in
    assert training["metrics"]["sites"] == 2
    assert training["metrics"]["num_samples"] == (40 - HELD_OUT[0.3]) + (40 - HELD_OUT[0.05])
    assert training["metrics"]["held_out_withheld"] == ["small"]
    assert "accuracy" in training["metrics"]
    evaluation = report["evaluation"]
    assert set(evaluation["per_site"]) == {"north"}
    assert evaluation["held_out_withheld"] == ["small"]
    assert evaluation["accuracy"] == evaluation["per_site"]["north"]["accuracy"]
    markdown = report_markdown(report)
    assert "| small | withheld | withheld | withheld | withheld |" in markdown
    assert f"| north | {HELD_OUT[0.3]} |" in markdown  # control: k or more, the count and figures show
    assert "(withheld at small)" in markdown


def test_a_study_whose_every_site_is_below_k_held_out_patients_completes_with_no_held_out_figure(tmp_path):
    store, study_id = run_study(tmp_path, {"east": 0.05, "west": 0.05})
    report = build_report(store, study_id)
    assert report["status"] == "completed", report["reason"]
    (training,) = report["rounds"]
    assert training["metrics"]["held_out_withheld"] == ["east", "west"]
    assert {"accuracy", "auc", "eval_loss"}.isdisjoint(training["metrics"])
    assert report["evaluation"]["per_site"] == {}
    assert report["evaluation"]["held_out_withheld"] == ["east", "west"]
    markdown = report_markdown(report)
    assert "| east | withheld |" in markdown
    assert "| west | withheld |" in markdown
    assert "| **mean** | | **n/a** | **n/a** | |" in markdown
    assert f"| east | {HELD_OUT[0.05]} |" not in markdown
