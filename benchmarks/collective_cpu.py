"""CPU time of each process per collective call, over the real services: one probe session (the study of
``fedhealth benchmark collective``), with the orchestrator's and each agent's CPU time read from /proc before
and after, divided by the session's call count. CPU time moves much less than wall time on a shared host, so
this is how two versions of the code are compared (run the script once per version, in alternation; point
PYTHONPATH at the other version's ``src`` to run that one: the services inherit the environment, and the
script uses nothing newer than the first version of collective sessions).

Run:  python benchmarks/collective_cpu.py --size 10000 --calls 300 [--sites 4]   (Linux only)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from fedhealth.protocol import RecipeSpec, SecureAggregationSpec, StudySpec, StudyStatus
from fedhealth.sim import LocalFederation


def p99(values: list[float]) -> float:
    """Nearest rank, as ``fedhealth benchmark collective`` reports it."""
    return sorted(values)[max(0, math.ceil(0.99 * len(values)) - 1)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--mtls", action="store_true", help="mutual TLS (the orchestrator's second listener)")
    args = parser.parse_args()
    names = [f"site-{i:02d}" for i in range(args.sites)]
    with (
        tempfile.TemporaryDirectory(prefix="fedhealth-bench-") as tmp,
        LocalFederation(Path(tmp), log_level="warning", mtls=args.mtls) as fed,
    ):
        fed.start_orchestrator()
        for name in names:
            fed.add_site(name)
            fed.start_agent(name, {})
        fed.wait_for_sites(names)
        spec = StudySpec(
            name="bench-collective-cpu",
            dataset="none",
            recipe=RecipeSpec(name="collective-probe", params={"size": args.size, "calls": args.calls}),
            rounds=1,
            train_sites=names,
            round_deadline_s=3600,
            secure_aggregation=SecureAggregationSpec(site_keys=fed.site_keys(names), stage_timeout_s=120),
        )
        assert fed.orchestrator is not None
        pids = {"orchestrator": fed.orchestrator.pid, **{n: p.pid for n, p in fed.agents.items()}}
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        load, started = os.getloadavg()[0], time.monotonic()
        final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=3600, interval=0.1)
        after = {k: cpu_seconds(p) for k, p in pids.items()}
        if final.status is not StudyStatus.COMPLETED:
            raise SystemExit(f"session {final.status.value}: {final.reason}")
        report = final.rounds[0].metrics or {}
    calls = report["session"]["calls"]
    print(
        json.dumps(
            {
                "size": args.size,
                "sites": args.sites,
                "calls": calls,
                "wall_s": round(time.monotonic() - started, 2),
                "load": load,
                "cpu_ms_per_call": {k: round((after[k] - before[k]) / calls * 1e3, 2) for k in pids},
                "secure_median_ms": statistics.median(report["secure_s"]) * 1e3,
                "secure_p99_ms": p99(report["secure_s"]) * 1e3,
                "plain_median_ms": statistics.median(report["plain_s"]) * 1e3,
                "mismatches": report["mismatches"],
            }
        )
    )


if __name__ == "__main__":
    main()
