"""The audit log: appends chain and sign; every kind of tampering done directly in the database is named."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, text

from fedhealth.core import InputError, ManualClock, canonical_json
from fedhealth.crypto import IdentityKey
from fedhealth.governance import (
    GENESIS_HASH,
    AuditEntry,
    AuditEventType,
    AuditIntegrityError,
    AuditLog,
    AuditProblem,
    LogHead,
    create_governance_tables,
    verify_anchor,
    verify_chain,
)

SRC = Path(__file__).resolve().parents[2] / "src"


def sql(engine: Engine, statement: str, **params: object) -> None:
    with engine.begin() as conn:
        conn.execute(text(statement), params)


def fill(log: AuditLog, clock: ManualClock, n: int = 6) -> list[AuditEntry]:
    out = []
    for i in range(n):
        out.append(log.append(AuditEventType.CONFIGURATION_CHANGED, {"setting": f"s{i}", "value": i * 0.5}))
        clock.advance(1.5)
    return out


def trusted(*keys: IdentityKey) -> dict:
    return {k.public().fingerprint: k.public() for k in keys}


def row(engine: Engine, seq: int) -> dict:
    with engine.connect() as conn:
        found = (
            conn.execute(text("SELECT * FROM gov_audit_entries WHERE seq = :s"), {"s": seq}).mappings().one()
        )
    return dict(found)


def independent_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def forged_row(prev_hash: str, seq: int, signer_fingerprint: str, attacker: IdentityKey) -> dict:
    body = {
        "v": 1,
        "seq": seq,
        "time": "2026-03-02T09:00:04.000000Z",
        "actor": "site:hospital-a",
        "type": "task.completed",
        "payload": {"task_id": "t-forged", "study_id": "st-1"},
        "prev_hash": prev_hash,
        "signer": signer_fingerprint,
    }
    digest = independent_hash(body)
    return {
        "log_id": "main",
        "seq": seq,
        "time": body["time"],
        "actor": body["actor"],
        "type": body["type"],
        "payload": canonical_json(body["payload"]).decode(),
        "prev_hash": prev_hash,
        "entry_hash": digest,
        "signature": attacker.sign(bytes.fromhex(digest)).hex(),
        "signer": signer_fingerprint,
    }


INSERT = (
    "INSERT INTO gov_audit_entries (log_id, seq, time, actor, type, payload, prev_hash, entry_hash, "
    "signature, signer) VALUES (:log_id, :seq, :time, :actor, :type, :payload, :prev_hash, :entry_hash, "
    ":signature, :signer)"
)


class AuditLogContract:
    backend: str

    def test_appended_entries_read_back_unchanged_and_verify(self, site_log, clock, site_key):
        written = fill(site_log, clock)
        assert site_log.entries() == written
        assert [e.seq for e in written] == [1, 2, 3, 4, 5, 6]
        report = site_log.verify(trusted(site_key))
        assert report.ok
        assert report.checked == 6
        assert report.head == site_log.head() == LogHead(seq=6, entry_hash=written[-1].entry_hash)

    def test_creating_the_tables_again_is_harmless(self, engine, site_log, clock):
        fill(site_log, clock, 2)
        create_governance_tables(engine)
        assert site_log.verify().ok
        assert site_log.head().seq == 2

    def test_empty_log_has_the_genesis_head_and_verifies(self, site_log):
        assert site_log.head() == LogHead(seq=0, entry_hash=GENESIS_HASH)
        assert site_log.verify().ok

    def test_entry_hash_is_sha256_of_everything_but_hash_and_signature_and_links_entries(
        self, site_log, clock
    ):
        first, second = fill(site_log, clock, 2)
        stored = row(site_log.engine, 2)
        body = {
            "v": 1,
            "seq": 2,
            "time": stored["time"],
            "actor": stored["actor"],
            "type": stored["type"],
            "payload": json.loads(stored["payload"]),
            "prev_hash": stored["prev_hash"],
            "signer": stored["signer"],
        }
        assert independent_hash(body) == second.entry_hash == stored["entry_hash"]
        assert second.prev_hash == first.entry_hash
        assert first.prev_hash == GENESIS_HASH
        assert stored["time"] == "2026-03-02T09:00:01.500000Z"

    def test_editing_a_payload_in_the_database_is_named_as_a_hash_mismatch(self, site_log, clock, site_key):
        fill(site_log, clock)
        sql(
            site_log.engine,
            "UPDATE gov_audit_entries SET payload = :p WHERE seq = 3",
            p='{"setting":"s2","value":9}',
        )
        bad = site_log.verify(trusted(site_key)).first_bad
        assert bad is not None
        assert (bad.seq, bad.problem) == (3, AuditProblem.HASH_MISMATCH)

    def test_editing_an_actor_in_the_database_is_named(self, site_log, clock, site_key):
        fill(site_log, clock)
        sql(site_log.engine, "UPDATE gov_audit_entries SET actor = 'orchestrator' WHERE seq = 5")
        bad = site_log.verify(trusted(site_key)).first_bad
        assert bad is not None
        assert (bad.seq, bad.problem) == (5, AuditProblem.HASH_MISMATCH)

    def test_deleting_an_entry_in_the_database_is_named_as_a_gap(self, site_log, clock, site_key):
        fill(site_log, clock)
        sql(site_log.engine, "DELETE FROM gov_audit_entries WHERE seq = 4")
        bad = site_log.verify(trusted(site_key)).first_bad
        assert bad is not None
        assert (bad.seq, bad.problem) == (4, AuditProblem.GAP)
        assert "entry 5 follows entry 3" in bad.detail

    def test_deleting_an_entry_and_renumbering_the_rest_is_named(self, site_log, clock, site_key):
        fill(site_log, clock)
        sql(site_log.engine, "DELETE FROM gov_audit_entries WHERE seq = 4")
        sql(site_log.engine, "UPDATE gov_audit_entries SET seq = seq + 1000 WHERE seq > 4")
        sql(site_log.engine, "UPDATE gov_audit_entries SET seq = seq - 1001 WHERE seq > 1000")
        bad = site_log.verify(trusted(site_key)).first_bad
        assert bad is not None
        assert bad.seq == 4

    def test_swapping_two_entries_order_in_the_database_is_named_as_reordering(
        self, site_log, clock, site_key
    ):
        fill(site_log, clock)
        sql(site_log.engine, "UPDATE gov_audit_entries SET seq = -1 WHERE seq = 3")
        sql(site_log.engine, "UPDATE gov_audit_entries SET seq = 3 WHERE seq = 4")
        sql(site_log.engine, "UPDATE gov_audit_entries SET seq = 4 WHERE seq = -1")
        bad = site_log.verify(trusted(site_key)).first_bad
        assert bad is not None
        assert (bad.seq, bad.problem) == (3, AuditProblem.REORDERED)

    def test_inserting_a_forged_entry_signed_by_an_unknown_key_is_named(self, site_log, clock, site_key):
        entries = fill(site_log, clock)
        attacker = IdentityKey.generate()
        # make room at seq 3, then insert an entry that links correctly to entry 2
        sql(site_log.engine, "UPDATE gov_audit_entries SET seq = seq + 1000 WHERE seq >= 3")
        sql(site_log.engine, "UPDATE gov_audit_entries SET seq = seq - 999 WHERE seq >= 1000")
        forged = forged_row(entries[1].entry_hash, 3, attacker.public().fingerprint, attacker)
        sql(site_log.engine, INSERT, **forged)
        bad = site_log.verify(trusted(site_key)).first_bad
        assert bad is not None
        assert (bad.seq, bad.problem) == (3, AuditProblem.UNKNOWN_SIGNER)

    def test_appending_a_forged_entry_under_the_writers_key_fails_its_signature(
        self, site_log, clock, site_key
    ):
        entries = fill(site_log, clock)
        forged = forged_row(entries[-1].entry_hash, 7, site_key.public().fingerprint, IdentityKey.generate())
        sql(site_log.engine, INSERT, **forged)
        bad = site_log.verify(trusted(site_key)).first_bad
        assert bad is not None
        assert (bad.seq, bad.problem) == (7, AuditProblem.BAD_SIGNATURE)

    def test_changing_a_signature_in_the_database_is_named(self, site_log, clock, site_key):
        fill(site_log, clock)
        other = row(site_log.engine, 5)["signature"]
        sql(site_log.engine, "UPDATE gov_audit_entries SET signature = :s WHERE seq = 2", s=other)
        bad = site_log.verify(trusted(site_key)).first_bad
        assert bad is not None
        assert (bad.seq, bad.problem) == (2, AuditProblem.BAD_SIGNATURE)

    def test_editing_an_entry_and_recomputing_its_hash_still_fails_its_signature(
        self, site_log, clock, site_key
    ):
        fill(site_log, clock)
        stored = row(site_log.engine, 3)
        body = {k: stored[k] for k in ("seq", "time", "actor", "type", "prev_hash", "signer")}
        body.update(v=1, payload={"setting": "s2", "value": 100.0})
        sql(
            site_log.engine,
            "UPDATE gov_audit_entries SET payload = :p, entry_hash = :h WHERE seq = 3",
            p=canonical_json(body["payload"]).decode(),
            h=independent_hash(body),
        )
        bad = site_log.verify(trusted(site_key)).first_bad
        assert bad is not None
        assert (bad.seq, bad.problem) == (3, AuditProblem.BAD_SIGNATURE)

    def test_a_stored_field_that_cannot_be_read_back_is_named_as_malformed(self, site_log, clock, site_key):
        fill(site_log, clock)
        sql(site_log.engine, "UPDATE gov_audit_entries SET time = '2026-03-02 09:00:03' WHERE seq = 3")
        bad = site_log.verify(trusted(site_key)).first_bad
        assert bad is not None
        assert (bad.seq, bad.problem) == (3, AuditProblem.MALFORMED)
        with pytest.raises(AuditIntegrityError, match="entry 3"):
            site_log.entries()

    def test_whitespace_added_to_a_stored_payload_is_detected(self, site_log, clock, site_key):
        fill(site_log, clock)
        sql(
            site_log.engine,
            "UPDATE gov_audit_entries SET payload = :p WHERE seq = 2",
            p='{"setting": "s1", "value": 0.5}',
        )
        bad = site_log.verify(trusted(site_key)).first_bad
        assert bad is not None
        assert bad.seq == 2

    def test_a_log_rewritten_with_its_own_key_after_its_head_was_anchored_is_detected(
        self, site_log, clock, site_key
    ):
        fill(site_log, clock, 5)
        anchored = site_log.head()  # what the orchestrator's round record holds
        # the site rewrites history from entry 3 on, re-signing everything with its real key
        sql(site_log.engine, "DELETE FROM gov_audit_entries WHERE seq >= 3")
        for i in range(3):
            site_log.append(AuditEventType.CONFIGURATION_CHANGED, {"setting": f"rewritten{i}", "value": 0})
        assert site_log.verify(trusted(site_key)).ok  # the chain alone cannot tell
        report = site_log.verify(trusted(site_key), anchored_heads=[anchored])
        assert report.first_bad is not None
        assert (report.first_bad.seq, report.first_bad.problem) == (5, AuditProblem.ANCHOR_MISMATCH)

    def test_truncating_a_log_below_an_anchored_head_is_detected(self, site_log, clock, site_key):
        fill(site_log, clock, 5)
        anchored = site_log.head()
        sql(site_log.engine, "DELETE FROM gov_audit_entries WHERE seq >= 4")
        assert site_log.verify(trusted(site_key)).ok
        bad = site_log.verify(trusted(site_key), anchored_heads=[anchored]).first_bad
        assert bad is not None
        assert (bad.seq, bad.problem) == (5, AuditProblem.ANCHOR_MISSING)

    def test_two_logs_in_one_database_chain_independently(self, engine, clock, site_key):
        a = AuditLog(engine, site_key, "site:a", clock, log_id="a")
        b = AuditLog(engine, site_key, "site:b", clock, log_id="b")
        a.append(AuditEventType.ENROLLMENT, {"site": "a"})
        b.append(AuditEventType.ENROLLMENT, {"site": "b"})
        a.append(AuditEventType.ENROLLMENT, {"site": "a2"})
        assert (a.head().seq, b.head().seq) == (2, 1)
        assert a.verify().ok
        assert b.verify().ok

    def test_payload_missing_its_required_keys_is_refused_and_nothing_is_written(self, site_log):
        with pytest.raises(InputError, match="task_id"):
            site_log.append(AuditEventType.TASK_REFUSED, {"study_id": "st-1", "rule": "x", "reason": "y"})
        assert site_log.head().seq == 0

    def test_concurrent_appends_from_two_processes_keep_one_chain(self, database, site_key, tmp_path):
        per_writer = 15
        go = tmp_path / "go"
        procs = []
        for writer in ("w1", "w2"):
            args = [
                database.url,
                database.schema or "",
                site_key.private_bytes().hex(),
                writer,
                str(per_writer),
            ]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", CHILD, *args, str(tmp_path / f"ready-{writer}"), str(go)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{w}").exists() for w in ("w1", "w2")):
            assert time.monotonic() < deadline, "writers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        go.touch()
        for p in procs:
            _out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        log = AuditLog(database.engine, site_key, "reader")
        entries = log.entries()
        assert [e.seq for e in entries] == list(range(1, 2 * per_writer + 1))
        assert log.verify().ok
        writers = [e.payload["writer"] for e in entries]
        assert writers.count("w1") == writers.count("w2") == per_writer
        switches = sum(a != b for a, b in itertools.pairwise(writers))
        assert switches >= 1, "the writers never interleaved: the test did not exercise concurrency"


CHILD = f"""
import pathlib, random, sys, time
sys.path.insert(0, {str(SRC)!r})
from sqlalchemy import create_engine
from fedhealth.crypto import IdentityKey
from fedhealth.governance import AuditEventType, AuditLog
url, schema, key_hex, writer, count, ready, go = sys.argv[1:]
args = {{"connect_args": {{"options": f"-csearch_path={{schema}}"}}}} if schema else {{}}
log = AuditLog(create_engine(url, **args), IdentityKey.from_private_bytes(bytes.fromhex(key_hex)), writer)
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.002)
for i in range(int(count)):
    log.append(AuditEventType.CONFIGURATION_CHANGED, {{"writer": writer, "i": i}})
    time.sleep(random.uniform(0.0, 0.004))
