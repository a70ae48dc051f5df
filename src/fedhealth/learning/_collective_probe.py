"""``collective-probe``: the collective benchmark's recipe, timing secure sums over a session with unmasked
sums beside them. It reads no data.

Every site sums the same deterministic vector ``k + (j mod 1000) / 1000`` (k: its position among the sites,
j: the coordinate) in each call, so each site knows the exact fixed-point sum to expect and counts any call
that differs. A call's latency is measured at each site, from entering the collective to its result; the
session then sums the sites' latency lists (one more secure sum) and the leader broadcasts, per call, the
mean over sites. That broadcast is the session's released result, which ``finish`` returns as the study's
metrics. With ``baseline`` false every sum is masked.
"""

from __future__ import annotations

import json
import time
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from fedhealth.core import InputError
from fedhealth.data import TabularDataset
from fedhealth.learning._collectives import BenchmarkCollectives, Collectives, InMemorySession
from fedhealth.learning._recipe import (
    CombinationPattern,
    DataSchema,
    RecipeCapabilities,
    ReferenceStep,
    SessionContext,
    SiteSessionOutcome,
    TemplateParam,
)
from fedhealth.secagg import decode_fixed, encode_fixed


class ProbeParams(BaseModel):
    """``recipe.params`` of ``collective-probe``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(ge=1, le=1 << 26, description="float64 values in each sum")
    calls: int = Field(default=50, ge=1, le=10_000_000, description="timed calls of each kind")
    warmup: int = Field(default=3, ge=0, le=1000, description="calls before the timed ones")
    baseline: bool = Field(
        default=True,
        description="an unmasked sum after each secure one (the probe's values in clear: benchmark data)",
    )


def probe_values(position: int, size: int) -> NDArray[np.float64]:
    return position + (np.arange(size) % 1000) / 1000.0


def probe_expected(n_sites: int, size: int) -> NDArray[np.float64]:
    """The exact fixed-point sum every site must get."""
    total = np.zeros(size, dtype=np.uint64)
    for k in range(n_sites):
        np.add(total, encode_fixed(probe_values(k, size), n_sites), out=total)
    return decode_fixed(total)


class CollectiveProbeRecipe:
    """The collective benchmark (``fedhealth benchmark collective``) as a recipe, version 1."""

    name: Literal["collective-probe"] = "collective-probe"
    version: Literal["1"] = "1"
    params_model = ProbeParams
    pattern = CombinationPattern.COLLECTIVE
    capabilities = RecipeCapabilities(reads_data=False)

    def data_schema(self, params: ProbeParams) -> DataSchema:
        return DataSchema(classes=None)  # reads no data: any dataset, any label

    def describe(self, params: ProbeParams) -> str:
        clear = " and the same sums unmasked (synthetic values, in clear)" if params.baseline else ""
        return (
            f"a benchmark of {params.warmup + params.calls} secure sums of {params.size} synthetic values"
            f"{clear}; it reads no data"
        )

    def template(self, n_features: int | None) -> list[TemplateParam]:
        return [
            TemplateParam(key="size", value=10_000, comment="values per sum (it reads no data)"),
            TemplateParam(key="calls", value=50, comment="timed calls"),
        ]

    def reference_step(self) -> ReferenceStep:
        def run() -> None:
            session = InMemorySession(["a", "b", "c"])
            session.run(lambda s: s.secure_sum(np.ones(10_000)))

        return ReferenceStep(run=run, note="one in-process secure sum of 1e4 values over 3 sites")

    def run_site(
        self,
        params: ProbeParams,
        dataset: TabularDataset | None,
        session: Collectives,
        ctx: SessionContext,
    ) -> SiteSessionOutcome:
        if params.baseline and not isinstance(session, BenchmarkCollectives):
            raise InputError("the probe's unmasked baseline needs a benchmark session")
        n = len(session.sites)
        values = probe_values(session.sites.index(session.site), params.size)
        expected = probe_expected(n, params.size)
        secure: list[float] = []
        plain: list[float] = []
        wrong = 0
        for call in range(params.warmup + params.calls):
            started = time.perf_counter()
            got = session.secure_sum(values)
            took = time.perf_counter() - started
            wrong += not np.array_equal(got, expected)
            took_plain = 0.0
            if params.baseline:
                assert isinstance(session, BenchmarkCollectives)
                started = time.perf_counter()
                got = session.unmasked_sum(values)
                took_plain = time.perf_counter() - started
                wrong += not np.array_equal(got, expected)
            if call >= params.warmup:
                secure.append(took)
                plain.append(took_plain)
        totals = session.secure_sum(np.array([*secure, *plain, wrong], dtype=np.float64))
        report = None
        if session.site == session.sites[0]:
            k = params.calls
            report = json.dumps(
                {
                    "sites": n,
                    "size": params.size,
                    "calls": k,
                    "secure_s": (totals[:k] / n).tolist(),
                    "plain_s": (totals[k : 2 * k] / n).tolist() if params.baseline else [],
                    "mismatches": round(float(totals[-1])),
                }
            ).encode()
        session.broadcast(report)
        return SiteSessionOutcome(record={"calls": params.warmup + params.calls, "mismatches_here": wrong})

    def finish(self, params: ProbeParams, released: bytes) -> dict[str, JsonValue]:
        report = json.loads(released)
        if not isinstance(report, dict):
            raise ValueError("the probe's report is a JSON object")
        return report


COLLECTIVE_PROBE_RECIPE = CollectiveProbeRecipe()
