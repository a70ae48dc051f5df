"""README's "Running a real federation", run as written: the test reads the section's ``sh`` blocks and runs
each command line with bash, changing only what the README says changes in a real deployment (the host is
loopback, the port a free one, each party's folders are temporary, and the placeholders SPEC-HASH and STUDY-ID
are what the earlier commands printed). Hospital A's block runs for hospital B with B's name, token and data.

Each party works in its own folder; what the README says is sent between parties (tokens, ca.pem, the hash)
is copied between them. No Python is written by any party: every step is a ``fedhealth`` command.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

README = Path(__file__).resolve().parents[2] / "README.md"
SITES = ("hospital-a", "hospital-b")
FEATURES = ("age", "bp", "chol", "hr", "oldpeak")


def readme_blocks() -> list[list[str]]:
    """The command lines of each ``sh`` block in the section (continuation lines joined, comments kept)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Running a real federation", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for body in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        lines = body.replace("\\\n", " ").splitlines()
        blocks.append([line for line in lines if line.strip() and not line.lstrip().startswith("#")])
    return blocks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_cohort(path: Path, rng: np.random.Generator, n: int, *, shift: float, label: bool = True) -> None:
    """A CSV like a hospital's export: a text patient id, numeric features and a 0/1 label."""
    X = rng.normal(size=(n, len(FEATURES))) + shift
    logits = X @ np.array([1.5, -1.0, 0.8, 0.0, 1.2]) - shift
    y = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(int)
    header = ["patient_id", *FEATURES] + (["target"] if label else [])
    rows = [",".join(header)]
    for i in range(n):
        values = [f"P{path.stem[:1].upper()}{i:04d}", *(f"{v:.3f}" for v in X[i])]
        rows.append(",".join(values + ([str(y[i])] if label else [])))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


