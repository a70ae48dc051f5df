"""A site agent driven in this process with its real gates on a real site home, and a client that records
what would have gone to the orchestrator (no services)."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fedhealth.agent import AgentSettings, SiteAgent, SiteHome, default_gates
from fedhealth.agent._governance import SiteGovernance
from fedhealth.core import encode_tensors, read_header, sha256_hex
from fedhealth.crypto import IdentityKey, write_private
from fedhealth.protocol import (
    RESULT_METADATA_KEY,
    ResultManifest,
    StudySpec,
    Task,
    TaskFailure,
    TaskKind,
    TaskPoll,
)
from fedhealth.runtime import initial_model
from support import logreg_recipe

SITE = "hospital-a"
PATIENTS = [f"p{i:04d}" for i in range(40)]


def cohort_csv(path: Path, ids: Sequence[str] = PATIENTS) -> Path:
    """A small cohort: one row per patient id, two features and a binary label."""
    rows = [f"{p},{i % 7 / 3:.3f},{i % 5 - 2},{i % 2}" for i, p in enumerate(ids)]
    path.write_text("patient_id,age,marker,label\n" + "\n".join(rows) + "\n")
    return path


def cohort(tmp_path: Path) -> dict[str, str]:
    """The dataset ``cohort``: :func:`cohort_csv` in ``tmp_path``."""
    return {"cohort": f"file://{cohort_csv(tmp_path / 'cohort.csv')}?label=label&id=patient_id"}


def absent_cohort(tmp_path: Path) -> dict[str, str]:
    """The dataset ``cohort`` at a file that does not exist: a gate that opened it would fail with
    dataset_unavailable."""
    return {"cohort": f"file://{tmp_path}/absent.csv?label=label&id=patient_id"}


def gate_study(name: str = "gate-study", **changes: object) -> StudySpec:
    """A two-site logistic-regression study of ``cohort`` owned by alice."""
    fields: dict[str, object] = {
        "name": name,
        "owner": "alice",
        "dataset": "cohort",
        "recipe": logreg_recipe(2, learning_rate=0.5, local_epochs=1),
        "rounds": 2,
        "train_sites": [SITE, "hospital-b"],
        "min_sites": 1,
        "seed": 7,
    }
    fields.update(changes)
    return StudySpec.model_validate(fields)


class RecordingClient:
    """Stands in for ``OrchestratorClient``: keeps every failure, result and evaluation the agent sends."""

    def __init__(self) -> None:
        self.failures: list[TaskFailure] = []
        self.results: list[ResultManifest] = []
        self.evaluations: list[ResultManifest] = []

    def report_failure(
        self, task_id: str, failure: TaskFailure, *, max_elapsed_s: float | None = None
    ) -> None:
        # what crosses the wire: the model's JSON, parsed again as the orchestrator parses it
        self.failures.append(TaskFailure.model_validate_json(failure.model_dump_json()))

    def upload_result(self, task_id: str, body: bytes, *, max_elapsed_s: float | None = None) -> None:
        _, metadata = read_header(body)
        self.results.append(ResultManifest.model_validate_json(metadata[RESULT_METADATA_KEY]))

    def upload_evaluation(
        self, task_id: str, manifest: ResultManifest, *, max_elapsed_s: float | None = None
    ) -> None:
        self.evaluations.append(ResultManifest.model_validate_json(manifest.model_dump_json()))

    def next_task(self, wait: float) -> TaskPoll:  # pragma: no cover - the tests call handle() directly
        raise AssertionError("not polled")

    def close(self) -> None:
        pass


def make_home(root: Path, site: str = SITE) -> SiteHome:
    """A site home as ``fedhealth site enroll`` leaves it (without an orchestrator to enroll with)."""
    root.mkdir(parents=True, mode=0o700)
    IdentityKey.generate().save(root / "identity.key")
    write_private(
        root / "site.json",
        json.dumps(
            {"site": site, "orchestrator": "https://x.invalid", "enrolled_at": "2026-01-01T00:00:00+00:00"}
        ).encode(),
    )
    return SiteHome(root)


def approve(home: SiteHome, spec: StudySpec) -> None:
    with SiteGovernance(home) as governance:
        governance.approve(spec, reason="IRB-1", steward="dana")


def agent(home: SiteHome, datasets: Mapping[str, str]) -> tuple[SiteAgent, RecordingClient]:
    client = RecordingClient()
    settings = AgentSettings(
        orchestrator_url="https://x.invalid",
        site=home.name,
        identity=home.identity(),
        datasets=dict(datasets),
        home=home.root,
    )
    return SiteAgent(settings, client=client, gates=default_gates(home)), client  # type: ignore[arg-type]


def task(
    spec: StudySpec, *, kind: TaskKind = TaskKind.TRAIN, round: int = 1, task_id: str = "tk-1", **extra: Any
) -> Task:
    blob = encode_tensors(initial_model(spec.recipe, spec.seed))
    return Task(
        task_id=task_id,
        study_id="st-1",
        round=round,
        kind=kind,
        dataset=spec.dataset,
        recipe=spec.recipe,
        model_digest=sha256_hex(blob),
        model_inline=base64.b64encode(blob).decode(),
        seed=spec.seed,
        deadline=datetime.now(UTC) + timedelta(minutes=5),
        spec=spec,
        **extra,
    )
