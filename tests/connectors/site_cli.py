"""The CLI as a site's data engineer runs it, on a site home that `site enroll` would have left."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from fedhealth.cli import app
from fedhealth.crypto import IdentityKey

runner = CliRunner()


def cli(*args: object, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, [str(a) for a in args], env=env)


def make_site_home(tmp_path: Path, name: str = "hospital-a") -> Path:
    """An enrolled-looking site home (no orchestrator is needed for dataset and consent commands)."""
    home = tmp_path / name
    home.mkdir()
    IdentityKey.generate().save(home / "identity.key")
    (home / "site.json").write_text(json.dumps({"site": name, "orchestrator": "https://127.0.0.1:1"}))
    return home
