"""Round latency over the real services: plain HTTP vs HTTPS with tokens, and secure vs plain aggregation.

Each configuration starts a fresh orchestrator and N agents (separate processes, loopback), runs a study of a
synthetic model of P float32 parameters and reports the orchestrator-timed median round (open -> close,
which includes task delivery, download, upload, validation, aggregation and opening the next round). The
two variants being compared run in alternation (A B A B ..., ``--repeats`` studies each) for each
configuration; the ratio is taken pair by pair, so it holds when the shared machine's speed drifts.

Run:  python benchmarks/transport.py [--rounds 20] [--repeats 3] [--secure-only] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from fedhealth.learning import SYNTHETIC_RECIPE, SyntheticParams
from fedhealth.protocol import SecureAggregationSpec, StudySpec, TaskKind
from fedhealth.runtime import recipe_spec, secure_codec
from fedhealth.sim import benchmark_rounds


def upload_bytes(sites: int, params: int) -> int:
    """Bytes a site uploads in the masked-input stage: 4 per ring element plus the message header."""
    names = [f"s{i}" for i in range(sites)]
    spec = StudySpec(
        name="x",
        dataset="x",
        recipe=recipe_spec(SYNTHETIC_RECIPE, SyntheticParams(n_params=params)),
        rounds=1,
        train_sites=names,
        # the codec's length does not depend on the keys: placeholders stand for the sites' fingerprints
        secure_aggregation=SecureAggregationSpec(site_keys={n: "0" * 64 for n in names}),
    )
    return 4 * secure_codec(spec, TaskKind.TRAIN).length


def _pairs(repeats: int, a: Callable[[], float], b: Callable[[], float]) -> tuple[list[float], list[float]]:
    """Run ``a`` and ``b`` in turn ``repeats`` times (A B A B ...): each pair sees the same machine."""
    first, second = [], []
    for _ in range(repeats):
        first.append(a())
        second.append(b())
    return first, second


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per study")
    parser.add_argument("--repeats", type=int, default=3, help="studies per variant, run in alternation")
    parser.add_argument(
        "--markdown", action="store_true", help="print Markdown tables for docs/benchmarks.md"
    )
    parser.add_argument(
        "--secure-only", action="store_true", help="only the secure vs plain comparison (10 sites x 1e5)"
    )
    args = parser.parse_args()
    started = time.monotonic()

    def median_round(sites: int, params: int, *, tls: bool, secure: bool = False) -> Callable[[], float]:
        return lambda: (
            benchmark_rounds(sites=sites, params=params, rounds=args.rounds, tls=tls, secure=secure).median_s
        )

    rows = []
    for sites in () if args.secure_only else (3, 10):
        for params in (1_000, 100_000, 1_000_000):
            plain, tls = _pairs(
                args.repeats, median_round(sites, params, tls=False), median_round(sites, params, tls=True)
            )
            ratios = [t / p for p, t in zip(plain, tls, strict=True)]
            rows.append(
                {
                    "sites": sites,
                    "params": params,
                    "http_s": statistics.median(plain),
                    "https_s": statistics.median(tls),
                    "ratio": statistics.median(ratios),
                    "ratios": ratios,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    secure_rows = []
    for sites, params in ((10, 100_000),):
        plain, secure = _pairs(
            args.repeats,
            median_round(sites, params, tls=True),
            median_round(sites, params, tls=True, secure=True),
        )
        ratios = [s / p for p, s in zip(plain, secure, strict=True)]
        secure_rows.append(
            {
                "sites": sites,
                "params": params,
                "plain_s": statistics.median(plain),
                "secure_s": statistics.median(secure),
                "ratio": statistics.median(ratios),
                "ratios": ratios,
                "upload_bytes": upload_bytes(sites, params),
            }
        )
        print(json.dumps(secure_rows[-1]), flush=True)
    if args.markdown:
        when = datetime.now(UTC).strftime("%Y-%m-%d")
        print(
            f"\n_{when}, {platform.node()} ({platform.machine()}, {platform.python_version()}), "
            f"{args.rounds} timed rounds per study, {args.repeats} studies per variant in alternation, "
            f"{time.monotonic() - started:.0f} s in all._\n"
        )
        if rows:
            print("| sites | params | plain HTTP median | HTTPS + tokens median | ratio (median, range) |")
            print("|---|---|---|---|---|")
        for r in rows:
            http, https = r["http_s"] * 1000, r["https_s"] * 1000
            print(
                f"| {r['sites']} | {r['params']:,} | {http:.1f} ms | {https:.1f} ms "
                f"| {r['ratio']:.2f} ({_spread(r['ratios'])}) |"
            )
        print(
            "\n| sites | params | plain round | secure round | ratio (median, range) "
            "| masked upload per site |"
        )
        print("|---|---|---|---|---|---|")
        for r in secure_rows:
            upload = f"{r['upload_bytes']:,} B (float32: {4 * r['params']:,} B)"
            plain_ms, secure_ms = r["plain_s"] * 1000, r["secure_s"] * 1000
            cells = [
                str(r["sites"]),
                f"{r['params']:,}",
                f"{plain_ms:.0f} ms",
                f"{secure_ms:.0f} ms",
                f"{r['ratio']:.2f} ({_spread(r['ratios'])})",
                upload,
            ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
