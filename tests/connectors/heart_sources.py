"""The Fed-Heart-Disease patients in four forms (``fedhealth.sim._heart_forms``), with what only the tests
bring: the official OMOP CDM DDL subset kept beside them, and the FHIR server's virtualenv, built on first use
under ``.cache/sekmet-venv`` (in .gitignore)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from fedhealth.sim._heart_forms import (
    CHOLESTEROL,
    FHIR_MAPPING,
    FLAT_SCHEMA,
    MMOL_L,
    OMOP_DEFINITION,
    SBP,
    FhirServer,
    Patient,
    fhir_resources,
    free_port,
    load_flat_table,
    patients,
    research_consent,
    write_csv,
)
from fedhealth.sim._heart_forms import load_omop as _load_omop
from fedhealth.sim._heart_forms import sekmet_server as _sekmet_server

__all__ = [
    "CHOLESTEROL",
    "DDL",
    "FHIR_MAPPING",
    "FLAT_SCHEMA",
    "MMOL_L",
    "OMOP_DEFINITION",
    "SBP",
    "TOKEN",
    "FhirServer",
    "fhir_resources",
    "free_port",
    "load_flat_table",
    "load_omop",
    "patients",
    "research_consent",
    "sekmet_executable",
    "sekmet_server",
    "write_csv",
]

REPO = Path(__file__).resolve().parents[2]
DDL = Path(__file__).with_name("omop_cdm_v5.4_postgresql_subset.sql")
SEKMET_VENV = REPO / ".cache" / "sekmet-venv"
SEKMET_REQUIREMENT = "sekmet-fhir==0.1.1"
TOKEN = "test-bearer-token-for-the-fhir-server"


def load_omop(engine: sa.Engine, schema: str, people: Sequence[Patient], *, concepts: bool = True) -> None:
    _load_omop(engine, schema, people, ddl=DDL, concepts=concepts)


def sekmet_executable() -> Path:
    """The ``sekmet`` command of a virtualenv of its own (it pins its own FastAPI), built on first use with
    ``python -m venv`` and pip from PyPI. Raises if it cannot be built: the tests fail, never skip, so CI
    cannot pass without the FHIR server."""
    exe = SEKMET_VENV / "bin" / "sekmet"
    done = SEKMET_VENV / ".fedhealth-complete"
    if done.exists() and exe.exists():
        return exe
    shutil.rmtree(SEKMET_VENV, ignore_errors=True)  # a build cut short: start again
    SEKMET_VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(SEKMET_VENV)], check=True)
    pip = subprocess.run(
        [str(SEKMET_VENV / "bin" / "python"), "-m", "pip", "install", "-q", SEKMET_REQUIREMENT],
        capture_output=True,
        text=True,
        check=False,
    )
    if pip.returncode != 0 or not exe.exists():
        raise RuntimeError(f"cannot build the FHIR test server ({SEKMET_REQUIREMENT}): {pip.stderr[-2000:]}")
    done.write_text(SEKMET_REQUIREMENT + "\n")
    return exe


@contextmanager
def sekmet_server(scratch: Path, *, token: str = TOKEN) -> Iterator[FhirServer]:
    with _sekmet_server(sekmet_executable(), scratch, token=token) as server:
        yield server
