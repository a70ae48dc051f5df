"""Imported before any test module: ``import fedhealth`` turns onnxruntime's telemetry off, which it reads
once when it is imported, and several test modules import onnxruntime themselves (docs/security.md,
"Nothing phones home").

The fixtures here serve tests in more than one folder."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import fedhealth  # noqa: F401

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


@pytest.fixture(autouse=True)
def restore_umask() -> Iterator[None]:
    """Every test starts with the umask the run started with: `site serve` and `orchestrator serve` set
    0077 for their process, and run in-process by CliRunner that leaked into every later test, so a
    fixture's loose home looked private to whichever test happened to run after one of them."""
    old = os.umask(0o022)
    os.umask(old)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0o000)  # the worst a process could inherit
    try:
        yield
    finally:
        os.umask(old)