class Parties:
    """Runs README lines as each party, in its folder, with the substitutions a deployment makes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.background: list[subprocess.Popen[bytes]] = []
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
        self.values: dict[str, str] = {}

    def folder(self, party: str) -> Path:
        path = self.root / party
        path.mkdir(parents=True, exist_ok=True)
        return path

    def substitute(self, line: str, site: str | None = None) -> str:
        line = line.replace("/srv/fedhealth", str(self.root / "orchestrator-home"))
        line = line.replace("fl.example.org", "127.0.0.1").replace("0.0.0.0", "127.0.0.1")
        line = line.replace("8443", str(self.port))
        if site is not None:
            line = line.replace("hospital-a", site)
            line = line.replace("/var/lib/fedhealth", str(self.root / site / "home"))
            line = line.replace("/data/cohort.csv", str(self.root / site / "cohort.csv"))
        for placeholder, value in self.values.items():
            line = line.replace(placeholder, value)
        return line

    def run(self, party: str, line: str, site: str | None = None, timeout: float = 240) -> str:
        command = re.sub(r"\s+#[^\"']*$", "", self.substitute(line, site)).rstrip()  # a trailing comment
        if command.endswith("&"):
            log = (self.folder(party) / f"background-{len(self.background)}.log").open("ab")
            self.background.append(
                subprocess.Popen(
                    ["bash", "-c", "exec " + command.rstrip("&")],
                    cwd=self.folder(party),
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            log.close()
            return ""
        done = subprocess.run(
            ["bash", "-c", f"set -euo pipefail\n{command}"],
            cwd=self.folder(party),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"{party}: {command}\nstdout: {done.stdout}\nstderr: {done.stderr}"
        assert "Traceback" not in done.stderr, done.stderr
        return done.stdout

    def wait_for_orchestrator(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.background:
                assert proc.poll() is None, f"a background command exited with {proc.returncode}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.1)
        raise AssertionError("the orchestrator did not start listening")

    def stop(self) -> None:
        for proc in reversed(self.background):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def test_the_readme_federation_runs_as_written(tmp_path):
    blocks = readme_blocks()
    assert len(blocks) == 5, (
        "the section has five blocks: operator, hospital, researcher, steward, researcher"
    )
    operator, hospital, researcher, steward, results = blocks
    parties = Parties(tmp_path)
    rng = np.random.default_rng(3)
    for site, n, shift in ((SITES[0], 160, 0.0), (SITES[1], 110, 0.4)):
        write_cohort(parties.folder(site) / "cohort.csv", rng, n, shift=shift)
    write_cohort(parties.folder("researcher") / "new-patients.csv", rng, 40, shift=0.2, label=False)
    try:
        # the operator: init, serve (in the background), one token per hospital
        for line in operator:
            parties.run("operator", line)
            if "orchestrator serve" in line:
                parties.wait_for_orchestrator()
        ca = parties.root / "orchestrator-home" / "ca.pem"
        for site in SITES:  # "send each hospital its token and ca.pem"
            shutil.copy(parties.folder("operator") / f"{site}.token", parties.folder(site))
            shutil.copy(ca, parties.folder(site) / "ca.pem")
        # each hospital: enroll, register its CSV (text ids, declared as the id column), serve
        for site in SITES:
            for line in hospital:
                out = parties.run(site, line, site=site)
                if "dataset add" in line:
                    assert "5 features" in out, out
                    assert "id patient_id" in out, out
                if "site check" in line:
                    assert "dataset:cohort" in out, out
                    assert "network.upload" in out, out
        # the researcher: template, hash, submit (the study now waits for the approvals)
        for line in researcher:
            out = parties.run("researcher", line)
            if "study hash" in line:
                parties.values["SPEC-HASH"] = out.strip()
            elif "study submit" in line:
                parties.values["STUDY-ID"] = out.strip()
        assert re.fullmatch(r"[0-9a-f]{64}", parties.values["SPEC-HASH"])
        # each steward: read the spec in full and in plain words, then approve it
        for site in SITES:
            for line in steward:
                out = parties.run(site, line, site=site)
                if "approvals show" in line:
                    assert '"train_sites"' in out, out
                    assert "In plain words:" in out, out
                    assert "5 feature column(s): age, bp, chol, hr, oldpeak" in out, out
                    assert "id column 'patient_id' (for consent only, never a feature)" in out, out
                    assert "Secure aggregation: off" in out, out
                    assert "What leaves this site" in out, out
        # the researcher: watch until done, download, predict on new patients' raw rows
        outputs = [parties.run("researcher", line) for line in results]
    finally:
        parties.stop()
    researcher_dir = parties.folder("researcher")
    assert (researcher_dir / "model.safetensors").stat().st_size > 0
    report = (researcher_dir / "report.json").read_text()
    assert '"status": "completed"' in report
    (predicted,) = [out for line, out in zip(results, outputs, strict=True) if "model predict" in line]
    predictions = predicted.strip().splitlines()
    assert len(predictions) == 40
    ids = [row.split("\t")[0] for row in predictions]
    assert ids[0].startswith("PN")  # rows named by the file's own ids
    assert len(set(ids)) == 40
    probabilities = np.array([float(row.split("\t")[1]) for row in predictions])
    assert np.all((probabilities > 0) & (probabilities < 1))
    assert probabilities.std() > 0.05  # a trained model, not the all-zeros start (0.5 for everyone)
    # the exported package selects the same columns by name and gives the same result; each site
    # standardized its own rows, so the package takes the rows standardized as `model predict` does
    import pandas as pd

    import fedhealth
    from fedhealth.data import standardize
    from fedhealth.learning import PackageInputError

    package = fedhealth.load_model(researcher_dir / "heart-model")
    assert package.feature_names == FEATURES
    rows = pd.read_csv(researcher_dir / "new-patients.csv")
    scaled, _ = standardize(rows[list(FEATURES)].to_numpy(), rows[list(FEATURES)].to_numpy())
    shuffled = pd.DataFrame(scaled, columns=list(FEATURES))[list(reversed(FEATURES))]
    with pytest.raises(PackageInputError, match="standardized"):
        package.predict_proba(shuffled)
    np.testing.assert_allclose(
        package.predict_proba(shuffled, assume_standardized=True), probabilities, atol=1e-4
    )
