"""The docs' threat-model and privacy tables name the tests that show each claim; every named test exists.

A row such as ``tests/e2e/test_x.py::test_a``, ``::test_b`` names test_b in the same file as the reference
before it. A renamed or deleted test would otherwise leave a claim in the docs that nothing checks.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "docs/security.md",
    "docs/privacy.md",
    "docs/secure-aggregation.md",
    "docs/governance.md",
    "docs/connectors.md",
    "docs/dashboard.md",
    "docs/model-packages.md",
    "docs/statistics.md",
    "docs/boosting.md",
    "docs/imaging.md",
]
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)?::(\w+)(?:\[[^\]]*\])?`")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    }


def _references(doc: Path) -> list[tuple[str, str]]:
    found = []
    for line in doc.read_text().splitlines():
        current = None
        for match in REFERENCE.finditer(line):
            current = match.group(1) or current
            if current is None:
                raise AssertionError(
                    f"{doc.name}: '::{match.group(2)}' follows no file reference: {line[:80]}"
                )
            found.append((current, match.group(2)))
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_every_test_a_doc_names_exists(doc):
    references = _references(ROOT / doc)
    missing = []
    for file, name in references:
        path = ROOT / file
        if not path.is_file() or name not in _test_names(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"{doc} names tests that do not exist: {missing}"


def test_the_threat_model_table_names_tests_for_every_adversary():
    text = (ROOT / "docs/security.md").read_text()
    table = text[text.index("## Threat model") :]
    table = table[: table.index("\n## ", 3)]
    rows = [
        line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| adversary")
    ]
    adversaries = {row.split("|")[1].strip() for row in rows}
    for who in (
        "curious orchestrator",
        "malicious orchestrator",
        "colluding sites",
        "malicious site",
        "network attacker",
        "local user at a site",
        "attacker holding a stale token",
    ):
        assert any(a.startswith(who) for a in adversaries), who
    for row in rows:
        assert REFERENCE.search(row), f"a threat-model row names no test: {row[:80]}"
