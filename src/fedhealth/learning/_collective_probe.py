"""The collective benchmark's site program: time secure sums over a session, with unmasked sums beside them.

Every site sums the same deterministic vector ``k + (j mod 1000) / 1000`` (k: its position among the sites,
j: the coordinate) in each call, so each site knows the exact fixed-point sum to expect and counts any call
that differs. A call's latency is measured at each site, from entering the collective to its result; the
session then sums the sites' latency lists (one more secure sum) and the leader broadcasts, per call, the
mean over sites. That broadcast is the session's released result. Without the baseline every sum is
masked.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhealth.learning._collectives import BenchmarkCollectives
from fedhealth.secagg import decode_fixed, encode_fixed

PROBE_WARMUP_CALLS = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeSettings:
    size: int  # values per sum
    calls: int  # timed calls of each kind
    warmup: int = PROBE_WARMUP_CALLS
    baseline: bool = True  # an unmasked sum after each secure one (values in clear: benchmark data only)


def probe_values(position: int, size: int) -> NDArray[np.float64]:
    return position + (np.arange(size) % 1000) / 1000.0


def probe_expected(n_sites: int, size: int) -> NDArray[np.float64]:
    """The exact fixed-point sum every site must get."""
    total = np.zeros(size, dtype=np.uint64)
    for k in range(n_sites):
        np.add(total, encode_fixed(probe_values(k, size), n_sites), out=total)
    return decode_fixed(total)


def run_probe(settings: ProbeSettings, session: BenchmarkCollectives) -> None:
    n = len(session.sites)
    values = probe_values(session.sites.index(session.site), settings.size)
    expected = probe_expected(n, settings.size)
    secure: list[float] = []
    plain: list[float] = []
    wrong = 0
    for call in range(settings.warmup + settings.calls):
        started = time.perf_counter()
        got = session.secure_sum(values)
        took = time.perf_counter() - started
        wrong += not np.array_equal(got, expected)
        took_plain = 0.0
        if settings.baseline:
            started = time.perf_counter()
            got = session.unmasked_sum(values)
            took_plain = time.perf_counter() - started
            wrong += not np.array_equal(got, expected)
        if call >= settings.warmup:
            secure.append(took)
            plain.append(took_plain)
    totals = session.secure_sum(np.array([*secure, *plain, wrong], dtype=np.float64))
    report = None
    if session.site == session.sites[0]:
        k = settings.calls
        report = json.dumps(
            {
                "sites": n,
                "size": settings.size,
                "calls": k,
                "secure_s": (totals[:k] / n).tolist(),
                "plain_s": (totals[k : 2 * k] / n).tolist() if settings.baseline else [],
                "mismatches": round(float(totals[-1])),
            }
        ).encode()
    session.broadcast(report)


def probe_report(released: bytes | None) -> dict[str, Any]:
    """The session's public result (the leader's last broadcast) as round metrics."""
    if released is None:
        raise ValueError("the probe session released nothing")
    report = json.loads(released)
    if not isinstance(report, dict):
        raise ValueError("the probe's report is a JSON object")
    return report
