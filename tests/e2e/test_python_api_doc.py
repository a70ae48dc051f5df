"""docs/python-api.md, run as written: its ``python`` blocks execute in order in one namespace, in a folder
holding what the doc says the researcher has (the credential, a study spec, a CSV of new patients), against a
real orchestrator and two real sites; between the blocks each site's steward approves as the doc shows."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedhealth.cli import app
from fedhealth.client import spec_template
from fedhealth.protocol import OperatorCredential, StudyStatus
from fedhealth.sim import LocalFederation

pytestmark = pytest.mark.e2e
DOC = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"
SITES = ("north", "south")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def cohort_csv(path: Path, rng: np.random.Generator, n: int, *, label: bool = True) -> Path:
    X = rng.normal(size=(n, 4))
    y = (rng.random(n) < 1 / (1 + np.exp(-(X @ np.array([2.0, -1.0, 0.5, 0.0]))))).astype(int)
    lines = ["patient_id,a,b,c,d" + (",target" if label else "")]
    for i in range(n):
        cells = [f"{path.stem}-{i}", *(f"{v:.4f}" for v in X[i])] + ([str(y[i])] if label else [])
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_python_api_doc_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert len(blocks) == 2
    rng = np.random.default_rng(5)
    with LocalFederation(tmp_path / "federation", log_level="warning") as fed:
        fed.start_orchestrator()
        for site, n in zip(SITES, (150, 90), strict=True):
            fed.add_site(site)
            data = cohort_csv(tmp_path / f"{site}.csv", rng, n)
            uri = f"file://{data}?label=target&id=patient_id"
            fed.start_agent(site, {"cohort": uri}, extra_args=["--poll-wait", "2"])
        # the researcher's folder: the credential (pointing at this orchestrator), a spec, new patients
        work = tmp_path / "researcher"
        work.mkdir()
        credential = OperatorCredential.model_validate_json(fed.home.admin_credential.read_text())
        (work / "admin.credential").write_text(
            credential.model_copy(update={"orchestrator": fed.url}).model_dump_json()
        )
        (work / "admin.credential").chmod(0o600)  # a credential others can read is refused
        (work / "study.toml").write_text(
            spec_template(
                recipe="logreg",
                dataset="cohort",
                sites=list(SITES),
                features=4,
                rounds=3,
                name="doc",
            )
        )
        cohort_csv(work / "new-patients.csv", rng, 25, label=False)
        monkeypatch.chdir(work)
        namespace: dict[str, object] = {}
        exec(compile(blocks[0], f"{DOC}:block-1", "exec"), namespace)
        study = namespace["study"]
        assert study.status is StudyStatus.AWAITING_APPROVAL
        for site in SITES:  # each steward, as the doc shows between the blocks
            home = fed.site_home(site).root
            runner = CliRunner()
            shown = runner.invoke(app, ["site", "approvals", "show", study.spec_hash, "--home", str(home)])
            assert shown.exit_code == 0, shown.output
            approve = ["site", "approve", study.spec_hash, "--reason", "IRB 2026-041", "--home", str(home)]
            assert runner.invoke(app, approve).exit_code == 0
        exec(compile(blocks[1], f"{DOC}:block-2", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "awaiting_approval" in printed
    assert "completed 3/3 rounds" in printed
    assert (work / "model.safetensors").is_file()
    predictions = namespace["predictions"]
    assert predictions.row_ids[0] == "new-patients-0"
    assert len(predictions.probabilities) == 25
    assert float(np.std(predictions.probabilities)) > 0.05  # trained, not the all-zeros start
