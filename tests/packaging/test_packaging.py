"""Packaging: PostgreSQL's driver is an extra, 0.x libraries are capped, the constraints file pins a set of
versions every range accepts, and the licence is the Apache-2.0 text the metadata declares."""

from __future__ import annotations

import hashlib
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from fedhealth.core import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def requirements(*extras: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        found += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return found


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = Version(version)
    return out


def test_psycopg_is_an_extra_that_make_installs():
    assert not any(r.name == "psycopg" for r in requirements())
    assert [r.name for r in requirements("postgres")][-1] == "psycopg"
    assert "EXTRAS := dev,postgres" in (ROOT / "Makefile").read_text()


def make_extras() -> tuple[str, ...]:
    """The extras `make test` installs (the Makefile's EXTRAS line)."""
    line = next(x for x in (ROOT / "Makefile").read_text().splitlines() if x.startswith("EXTRAS := "))
    return tuple(line.removeprefix("EXTRAS := ").split(","))


def test_pymysql_is_an_extra_that_make_installs():
    assert not any(r.name == "pymysql" for r in requirements())
    assert [r.name for r in requirements("mysql")][-1] == "pymysql"
    assert "mysql" in make_extras()


def test_every_dependency_at_0_x_has_an_upper_bound():
    for req in requirements(*make_extras(), "bench"):
        lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if lows and lows[0].major == 0:
            assert any(s.operator == "<" for s in req.specifier), f"{req} has no upper bound"


def test_the_constraints_pin_versions_every_range_accepts():
    pinned = pins()
    for req in requirements(*make_extras(), "bench"):
        version = pinned.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} is outside {req}"


def test_setuptools_is_new_enough_for_the_spdx_licence_and_the_licence_is_apache_2():
    assert Requirement(PYPROJECT["build-system"]["requires"][0]).specifier.contains("77")
    assert not Requirement(PYPROJECT["build-system"]["requires"][0]).specifier.contains("76.9")
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert hashlib.sha256((ROOT / "LICENSE").read_bytes()).hexdigest() == APACHE_2_SHA256


def test_a_postgres_url_without_the_driver_says_which_extra_to_install(monkeypatch):
    from fedhealth.orchestrator import make_engine

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pip install 'fedhealth\[postgres\]'"):
        make_engine("postgresql+psycopg://fedhealth@db/fedhealth")
