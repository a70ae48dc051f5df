"""SecAgg+ compute benchmark: one whole round (all clients and the server) in one process.

    python benchmarks/secagg_compute.py --sites 10 --params 1000000
    python benchmarks/secagg_compute.py --sites 10 --params 1000000 --dropout 0.2
    python benchmarks/secagg_compute.py --sites 50 --params 100000

Prints the median compute time per round (quantization, every client and server step, message encoding and
decoding, dequantization; key enrollment and input generation excluded) and the bytes each site uploads, next
to the 4 bytes per parameter that plain float32 would take; and, measured in the same run right after each
round, the AES-CTR keystream floor of that round (every mask's keystream and its addition: 110 keystreams of
4 MB for 10 sites x 1e6) with the ratio of the two (target: <= 2.5).
"""

from __future__ import annotations

import argparse
import json

from fedhealth.secagg import Stage, simulate_round

DROP_STAGES = {
    "advertise": Stage.ADVERTISE_KEYS,
    "share": Stage.SHARE_KEYS,
    "masked": Stage.MASKED_INPUT,
    "consistency": Stage.CONSISTENCY,
    "unmask": Stage.UNMASK,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--dropout", type=float, default=0.0, help="fraction of sites that drop out")
    parser.add_argument(
        "--drop-stage",
        choices=sorted(DROP_STAGES),
        default="masked",
        help="stage at which dropping sites go silent (masked: after sharing keys, before the masked input)",
    )
    parser.add_argument("--threshold", type=int, default=None, help="default: ceil(2n/3)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    args = parser.parse_args(argv)

    report = simulate_round(
        sites=args.sites,
        params=args.params,
        dropout=args.dropout,
        drop_stage=DROP_STAGES[args.drop_stage],
        threshold=args.threshold,
        repeats=args.repeats,
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return
    graph = "all pairs" if report.degree == report.sites - 1 else f"{report.degree}-regular graph"
    print(
        f"SecAgg+ {report.sites} sites x {report.params:,} params ({graph}, t={report.threshold}, "
        f"{report.dropped} dropped at {report.drop_stage.value})"
    )
    print(
        f"  compute per round (median of {report.repeats}): {report.seconds:.3f} s  "
        f"[clients {report.client_seconds:.3f} s, server {report.server_seconds:.3f} s, "
        f"of which quantization {report.codec_seconds:.3f} s]"
    )
    print(
        f"  keystream floor ({report.keystreams} AES-CTR keystreams of {4 * report.vector_length:,} B and "
        f"their additions, same run): {report.floor_seconds:.3f} s; round / floor = {report.floor_ratio:.2f} "
        f"(CPU time: {report.cpu_seconds:.3f} / {report.floor_cpu_seconds:.3f} s "
        f"= {report.floor_cpu_ratio:.2f})"
    )
    runs = ", ".join(f"{s:.3f}" for s in report.seconds_per_repeat)
    print(f"  all runs: {runs} s; median CPU time of this process {report.cpu_seconds:.3f} s")
    print(
        f"  masked input per site: {report.masked_input_bytes:,} B "
        f"(float32 would be {4 * report.params:,} B; +{report.masked_input_bytes - 4 * report.params} B for "
        f"{report.vector_length - report.params} scalars and the header)"
    )
    print(f"  total upload per site, all stages: {report.upload_bytes_per_site:,} B")
    print(f"  unmasked sum equals the plain sum of the quantized inputs: {report.exact}")


if __name__ == "__main__":
    main()