"""


class TestAuditLogOnSqlite(AuditLogContract):
    backend = "sqlite"


@pytest.mark.postgres
class TestAuditLogOnPostgres(AuditLogContract):
    backend = "postgres"


# --- verification as a pure function, over in-memory copies of a real log --------------------------------


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[AuditEntry], dict]:
    path = tmp_path_factory.mktemp("chain") / "chain.sqlite"
    engine = create_engine(f"sqlite:///{path}")
    create_governance_tables(engine)
    key = IdentityKey.generate()
    clock = ManualClock()
    log = AuditLog(engine, key, "site:a", clock)
    entries = fill(log, clock, 12)
    engine.dispose()
    return entries, trusted(key)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_deleting_any_entry_but_the_last_is_named_by_its_seq(chain, data):
    entries, keys = chain
    i = data.draw(st.integers(0, len(entries) - 2))
    bad = verify_chain(entries[:i] + entries[i + 1 :], keys).first_bad
    assert bad is not None
    assert (bad.seq, bad.problem) == (i + 1, AuditProblem.GAP)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_swapping_any_two_entries_is_named_at_the_first_swapped_position(chain, data):
    entries, keys = chain
    i = data.draw(st.integers(0, len(entries) - 2))
    j = data.draw(st.integers(i + 1, len(entries) - 1))
    swapped = list(entries)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    bad = verify_chain(swapped, keys).first_bad
    assert bad is not None
    assert (bad.seq, bad.problem) == (j + 1, AuditProblem.REORDERED)
    assert f"comes before entry {i + 1}" in bad.detail


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_changing_any_payload_value_is_named_by_its_seq(chain, data):
    entries, keys = chain
    i = data.draw(st.integers(0, len(entries) - 1))
    value = data.draw(st.integers() | st.text(max_size=5) | st.booleans())
    original = entries[i]
    if original.payload["value"] == value and type(value) is type(original.payload["value"]):
        return
    edited = AuditEntry(
        **{f: getattr(original, f) for f in AuditEntry.__slots__ if f != "payload"},
        payload={**original.payload, "value": value},
    )
    tampered = [*entries[:i], edited, *entries[i + 1 :]]
    bad = verify_chain(tampered, keys).first_bad
    assert bad is not None
    assert (bad.seq, bad.problem) == (i + 1, AuditProblem.HASH_MISMATCH)


def test_a_duplicated_entry_is_named(chain):
    entries, keys = chain
    bad = verify_chain([*entries[:5], entries[4], *entries[5:]], keys).first_bad
    assert bad is not None
    assert (bad.seq, bad.problem) == (5, AuditProblem.DUPLICATE)


def test_a_segment_verifies_from_a_head_already_verified(chain):
    entries, keys = chain
    assert verify_chain(entries[7:], keys, after=entries[6].head).ok
    bad = verify_chain(entries[8:], keys, after=entries[6].head).first_bad
    assert bad is not None
    assert bad.problem is AuditProblem.GAP


def test_a_segment_that_does_not_continue_the_given_head_is_a_broken_link(chain):
    entries, keys = chain
    wrong = LogHead(seq=6, entry_hash=entries[3].entry_hash)
    bad = verify_chain(entries[6:], keys, after=wrong).first_bad
    assert bad is not None
    assert (bad.seq, bad.problem) == (7, AuditProblem.BROKEN_LINK)


def test_a_log_verifies_only_under_its_writers_key(chain):
    entries, _ = chain
    bad = verify_chain(entries, trusted(IdentityKey.generate())).first_bad
    assert bad is not None
    assert (bad.seq, bad.problem) == (1, AuditProblem.UNKNOWN_SIGNER)


def test_anchors_that_still_match_verify_and_the_report_says_ok(chain):
    entries, _keys = chain
    report = verify_anchor(entries, [entries[2].head, entries[9].head])
    assert report.ok
    assert "ok" in report.summary()
    report.raise_if_bad()


def test_a_failed_report_raises_naming_the_entry(chain):
    entries, keys = chain
    report = verify_chain(entries[1:], keys)
    with pytest.raises(AuditIntegrityError, match="entry 1: gap"):
        report.raise_if_bad()


def test_an_entry_round_trips_through_its_json_form(chain):
    entries, _ = chain
    assert [AuditEntry.from_json(json.loads(json.dumps(e.to_json()))) for e in entries] == entries


@pytest.mark.parametrize(
    ("field", "value"),
    [("seq", 0), ("time", "yesterday"), ("prev_hash", "abc"), ("signature", "zz"), ("payload", [1])],
)
def test_an_entry_json_with_a_bad_field_is_refused(chain, field, value):
    entries, _ = chain
    with pytest.raises(InputError):
        AuditEntry.from_json({**entries[0].to_json(), field: value})


@pytest.mark.parametrize(
    "payload",
    [{"when": object()}, {"x": float("nan")}, {"big": "x" * 300_000}, {1: "non-string key"}],
    ids=["not-json", "nan", "too-large", "int-key"],
)
def test_payload_that_is_not_bounded_json_is_refused(site_log, payload):
    with pytest.raises(InputError):
        site_log.append(AuditEventType.CONFIGURATION_CHANGED, payload)
    assert site_log.head().seq == 0


def test_a_batch_commits_its_entries_even_when_the_block_raises_and_they_verify(site_log, site_key):
    def refuse() -> None:
        with site_log.batch():
            site_log.append(AuditEventType.TASK_RECEIVED, {"task_id": "t1", "study_id": "s"})
            payload = {"task_id": "t1", "study_id": "s", "rule": "r", "reason": "x"}
            site_log.append(AuditEventType.TASK_REFUSED, payload)
            assert site_log.head().seq == 2  # the head inside a batch sees the batch's own entries
            raise RuntimeError("the refusal is raised after it was logged")

    with pytest.raises(RuntimeError, match="raised after it was logged"):
        refuse()
    entries = site_log.entries()
    assert [e.type for e in entries] == [AuditEventType.TASK_RECEIVED, AuditEventType.TASK_REFUSED]
    assert verify_chain(entries, trusted(site_key)).ok


def test_a_transaction_inside_a_batch_is_visible_to_other_connections_when_it_ends(site_log, engine):
    with site_log.batch():
        site_log.append(AuditEventType.TASK_RECEIVED, {"task_id": "t1", "study_id": "s"})
        with site_log.transaction() as conn:
            site_log.append(
                AuditEventType.CONFIGURATION_CHANGED, {"setting": "a", "value": 1}, connection=conn
            )
        with engine.connect() as other:  # another connection already sees both entries
            count = other.execute(text("SELECT count(*) FROM gov_audit_entries")).scalar_one()
        assert count == 2
        site_log.append(
            AuditEventType.TASK_COMPLETED, {"task_id": "t1", "study_id": "s", "outcome": "completed"}
        )
    assert [e.seq for e in site_log.entries()] == [1, 2, 3]
