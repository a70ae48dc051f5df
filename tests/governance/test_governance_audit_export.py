"""Audit exports as JSON Lines: offline verification gives the same verdict as the database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text

from fedhealth.crypto import IdentityKey
from fedhealth.governance import (
    AuditEventType,
    AuditFormatError,
    AuditProblem,
    export_stored_log,
    read_jsonl,
    verify_loaded,
    write_jsonl,
)


def fill(log, clock, n=5):
    for i in range(n):
        log.append(AuditEventType.BUDGET_SPENT, {"dataset": "icu", "epsilon": 0.1 * (i + 1)})
        clock.advance(2)


def keys(key: IdentityKey) -> dict:
    return {key.public().fingerprint: key.public()}


class ExportContract:
    backend: str

    def test_an_export_reads_back_as_the_same_entries_and_verifies_offline(
        self, site_log, clock, site_key, tmp_path
    ):
        fill(site_log, clock)
        out = tmp_path / "audit.jsonl"
        assert export_stored_log(site_log.engine, out) == 5
        export = read_jsonl(out)
        assert list(export.stored.entries) == site_log.entries()
        assert export.log_id == "main"
        assert dict(export.header_keys) == keys(site_key)
        assert verify_loaded(export.stored, keys(site_key)).ok

    def test_an_export_of_a_tampered_database_fails_at_the_same_entry(
        self, site_log, clock, site_key, tmp_path
    ):
        fill(site_log, clock)
        with site_log.engine.begin() as conn:
            conn.execute(
                text("UPDATE gov_audit_entries SET payload = :p WHERE seq = 4"),
                {"p": '{"dataset":"icu","epsilon":0}'},
            )
        in_db = site_log.verify(keys(site_key)).first_bad
        export_stored_log(site_log.engine, tmp_path / "a.jsonl")
        in_file = verify_loaded(read_jsonl(tmp_path / "a.jsonl").stored, keys(site_key)).first_bad
        assert in_db == in_file
        assert in_db is not None
        assert in_db.seq == 4

    def test_an_unreadable_row_is_exported_as_stored_and_named_in_the_file(
        self, site_log, clock, site_key, tmp_path
    ):
        fill(site_log, clock)
        with site_log.engine.begin() as conn:
            conn.execute(text("UPDATE gov_audit_entries SET payload = 'not json' WHERE seq = 2"))
        export_stored_log(site_log.engine, tmp_path / "a.jsonl")
        bad = verify_loaded(read_jsonl(tmp_path / "a.jsonl").stored, keys(site_key)).first_bad
        assert bad is not None
        assert (bad.seq, bad.problem) == (2, AuditProblem.MALFORMED)


class TestExportOnSqlite(ExportContract):
    backend = "sqlite"


@pytest.mark.postgres
class TestExportOnPostgres(ExportContract):
    backend = "postgres"


def exported(site_log, clock, tmp_path: Path) -> Path:
    fill(site_log, clock)
    out = tmp_path / "audit.jsonl"
    write_jsonl(
        site_log.entries(), out, log_id="main", keys={site_log.public_key.fingerprint: site_log.public_key}
    )
    return out


def test_swapped_lines_in_an_export_are_named_as_reordering(site_log, clock, site_key, tmp_path):
    out = exported(site_log, clock, tmp_path)
    lines = out.read_text().splitlines()
    lines[2], lines[3] = lines[3], lines[2]  # entries 2 and 3
    out.write_text("\n".join(lines) + "\n")
    bad = verify_loaded(read_jsonl(out).stored, keys(site_key)).first_bad
    assert bad is not None
    assert (bad.seq, bad.problem) == (3, AuditProblem.REORDERED)


def test_a_line_that_is_not_an_entry_is_named_by_its_line(site_log, clock, site_key, tmp_path):
    out = exported(site_log, clock, tmp_path)
    lines = out.read_text().splitlines()
    lines[3] = "{broken"
    out.write_text("\n".join(lines) + "\n")
    bad = verify_loaded(read_jsonl(out).stored, keys(site_key)).first_bad
    assert bad is not None
    assert bad.problem is AuditProblem.MALFORMED
    assert bad.seq == 3
    assert "line 4" in bad.detail


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ("not json", "line 1 is not a JSON header"),
        ('{"format": "other"}', "not a fedhealth audit export"),
        ('{"format": "fedhealth.audit-log", "version": 2, "log_id": "main", "keys": {}}', "version 2"),
        (
            '{"format": "fedhealth.audit-log", "version": 1, "log_id": "main", "keys": {"aa": "bb"}}',
            "not a valid",
        ),
    ],
    ids=["not-json", "other-format", "version", "bad-key"],
)
def test_an_export_with_a_bad_header_is_refused(tmp_path, header, words):
    path = tmp_path / "x.jsonl"
    path.write_text(header + "\n")
    with pytest.raises(AuditFormatError, match=words):
        read_jsonl(path)


def test_a_header_key_under_someone_elses_fingerprint_is_refused(site_log, clock, tmp_path):
    out = exported(site_log, clock, tmp_path)
    lines = out.read_text().splitlines()
    header = json.loads(lines[0])
    header["keys"] = {site_log.public_key.fingerprint: IdentityKey.generate().public().raw.hex()}
    out.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(AuditFormatError):
        read_jsonl(out)
