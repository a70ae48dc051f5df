from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@pytest.fixture(scope="session")
def heart_centers(heart_data_dir: Path) -> list[Any]:
    """Fed-Heart-Disease's four centers, loaded once for the boosting tests (datasets are immutable)."""
    from fedhealth.data import load_heart_disease

    return [load_heart_disease(c, heart_data_dir, download=False) for c in range(4)]


@pytest.fixture(scope="module")
def centers(heart_centers: list[Any]) -> list[Any]:
    """The four centers, under the name the boosting tests give them (a module may define its own)."""
    return heart_centers


@pytest.fixture
def float_sums_made(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every ``FloatSums`` the test creates (one per site and session), to read their calls and repeats."""
    from fedhealth.learning import _lightgbm_network

    made: list[Any] = []
    init = _lightgbm_network.FloatSums.__init__

    def recording(self: Any, *args: Any) -> None:
        init(self, *args)
        made.append(self)

    monkeypatch.setattr(_lightgbm_network.FloatSums, "__init__", recording)
    return made


class _RecordedSession:
    """Three sites' session as the site's XGBoost proxy sees it: every secure sum recorded, the sum as if all
    sent alike."""

    site, sites = "b", ("a", "b", "c")

    def __init__(self) -> None:
        self.sums: list[np.ndarray] = []

    def secure_sum(self, values: Any) -> np.ndarray:
        self.sums.append(np.array(values, dtype=np.float64))
        return np.array(values, dtype=np.float64) * 3


@pytest.fixture
def proxy() -> Iterator[tuple[Any, _RecordedSession, str]]:
    """A site's XGBoost proxy (``SessionProxy``) started on a recorded session: the proxy, the session and
    the address it listens on; stopped afterwards."""
    from fedhealth.learning._xgboost_proxy import SessionProxy

    session = _RecordedSession()
    proxy = SessionProxy(session)  # type: ignore[arg-type]
    address = proxy.start()
    yield proxy, session, address
    proxy.stop()
