"""Identifiers: short prefixed ids that sort by creation time."""

from __future__ import annotations

import re
import secrets
import time

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}\Z")


def new_id(prefix: str) -> str:
    """A new id like ``st_0192f1c2a3b49f1e2d3c4b5a6978``: epoch milliseconds, then 64 random bits."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def is_valid_name(name: str) -> bool:
    """Site, dataset and user names: lowercase letters, digits, ``_ . -``; 1 to 63 characters."""
    return bool(_NAME.match(name))
