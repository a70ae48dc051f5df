"""The site dashboard's data-quality page and overview: server time of a first (cold) load and of later loads.

A site home with one registered CSV dataset of ``--rows`` rows and ``--features`` numeric features (schema
inferred and pinned, as `site dataset add` does), and a site log holding ``--tasks`` training updates of
``--studies`` studies and ``--withdrawals`` withdrawals. The site dashboard app runs in this process (ASGI, no
network); each page is requested once cold, then ``--repeats`` times. The data-quality page's report is kept
per source snapshot, so later loads only ``stat`` the file; the overview folds only the log entries appended
since the previous load.

Run:  python benchmarks/site_dashboard.py [--rows 100000] [--features 20] [--tasks 2000] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

from fedhealth.agent import SiteDatasets, SiteGovernance, SiteHome, csv_uri
from fedhealth.crypto import IdentityKey
from fedhealth.dashboard import site_dashboard_app
from fedhealth.governance import AuditEventType, ConsentDecision, ConsentRecord

PURPOSE = "research"


def _home(root: Path) -> SiteHome:
    home = SiteHome(root / "site")
    home.root.mkdir(mode=0o700)
    IdentityKey.generate().save(home.identity_path)
    home.settings_path.write_text(json.dumps({"site": "bench", "orchestrator": "https://127.0.0.1:1"}))
    return home


def _csv(path: Path, rows: int, features: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    X = rng.normal(50.0, 10.0, size=(rows, features))
    y = rng.integers(0, 2, size=rows)
    with path.open("w") as out:
        out.write("pid," + ",".join(f"f{j}" for j in range(features)) + ",label\n")
        for i in range(rows):
            out.write(f"p{i}," + ",".join(f"{v:.3f}" for v in X[i]) + f",{y[i]}\n")
    return path


def _log(home: SiteHome, tasks: int, studies: int, withdrawals: int) -> None:
    patients = [f"p{i}" for i in range(200)]
    with SiteGovernance(home) as governance:
        registry = governance.consent()
        registry.add(
            [ConsentRecord(patient_id=p, purpose=PURPOSE, decision=ConsentDecision.PERMIT) for p in patients]
        )
        snapshot = registry.filter(patients, PURPOSE, governance.log.clock.now()).snapshot_hash
        with governance.log.batch():
            for t in range(tasks):
                study, round_ = f"st-{t % studies}", t // studies + 1
                governance.log.append(
                    AuditEventType.TASK_RECEIVED,
                    {"task_id": f"t{t}", "study_id": study, "round": round_, "kind": "train",
                     "spec_hash": "0" * 64, "dataset": "cohort"},
                )  # fmt: skip
                governance.log.append(
                    AuditEventType.UPDATE_SENT,
                    {"task_id": f"t{t}", "study_id": study, "round": round_, "model_in": "0" * 64,
                     "dataset_fingerprint": "f" * 64, "consent_snapshot": snapshot},
                )  # fmt: skip
        for p in patients[:withdrawals]:
            registry.withdraw(p, PURPOSE)


def _time(client: TestClient, path: str) -> float:
    start = time.perf_counter()
    response = client.get(path)
    elapsed = time.perf_counter() - start
    assert response.status_code == 200, response.text[:300]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=2_000)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--withdrawals", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        home = _home(root)
        csv = _csv(root / "cohort.csv", args.rows, args.features)
        SiteDatasets(home).add("cohort", csv_uri(csv, label="label", id_column="pid"))
        _log(home, args.tasks, args.studies, args.withdrawals)
        app = site_dashboard_app(home, token="t", steward="bench")
        results: list[tuple[str, float, list[float]]] = []
        with TestClient(app) as client:
            client.get("/login?token=t", follow_redirects=False)
            for path in ("/datasets", "/overview", "/overview/verify"):
                first = _time(client, path)
                later = [_time(client, path) for _ in range(args.repeats)]
                results.append((path, first, later))
            st = csv.stat()
            os.utime(csv, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a changed file: read again
            changed = _time(client, "/datasets")
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    size = f"{args.rows:,} rows x {args.features} features ({csv.name}, {st.st_size / 1e6:.0f} MB)"
    lines = [
        f"site dashboard on {platform.node()} ({os.cpu_count()} cores, Python {platform.python_version()}), "
        f"{when}; dataset {size}; log of {args.tasks:,} training updates, {args.withdrawals} withdrawals",
        "| page | first load | median of later loads | p90 |",
        "|---|---|---|---|",
    ]
    for path, first, later in results:
        p90 = sorted(later)[int(0.9 * (len(later) - 1))]
        lines.append(
            f"| `{path}` | {first * 1000:,.0f} ms | **{statistics.median(later) * 1000:,.1f} ms** | "
            f"{p90 * 1000:,.1f} ms |"
        )
    lines.append(f"| `/datasets` after the file changed | {changed * 1000:,.0f} ms | | |")
    print("\n".join(lines) if args.markdown else json.dumps({"results": results, "changed": changed}))


if __name__ == "__main__":
    main()
