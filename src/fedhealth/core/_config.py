"""Process-wide configuration read from the environment."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "FEDHEALTH_DATA_DIR"


def data_dir() -> Path:
    """Where datasets live: ``$FEDHEALTH_DATA_DIR``, else ``~/.cache/fedhealth/data``."""
    value = os.environ.get(DATA_DIR_ENV)
    if value:
        return Path(value).expanduser()
    return Path.home() / ".cache" / "fedhealth" / "data"
