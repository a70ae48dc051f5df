"""`fedhealth demo` as a user runs it: a separate process, offline, to completion or to Ctrl-C."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from support import PROXY_VARIABLES, proxy_recorder

pytestmark = pytest.mark.e2e


def _demo(tmp_path, *args, env_extra=None):
    env = {**os.environ, "COLUMNS": "120", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "fedhealth", "demo", "--out", str(tmp_path / "out"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=env,
    )


def test_the_demo_trains_four_hospitals_securely_and_prints_the_summary(tmp_path):
    home = tmp_path / "home"  # where a library would keep a device id or an event cache
    home.mkdir()
    with proxy_recorder() as (port, reached_out):
        proxy = f"http://127.0.0.1:{port}"
        env_extra = {name: proxy for name in PROXY_VARIABLES} | {
            "HOME": str(home),
            "ORT_DISABLE_TELEMETRY": "0",
        }
        proc = _demo(tmp_path, "--rounds", "4", env_extra=env_extra)
        output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    # nothing phones home (docs/security.md): no process of the demo reached past its own federation
    assert reached_out == []
    assert not (home / ".cache" / "Microsoft").exists()
    for site in ("hospital-a", "hospital-b", "hospital-c", "hospital-d"):
        assert f"{site}: data steward approved spec" in output
        assert f"│ {site}" in output
    assert "secure aggregation (SecAgg+)" in output
    assert "│ mean" in output
    assert "rounds: 4" in output
    assert output.count("entries verified") == 5  # the orchestrator's and every site's audit log
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed"
    assert report["evaluation"]["secure"] is True
    assert "per_site" not in report["evaluation"]  # the orchestrator never saw a site's figures
    assert 0.8 < report["evaluation"]["accuracy"] <= 1.0
    # The model card describes the model written next to it, and names for each hospital its keyed commitment
    # to the consent snapshot that hospital recorded in its own database when it trained (the commitment
    # opens, in the hospital's own openings table, to that snapshot).
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert report["final_model_digest"] == digest
    card = (out / "model-card.md").read_text()
    assert card.startswith(f"# Model card: {report['study_id']}, round 4\n")
    assert f"- Model digest (sha256): `{digest}`" in card
    rows = dict(re.findall(r"^\| (hospital-[a-d]) \| .+ \| `([0-9a-f]{64})` \|$", card, re.MULTILINE))
    assert sorted(rows) == ["hospital-a", "hospital-b", "hospital-c", "hospital-d"], card
    for site, commitment in rows.items():
        with contextlib.closing(sqlite3.connect(out / "state" / "sites" / site / "site.sqlite")) as db:
            recorded = {h for (h,) in db.execute("SELECT snapshot_hash FROM gov_consent_snapshots")}
            opened = dict(
                db.execute(
                    "SELECT commitment, digest FROM site_commitment_openings WHERE kind = 'consent_snapshot'"
                )
            )
        assert commitment not in recorded  # never the bare hash
        assert opened[commitment] in recorded, (site, commitment, recorded)
    # each hospital states the consent model its gate applied; the demo's hospitals hold no consent record,
    # so each applied opt-out (policy "auto"), and the card says what opt-out admitted, not "only the
    # patients whose recorded consent permitted" (it said so until 2026-12-08)
    models = re.findall(r"^\| hospital-[a-d] \| .+ \| ([a-z -]+) \| `[0-9a-f]{64}` \|$", card, re.MULTILINE)
    assert models == ["opt-out"] * 4, card
    consent = card.split("## Consent statement\n", 1)[1].split("\n## ", 1)[0]
    assert (
        "- opt-out (hospital-a, hospital-b, hospital-c, hospital-d): training used every patient except"
        in consent
    )
    assert "recorded consent permitted" not in consent
    assert "No consent withdrawal affecting this model version has been reported." in consent
    lineage = card.split("## Lineage\n", 1)[1]
    versions = re.findall(r"^\d+\. `[0-9a-f]{16}` round (\d+)", lineage, re.MULTILINE)
    assert versions == ["4", "3", "2", "1", "0"]


def test_ctrl_c_stops_every_process_of_the_demo(tmp_path):
    proc = _demo(tmp_path, "--rounds", "200")
    ready = tmp_path / "out" / "state" / "orchestrator.ready.json"
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the demo's orchestrator never started"
        time.sleep(0.1)
    url = json.loads(ready.read_text())["url"]
    time.sleep(3)  # let the agents start and the study run
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "all processes stopped" in output
    with pytest.raises(httpx.TransportError):  # the orchestrator is gone
        httpx.get(f"{url}/healthz", verify=False, timeout=5)
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "out" / "state")], capture_output=True, text=True, check=False
    ).stdout.split()
    assert leftovers == [], f"processes left running: {leftovers}"
