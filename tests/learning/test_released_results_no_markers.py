"""The recipes' released results and session traffic, read by a curious orchestrator for a marked value.

One site holds a patient whose value is 987654.321 (far outside every public range) in a tiny stratum. The
collective recipes (``stats``, ``lightgbm``, ``xgboost``) run over an in-memory session with the real masks
and relay; every byte a site sends to the relay and every byte the relay hands back (what the orchestrator
relays, broadcasts included) is recorded and searched for the value: as text in any format, and as the raw
float64/float32 bytes of the value (a vector sent in clear would carry those). The released result itself
(the leader's broadcast, which the orchestrator stores) must not hold the value either, and a stratum of
fewer than k records must be suppressed.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedhealth.data import TabularDataset
from fedhealth.learning import (
    LIGHTGBM_RECIPE,
    STATS_RECIPE,
    XGBOOST_RECIPE,
    InMemorySession,
    LightGbmParams,
    SessionContext,
    StatsParams,
    XGBoostParams,
)

MARKED = 987654.321
TEXT_FORMS = ("987654", "9.87654", "9.8765", "987654.3", "0x1.e240", "1.e2405")  # str, %e, %g, repr, hex


def binary_forms(value: float) -> list[bytes]:
    return [
        struct.pack("<d", value),
        struct.pack(">d", value),
        struct.pack("<f", value),
        struct.pack(">f", value),
    ]


def site_rows(name: str, n: int, seed: int, *, marked: bool = False) -> TabularDataset:
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.normal(size=n), rng.integers(0, 2, size=n).astype(np.float64)])
    y = (X[:, 0] + rng.normal(scale=0.5, size=n) > 0).astype(np.int64)
    if marked:
        X[0, 0] = MARKED
    return TabularDataset(
        name=name, X_train=X, y_train=y, X_test=X[:0], y_test=y[:0], feature_names=("x", "z")
    )


def sites() -> dict[str, TabularDataset]:
    """Two ordinary sites, and a third with 3 patients, one of them marked."""
    return {
        "site-a": site_rows("site-a", 60, 1),
        "site-b": site_rows("site-b", 60, 2),
        "site-c": site_rows("site-c", 3, 3, marked=True),
    }


class Recorded:
    """An in-memory session whose every exchange (site -> relay, relay -> site) is kept."""

    def __init__(self, names: list[str]) -> None:
        self.session = InMemorySession(names, call_timeout_s=60)
        self.traffic: list[bytes] = []
        lock = threading.Lock()
        exchange = self.session.exchange

        def recording(site: str, index: int, body: bytes) -> bytes | memoryview:
            with lock:
                self.traffic.append(bytes(body))
            result = exchange(site, index, body)
            with lock:
                self.traffic.append(bytes(result))
            return result

        self.session.exchange = recording  # type: ignore[method-assign]

    def run(self, program: Callable[[Any], Any]) -> dict[str, Any]:
        return self.session.run(program)

    @property
    def released(self) -> bytes:
        assert self.session.relay.released is not None
        return bytes(self.session.relay.released)


def assert_no_marked_value(recorded: Recorded) -> None:
    assert len(recorded.traffic) > 4
    blobs = [*recorded.traffic, recorded.released]
    for blob in blobs:
        text = blob.decode("latin-1")
        for form in TEXT_FORMS:
            assert form not in text, f"{form!r} in what the orchestrator relays"
        for raw in binary_forms(MARKED):
            assert raw not in blob, "the marked value's bytes in what the orchestrator relays"


def test_the_control_a_vector_sent_in_clear_would_be_caught():
    """The search above finds the value where a careless program would put it."""
    clear = np.array([1.0, MARKED, 2.0]).tobytes()
    assert any(raw in clear for raw in binary_forms(MARKED))
    assert any(form in json.dumps({"max": MARKED}) for form in TEXT_FORMS)


def test_stats_releases_no_marked_value_and_suppresses_the_tiny_site():
    datasets = sites()
    params = StatsParams(features=["x", "z"], by_site=True, by_label=True, min_cell_count=5)
    recorded = Recorded(sorted(datasets))

    def program(member: Any) -> Any:
        ctx = SessionContext(site=member.site, seed=0, rng=np.random.default_rng(0))
        return STATS_RECIPE.run_site(params, datasets[member.site], member, ctx)

    recorded.run(program)
    assert_no_marked_value(recorded)
    report = STATS_RECIPE.finish(params, recorded.released)
    tiny = [s for s in report["strata"] if s["stratum"]["site"] == "site-c"]
    assert len(tiny) == 3  # the site, and the site by label
    for stratum in tiny:
        assert stratum["rows"] == {"value": None, "suppressed": True}
        for figures in stratum["features"].values():
            assert figures["mean"] == {"value": None, "suppressed": True}
            assert figures["variance"] == {"value": None, "suppressed": True}
    # the marked patient is the only one above the last public edge: that bin is suppressed everywhere
    [everyone] = [s for s in report["strata"] if s["stratum"] == {"label": None, "site": None}]
    assert everyone["features"]["x"]["histogram"][-1] == {"value": None, "suppressed": True}


@pytest.mark.parametrize("library", ["lightgbm", "xgboost"])
def test_boosting_releases_no_marked_value_in_its_traffic_or_its_model(library):
    datasets = sites()
    if library == "lightgbm":
        recipe: Any = LIGHTGBM_RECIPE
        params: Any = LightGbmParams(n_features=2, num_rounds=5, num_leaves=4, grid_cells=64)
    else:
        recipe = XGBOOST_RECIPE
        params = XGBoostParams(n_features=2, num_rounds=5, max_depth=2)
    recorded = Recorded(sorted(datasets))

    def program(member: Any) -> Any:
        ctx = SessionContext(site=member.site, seed=0, rng=np.random.default_rng(0))
        return recipe.run_site(params, datasets[member.site], member, ctx)

    recorded.run(program)
    assert_no_marked_value(recorded)
    # what the orchestrator stores as the study's result, and the model package's export
    result = recipe.finish(params, recorded.released)
    stored = json.dumps(result)
    for form in TEXT_FORMS:
        assert form not in stored
    assert "model" in result
