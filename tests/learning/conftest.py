import os
from pathlib import Path
from typing import Any

import pytest

HEART_FILES = (
    "processed.cleveland.data",
    "processed.hungarian.data",
    "processed.switzerland.data",
    "processed.va.data",
)


@pytest.fixture(scope="session")
def heart_data_dir() -> Path:
    """The folder holding heart_disease/: skipped only when FEDHEALTH_DATA_DIR is unset and the data is not
    required (FEDHEALTH_REQUIRE_DATA != "1"); a set but incomplete folder is a failure."""
    value = os.environ.get("FEDHEALTH_DATA_DIR")
    required = os.environ.get("FEDHEALTH_REQUIRE_DATA") == "1"
    if not value:
        if required:
            pytest.fail("FEDHEALTH_REQUIRE_DATA=1 but FEDHEALTH_DATA_DIR is not set")
        pytest.skip(
            "FEDHEALTH_DATA_DIR is not set (set it to a folder holding heart_disease/ to run this test)"
        )
    folder = Path(value)
    missing = [f for f in HEART_FILES if not (folder / "heart_disease" / f).is_file()]
    if missing:
        pytest.fail(f"FEDHEALTH_DATA_DIR={folder} lacks heart_disease/{missing}")
    return folder


@pytest.fixture(scope="session")
def heart_centers(heart_data_dir: Path) -> list[Any]:
    """Fed-Heart-Disease's four centers, loaded once for the boosting tests (datasets are immutable)."""
    from fedhealth.data import load_heart_disease

    return [load_heart_disease(c, heart_data_dir, download=False) for c in range(4)]


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
