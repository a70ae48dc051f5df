"""Round latency over the real services: plain HTTP vs HTTPS with tokens, and secure vs plain aggregation.

Each configuration starts a fresh orchestrator and N agents (separate processes, loopback), runs a study of a
synthetic model of P float32 parameters and reports the orchestrator-timed median round (open -> close,
which includes task delivery, download, upload, validation, aggregation and opening the next round). The
two variants being compared run one after the other for each configuration, so their ratio is measured
under the same machine conditions.

Run:  python benchmarks/transport.py [--rounds 20] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime

from fedhealth.protocol import RecipeSpec, SecureAggregationSpec, StudySpec, TaskKind
from fedhealth.runtime import secure_codec
from fedhealth.sim import benchmark_rounds


def upload_bytes(sites: int, params: int) -> int:
    """Bytes a site uploads in the masked-input stage: 4 per ring element plus the message header."""
    spec = StudySpec(
        name="x",
        dataset="x",
        recipe=RecipeSpec(name="synthetic", n_params=params),
        rounds=1,
        train_sites=[f"s{i}" for i in range(sites)],
        secure_aggregation=SecureAggregationSpec(),
    )
    return 4 * secure_codec(spec, TaskKind.TRAIN, sites).length


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--markdown", action="store_true", help="print Markdown tables for docs/benchmarks.md"
    )
    args = parser.parse_args()
    started = time.monotonic()
    rows = []
    for sites in (3, 10):
        for params in (1_000, 100_000, 1_000_000):
            plain = benchmark_rounds(sites=sites, params=params, rounds=args.rounds, tls=False)
            tls = benchmark_rounds(sites=sites, params=params, rounds=args.rounds, tls=True)
            rows.append({"sites": sites, "params": params, "http_s": plain.median_s, "https_s": tls.median_s})
            print(json.dumps(rows[-1]), flush=True)
    secure_rows = []
    for sites, params in ((10, 100_000),):
        plain = benchmark_rounds(sites=sites, params=params, rounds=args.rounds, tls=True)
        secure = benchmark_rounds(sites=sites, params=params, rounds=args.rounds, tls=True, secure=True)
        secure_rows.append(
            {
                "sites": sites,
                "params": params,
                "plain_s": plain.median_s,
                "secure_s": secure.median_s,
                "upload_bytes": upload_bytes(sites, params),
            }
        )
        print(json.dumps(secure_rows[-1]), flush=True)
    if args.markdown:
        when = datetime.now(UTC).strftime("%Y-%m-%d")
        print(
            f"\n_{when}, {platform.node()} ({platform.machine()}, {platform.python_version()}), "
            f"{args.rounds} timed rounds per cell, {time.monotonic() - started:.0f} s in all._\n"
        )
        print("| sites | params | plain HTTP median | HTTPS + tokens median | ratio |")
        print("|---|---|---|---|---|")
        for r in rows:
            ratio = r["https_s"] / r["http_s"]
            http, https = r["http_s"] * 1000, r["https_s"] * 1000
            print(f"| {r['sites']} | {r['params']:,} | {http:.1f} ms | {https:.1f} ms | {ratio:.2f} |")
        print("\n| sites | params | plain round | secure round | ratio | masked upload per site |")
        print("|---|---|---|---|---|---|")
        for r in secure_rows:
            ratio = r["secure_s"] / r["plain_s"]
            upload = f"{r['upload_bytes']:,} B (float32: {4 * r['params']:,} B)"
            plain, secure = r["plain_s"] * 1000, r["secure_s"] * 1000
            cells = [
                str(r["sites"]),
                f"{r['params']:,}",
                f"{plain:.0f} ms",
                f"{secure:.0f} ms",
                f"{ratio:.2f}",
                upload,
            ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
