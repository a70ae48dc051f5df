"""Pydantic and FastAPI validation errors in words: ``field spec.rounds: must be at least 1``.

Used by the client (a 422 answer's detail), the spec-file loader and the command line, so a person reads a
rule, never a raw error list or a regular expression with its brackets eaten by a terminal's markup.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

# --- 422s in words -----------------------------------------------------------------------------------------

_NAME_PATTERN = "^[a-z0-9][a-z0-9_.-]{0,62}$"
_NAME_RULE = "lowercase letters, digits, '-', '_' or '.', starting with a letter or digit, at most 63 long"
_RULES: Sequence[tuple[re.Pattern[str], str]] = [
    (re.compile(r"greater than or equal to (\S+)"), "must be at least {0}"),
    (re.compile(r"less than or equal to (\S+)"), "must be at most {0}"),
    (re.compile(r"greater than (\S+)"), "must be more than {0}"),
    (re.compile(r"less than (\S+)"), "must be less than {0}"),
    (re.compile(r"should have at least (\d+) items?"), "needs at least {0} item(s)"),
    (re.compile(r"should have at most (\d+) items?"), "allows at most {0} item(s)"),
    (re.compile(r"should have at least (\d+) characters?"), "needs at least {0} character(s)"),
    (re.compile(r"should have at most (\d+) characters?"), "allows at most {0} character(s)"),
]


def rule_in_words(kind: str, msg: str, ctx: dict[str, Any] | None = None) -> str:
    """One pydantic error as a rule a person reads: ``must be at least 1``, ``is required``..."""
    ctx = ctx or {}
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field (check its spelling)"
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern") or (re.findall(r"'(.*)'", msg) or [""])[0])
        if pattern == _NAME_PATTERN:
            return f"must be {_NAME_RULE}"
        return f"must match the pattern {pattern}"
    if kind == "enum" or ("Input should be" in msg and "'" in msg and " or " in msg):
        return "must be " + msg.removeprefix("Input should be ").strip()
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if kind in ("float_parsing", "float_type"):
        return "must be a number"
    if kind == "finite_number":
        return "must be a finite number"
    if kind in ("bool_parsing", "bool_type"):
        return "must be true or false"
    if kind == "value_error" or msg.startswith("Value error, "):
        return msg.removeprefix("Value error, ")
    for pattern, words in _RULES:
        found = pattern.search(msg)
        if found:
            return words.format(*found.groups())
    return msg[:1].lower() + msg[1:] if msg else kind


def field_errors(errors: Iterable[dict[str, Any]], *, drop: Sequence[str] = ("body", "query", "path")) -> str:
    """``field spec.rounds: must be at least 1; field name: is required`` from pydantic/FastAPI errors."""
    parts = []
    for error in errors:
        # an orchestrator's 422 is its own JSON: a loc that is not a list or a ctx not an object is ignored
        where_from = error.get("loc")
        loc = [str(p) for p in where_from] if isinstance(where_from, list | tuple) else []
        while loc and loc[0] in drop:
            loc = loc[1:]
        where = ".".join(loc)
        ctx = error.get("ctx")
        rule = rule_in_words(
            str(error.get("type", "")), str(error.get("msg", "")), ctx if isinstance(ctx, dict) else None
        )
        parts.append(f"field {where}: {rule}" if where else rule)
    return "; ".join(parts) or "the request is malformed"
