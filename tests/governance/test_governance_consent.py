"""Consent: CSV and FHIR R4 imports, the task-time filter (exact cohort, snapshot hash), withdrawals."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, text

from fedhealth.core import InputError
from fedhealth.crypto import IdentityKey
from fedhealth.governance import (
    AuditEventType,
    AuditLog,
    ConsentDecision,
    ConsentImportError,
    ConsentModel,
    ConsentRecord,
    ConsentRegistry,
    consent_snapshot_hash,
    create_governance_tables,
    decide,
    suppress,
)

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
PERMIT, DENY = ConsentDecision.PERMIT, ConsentDecision.DENY


def snapshot_hash_by_hand(patients: set[str], purpose: str, day: date) -> str:
    body = {
        "kind": "fedhealth.consent-snapshot.v1",
        "purpose": purpose,
        "date": day.isoformat(),
        "patients": sorted(patients),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_csv(
    path: Path,
    rows: list[str],
    header: str = "patient_id,purpose,decision,valid_from,valid_until,withdrawn_at",
) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def fhir_consent(
    cid: str,
    patient: str,
    kind: str = "permit",
    purposes: tuple[str, ...] = ("HRESCH",),
    status: str = "active",
    period: tuple[str | None, str | None] | None = None,
    nested: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    provision: dict[str, Any] = {"type": kind}
    if purposes:
        provision["purpose"] = [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": p} for p in purposes
        ]
    if period:
        provision["period"] = {k: v for k, v in zip(("start", "end"), period, strict=True) if v}
    if nested:
        provision["provision"] = nested
    provision.update(extra)
    return {
        "resourceType": "Consent",
        "id": cid,
        "status": status,
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
        "patient": {"reference": f"Patient/{patient}"},
        "dateTime": "2025-01-10T08:00:00Z",
        "provision": provision,
    }


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


# --- which record decides: pure --------------------------------------------------------------------------


def rec(purpose: str, decision: ConsentDecision, start: datetime | None = None, **kw: Any) -> ConsentRecord:
    return ConsentRecord(patient_id="p", purpose=purpose, decision=decision, valid_from=start, **kw)


def test_a_later_statement_overrides_an_earlier_one():
    records = [rec("HRESCH", PERMIT, T0 - timedelta(days=10)), rec("*", DENY, T0 - timedelta(days=1))]
    assert decide(records, "HRESCH", T0) is DENY
    assert decide(records, "HRESCH", T0 - timedelta(days=5)) is PERMIT


def test_at_the_same_start_a_specific_purpose_beats_any_purpose_and_deny_beats_permit():
    assert decide([rec("*", PERMIT, T0), rec("COMMERCIAL", DENY, T0)], "COMMERCIAL", T0) is DENY
    assert decide([rec("*", DENY, T0), rec("HRESCH", PERMIT, T0)], "HRESCH", T0) is PERMIT
    assert decide([rec("HRESCH", PERMIT, T0), rec("HRESCH", DENY, T0)], "HRESCH", T0) is DENY


def test_records_out_of_their_period_withdrawn_or_for_another_purpose_do_not_speak():
    assert decide([rec("HRESCH", PERMIT, T0)], "HRESCH", T0 - timedelta(seconds=1)) is None
    assert decide([rec("HRESCH", PERMIT, valid_until=T0)], "HRESCH", T0) is None
    assert decide([rec("HRESCH", PERMIT, withdrawn_at=T0)], "HRESCH", T0) is None
    assert decide([rec("TREAT", PERMIT)], "HRESCH", T0) is None


@given(
    st.lists(
        st.tuples(st.sampled_from(["HRESCH", "*"]), st.sampled_from([PERMIT, DENY]), st.integers(-100, 100)),
        max_size=6,
    ),
    st.integers(1, 50),
)
def test_a_deny_for_the_purpose_stated_after_every_other_record_always_decides(existing, after):
    records = [rec(p, d, T0 + timedelta(days=offset)) for p, d, offset in existing]
    latest = max([T0 + timedelta(days=o) for _, _, o in existing], default=T0)
    records.append(rec("HRESCH", DENY, latest + timedelta(days=after)))
    assert decide(records, "HRESCH", latest + timedelta(days=after + 1)) is DENY


def test_small_counts_are_suppressed_and_others_are_not():
    assert [suppress(n) for n in (0, 1, 4, 5, 123)] == [0, "<5", "<5", 5, 123]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patient_id": ""},
        {"patient_id": " p1"},
        {"purpose": ""},
        {"valid_from": datetime(2026, 1, 1)},
        {"valid_from": T0, "valid_until": T0},
    ],
    ids=["empty-id", "padded-id", "empty-purpose", "naive-time", "empty-period"],
)
def test_an_invalid_consent_record_is_refused(kwargs):
    base: dict[str, Any] = {"patient_id": "p1", "purpose": "HRESCH", "decision": PERMIT}
    with pytest.raises(InputError):
        ConsentRecord(**{**base, **kwargs})


# --- the registry on each backend -----------------------------------------------------------------------


class ConsentContract:
    backend: str

    @pytest.fixture
    def registry(self, engine, site_log) -> ConsentRegistry:
        return ConsentRegistry(engine, site_log)

    def test_csv_import_stores_each_row_and_reimport_changes_nothing(self, registry, tmp_path, site_log):
        path = write_csv(
            tmp_path / "consent.csv",
            [
                "p1,HRESCH,permit,2025-01-01,,",
                "p2,*,DENY,2024-06-30T12:00:00+02:00,,",
                "p3,HRESCH,permit,,2026-12-31,",
            ],
        )
        first = registry.import_csv(path)
        assert (first.added, first.updated, first.unchanged) == (3, 0, 0)
        again = registry.import_csv(path)
        assert (again.added, again.updated, again.unchanged) == (0, 0, 3)
        p2 = registry.records("p2")[0]
        assert p2.decision is DENY
        assert p2.valid_from == datetime(2024, 6, 30, 10, 0, tzinfo=UTC)
        # a date as valid_until includes that whole day
        assert registry.records("p3")[0].valid_until == datetime(2027, 1, 1, tzinfo=UTC)
        assert [e.type for e in site_log.entries()] == [AuditEventType.CONSENT_IMPORTED] * 2

    def test_an_import_or_withdrawal_whose_audit_entry_cannot_be_written_changes_nothing(
        self, registry, tmp_path, site_log, monkeypatch
    ):
        path = write_csv(tmp_path / "consent.csv", ["p1,HRESCH,permit,2025-01-01,,", "p2,HRESCH,permit,,,"])
        registry.import_csv(path)
        registry.filter(["p1", "p2"], "HRESCH", T0)
        head = site_log.head()

        def broken(*args, **kwargs):
            raise RuntimeError("disk full")

        monkeypatch.setattr(site_log, "_append_on", broken)
        with pytest.raises(RuntimeError, match="disk full"):
            registry.import_csv(write_csv(tmp_path / "more.csv", ["p3,HRESCH,permit,,,"]))
        with pytest.raises(RuntimeError, match="disk full"):
            registry.withdraw("p1", "HRESCH", T0 + timedelta(days=1))
        monkeypatch.undo()
        assert [r.patient_id for r in registry.records()] == ["p1", "p2"]
        assert all(r.withdrawn_at is None for r in registry.records())
        assert site_log.head() == head

    def test_a_csv_with_only_the_required_columns_imports(self, registry, tmp_path):
        path = write_csv(tmp_path / "c.csv", ["p1,HRESCH,permit"], header="decision,purpose,patient_id")
        with pytest.raises(ConsentImportError, match="line 2: decision"):
            registry.import_csv(path)
        path = write_csv(tmp_path / "c.csv", ["permit,HRESCH,p1"], header="decision,purpose,patient_id")
        assert registry.import_csv(path).added == 1

    def test_a_withdrawal_is_not_undone_by_reimporting_the_record_without_it(self, registry, tmp_path):
        withdrawn = write_csv(tmp_path / "a.csv", ["p1,HRESCH,permit,2025-01-01,,2026-02-01"])
        plain = write_csv(tmp_path / "b.csv", ["p1,HRESCH,permit,2025-01-01,,"])
        registry.import_csv(plain)
        assert registry.import_csv(withdrawn).updated == 1
        assert registry.import_csv(plain).unchanged == 1
        assert registry.records("p1")[0].withdrawn_at == datetime(2026, 2, 1, tzinfo=UTC)

    def test_fhir_consents_in_a_bundle_import_with_nested_exceptions(self, registry, tmp_path):
        path = tmp_path / "consents.json"
        path.write_text(
            json.dumps(
                bundle(
                    fhir_consent(
                        "c1",
                        "p1",
                        purposes=(),
                        nested=[{"type": "deny", "purpose": [{"code": "COMMERCIAL"}]}],
                    ),
                    fhir_consent(
                        "c2", "p2", kind="deny", purposes=("HRESCH",), period=("2025-01-01", "2025-12-31")
                    ),
                    {"resourceType": "Patient", "id": "p1"},
                )
            )
        )
        summary = registry.import_fhir(path)
        assert (summary.added, summary.skipped) == (3, 1)
        # p1 permits every purpose but commercial use; p2 denies research during 2025 only
        p1 = registry.records("p1")
        assert decide(p1, "HRESCH", T0) is PERMIT
        assert decide(p1, "COMMERCIAL", T0) is DENY
        p2 = registry.records("p2")
        assert decide(p2, "HRESCH", datetime(2025, 12, 31, 23, 0, tzinfo=UTC)) is DENY
        assert decide(p2, "HRESCH", datetime(2026, 1, 1, tzinfo=UTC)) is None
        # without a period, the consent speaks from its dateTime on
        assert min(r.valid_from for r in p1 if r.valid_from) == datetime(2025, 1, 10, 8, 0, tzinfo=UTC)

    def test_a_fhir_consent_made_inactive_withdraws_what_it_granted(self, registry):
        registry.import_fhir(fhir_consent("c1", "p1"))
        assert decide(registry.records("p1"), "HRESCH", T0) is PERMIT
        summary = registry.import_fhir([fhir_consent("c1", "p1", status="inactive")])
        assert summary.withdrawn == 1
        assert decide(registry.records("p1"), "HRESCH", T0) is None

    def test_a_new_version_of_a_fhir_consent_replaces_the_old(self, registry):
        registry.import_fhir(fhir_consent("c1", "p1", purposes=("HRESCH",)))
        registry.import_fhir(fhir_consent("c1", "p1", purposes=("TREAT",)))
        records = registry.records("p1")
        assert decide(records, "HRESCH", T0) is None
        assert decide(records, "TREAT", T0) is PERMIT

    def test_fhir_draft_consents_and_permits_limited_to_some_data_grant_nothing(self, registry):
        summary = registry.import_fhir(
            bundle(
                fhir_consent("c1", "p1", status="draft"),
                fhir_consent(
                    "c2", "p2", data=[{"meaning": "related", "reference": {"reference": "Observation/1"}}]
                ),
                fhir_consent(
                    "c3",
                    "p3",
                    kind="deny",
                    data=[{"meaning": "related", "reference": {"reference": "Observation/2"}}],
                ),
            )
        )
        assert (summary.added, summary.skipped) == (1, 2)
        assert registry.records("p1") == []
        assert registry.records("p2") == []
        assert decide(registry.records("p3"), "HRESCH", T0) is DENY

    def test_a_fhir_patient_given_by_identifier_is_imported(self, registry):
        consent = fhir_consent("c1", "ignored")
        consent["patient"] = {"identifier": {"system": "urn:pseudo", "value": "pseudo-77"}}
        registry.import_fhir(consent)
        assert [r.patient_id for r in registry.records()] == ["pseudo-77"]

    def test_with_20_percent_denying_the_filter_keeps_exactly_the_permitted(
        self, registry, tmp_path, site_log
    ):
        patients = [f"p{i:03d}" for i in range(100)]
        denying = set(patients[::5])  # 20 %
        rows = [f"{p},HRESCH,{'deny' if p in denying else 'permit'},2025-01-01,," for p in patients]
        registry.import_csv(write_csv(tmp_path / "consent.csv", rows))
        dataset = [p for p in patients for _ in range(2)]  # two rows (encounters) per patient
        result = registry.filter(dataset, "HRESCH", T0, task_id="t1", study_id="st1")
        permitted = set(patients) - denying
        assert result.kept_count == len(permitted) == 80
        assert (result.permitted_count, result.denied_count, result.no_record_count) == (80, 20, 0)
        assert {dataset[i] for i in result.kept_indices} == permitted
        assert len(result.kept_indices) == 160
        assert result.snapshot_hash == snapshot_hash_by_hand(permitted, "HRESCH", T0.date())
        applied = site_log.entries()[-1]
        assert applied.type is AuditEventType.CONSENT_APPLIED
        assert applied.payload["snapshot_hash"] == result.snapshot_hash
        assert applied.payload["counts"] == {"kept": 80, "permitted": 80, "denied": 20, "no_record": 0}

    def test_the_same_consent_state_gives_the_same_snapshot_hash(self, registry, tmp_path):
        registry.import_csv(write_csv(tmp_path / "c.csv", [f"p{i},HRESCH,permit,,," for i in range(8)]))
        ids = [f"p{i}" for i in range(8)]
        first = registry.filter(ids, "HRESCH", T0)
        again = registry.filter(list(reversed(ids)), "HRESCH", T0 + timedelta(hours=3))
        assert first.snapshot_hash == again.snapshot_hash
        assert registry.filter(ids, "HRESCH", T0 + timedelta(days=1)).snapshot_hash != first.snapshot_hash

    def test_small_counts_are_suppressed_in_the_audit_log(self, registry, tmp_path, site_log):
        registry.import_csv(write_csv(tmp_path / "c.csv", ["a,HRESCH,permit,,,", "b,HRESCH,deny,,,"]))
        result = registry.filter(["a", "b", "c"], "HRESCH", T0)
        assert (result.kept_count, result.denied_count, result.no_record_count) == (1, 1, 1)
        assert site_log.entries()[-1].payload["counts"] == {
            "kept": "<5",
            "permitted": "<5",
            "denied": "<5",
            "no_record": "<5",
        }

    def test_patients_without_a_record_are_excluded_under_opt_in_and_kept_under_opt_out(
        self, engine, site_log, tmp_path
    ):
        opt_in = ConsentRegistry(engine, site_log)
        opt_in.import_csv(write_csv(tmp_path / "c.csv", ["a,HRESCH,permit,,,", "b,HRESCH,deny,,,"]))
        assert opt_in.filter(["a", "b", "c"], "HRESCH", T0).kept_patient_ids == ("a",)
        opt_out = ConsentRegistry(engine, site_log, model=ConsentModel.OPT_OUT)
        result = opt_out.filter(["a", "b", "c"], "HRESCH", T0)
        assert result.kept_patient_ids == ("a", "c")
        assert result.no_record_count == 1

    def test_consent_is_judged_on_the_task_date(self, registry, tmp_path):
        registry.import_csv(write_csv(tmp_path / "c.csv", ["a,HRESCH,permit,2026-03-01,2026-03-31,"]))
        assert registry.filter(["a"], "HRESCH", date(2026, 2, 28)).kept_count == 0
        assert registry.filter(["a"], "HRESCH", date(2026, 3, 31)).kept_count == 1
        assert registry.filter(["a"], "HRESCH", date(2026, 4, 1)).kept_count == 0

    def test_a_filter_for_any_purpose_or_with_bad_ids_is_refused(self, registry):
        with pytest.raises(InputError):
            registry.filter(["a"], "*", T0)
        with pytest.raises(InputError):
            registry.filter(["a", ""], "HRESCH", T0)
        with pytest.raises(InputError):
            registry.filter(["a"], "HRESCH", datetime(2026, 1, 1))

    def test_a_withdrawal_names_exactly_the_snapshots_that_included_the_patient(
        self, registry, tmp_path, site_log
    ):
        registry.import_csv(write_csv(tmp_path / "c.csv", [f"p{i},*,permit,2025-01-01,," for i in range(6)]))
        ids = [f"p{i}" for i in range(6)]
        research = registry.filter(ids, "HRESCH", T0)
        without_p3 = registry.filter([p for p in ids if p != "p3"], "HRESCH", T0)
        treatment = registry.filter(ids, "TREAT", T0)
        notice = registry.withdraw("p3", "HRESCH", T0 + timedelta(days=1))
        assert notice.snapshot_hashes == (research.snapshot_hash,)
        assert without_p3.snapshot_hash not in notice.snapshot_hashes
        assert treatment.snapshot_hash not in notice.snapshot_hashes
        assert "p3" not in json.dumps(notice.to_json())
        # from the withdrawal on, p3 is out for research (its '*' permit no longer covers it),
        # and still in for treatment
        later = T0 + timedelta(days=2)
        assert "p3" not in registry.filter(ids, "HRESCH", later).kept_patient_ids
        assert "p3" in registry.filter(ids, "TREAT", later).kept_patient_ids
        withdrawn = [e for e in site_log.entries() if e.type is AuditEventType.CONSENT_WITHDRAWN]
        assert withdrawn[0].payload["affected_snapshots"] == [research.snapshot_hash]

    def test_withdrawing_every_purpose_names_snapshots_of_every_purpose(self, registry, tmp_path):
        registry.import_csv(write_csv(tmp_path / "c.csv", ["a,*,permit,,,", "b,*,permit,,,"]))
        research = registry.filter(["a", "b"], "HRESCH", T0)
        treatment = registry.filter(["a", "b"], "TREAT", T0)
        notice = registry.withdraw("a", None, T0 + timedelta(hours=1))
        assert set(notice.snapshot_hashes) == {research.snapshot_hash, treatment.snapshot_hash}
        assert registry.filter(["a", "b"], "TREAT", T0 + timedelta(hours=2)).kept_patient_ids == ("b",)


class TestConsentOnSqlite(ConsentContract):
    backend = "sqlite"


@pytest.mark.postgres
class TestConsentOnPostgres(ConsentContract):
    backend = "postgres"


def test_snapshot_hash_function_matches_the_documented_formula():
    assert consent_snapshot_hash(["b", "a", "a"], "HRESCH", date(2026, 3, 2)) == snapshot_hash_by_hand(
        {"a", "b"}, "HRESCH", date(2026, 3, 2)
    )


# --- input errors: the backend does not matter, so SQLite only --------------------------------------------


@pytest.fixture
def registry(engine, site_log) -> ConsentRegistry:
    return ConsentRegistry(engine, site_log)


@pytest.mark.parametrize(
    ("rows", "header", "words"),
    [
        (["p1,HRESCH,maybe,,,"], None, "line 2: decision must be 'permit' or 'deny'"),
        (["p1,HRESCH,permit,,,", "p2,HRESCH,permit,01/02/2025,,"], None, "line 3: valid_from"),
        (["p1,HRESCH,permit,2025-01-01T10:00:00,,"], None, "line 2: valid_from: .* no UTC offset"),
        (["p1,HRESCH,permit"], None, "line 2: 3 fields, the header has 6"),
        (
            ["p1,HRESCH,permit,2026-01-01,2025-01-01,"],
            None,
            "line 2: valid_until must be after valid_from",
        ),
        ([",HRESCH,permit,,,"], None, "line 2: patient_id"),
        (
            ["p1,HRESCH,permit,,,"],
            "patient_id,purpose,decision,valid_from,valid_until,note",
            "line 1: .*'note'",
        ),
        (["p1,permit"], "patient_id,decision", "line 1: .*missing \\['purpose'\\]"),
        ([], "", "empty file"),
    ],
    ids=[
        "bad-decision",
        "bad-date",
        "naive-datetime",
        "short-row",
        "inverted-period",
        "no-patient",
        "unknown-column",
        "missing-column",
        "empty",
    ],
)
def test_a_bad_csv_row_stops_the_import_naming_its_line(registry, tmp_path, site_log, rows, header, words):
    path = tmp_path / "bad.csv"
    if header == "":
        path.write_text("")
    else:
        write_csv(path, rows, **({"header": header} if header else {}))
    with pytest.raises(ConsentImportError, match=words):
        registry.import_csv(path)
    assert registry.records() == []
    assert site_log.head().seq == 0


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda c: c.pop("scope"), r"resource 1 \(Consent/c1\): not a valid FHIR R4 Consent: scope"),
        (lambda c: c["provision"].pop("type"), "provision.type must be 'permit' or 'deny'"),
        (lambda c: c.pop("patient"), "patient must be"),
        (lambda c: c.pop("provision"), "needs a provision"),
    ],
    ids=["invalid-resource", "no-provision-type", "no-patient", "no-provision"],
)
def test_a_bad_fhir_consent_stops_the_import_naming_it(registry, mutate, words):
    good, bad = fhir_consent("c0", "p0"), fhir_consent("c1", "p1")
    mutate(bad)
    with pytest.raises(ConsentImportError, match=words):
        registry.import_fhir([bad, good])
    assert registry.records() == []


def test_a_fhir_file_that_is_not_json_is_refused(registry, tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(ConsentImportError, match=r"x\.json is not JSON"):
        registry.import_fhir(path)


@pytest.fixture(scope="module")
def scratch_engine() -> Iterator[Engine]:
    engine = create_engine("sqlite://")  # in memory, emptied by each example
    create_governance_tables(engine)
    yield engine
    engine.dispose()


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["p1", "p2", "p3"]),
            st.sampled_from(["HRESCH", "*", "TREAT"]),
            st.sampled_from([PERMIT, DENY]),
            st.one_of(st.none(), st.integers(-30, 30)),
            st.one_of(st.none(), st.integers(1, 60)),
            st.one_of(st.none(), st.integers(-30, 30)),
        ),
        max_size=10,
    ),
    st.integers(-40, 40),
    st.sampled_from(list(ConsentModel)),
)
def test_the_filter_keeps_exactly_whom_decide_permits(scratch_engine, records, day, model):
    engine = scratch_engine
    with engine.begin() as conn:
        for table in ("gov_consent_records", "gov_consent_snapshot_members", "gov_consent_snapshots"):
            conn.execute(text(f"DELETE FROM {table}"))
    registry = ConsentRegistry(engine, AuditLog(engine, IdentityKey.generate(), "site:a"), model=model)
    made = [
        ConsentRecord(
            patient_id=pid,
            purpose=purpose,
            decision=decision,
            valid_from=T0 + timedelta(days=start) if start is not None else None,
            valid_until=T0 + timedelta(days=(start or 0) + length) if length is not None else None,
            withdrawn_at=T0 + timedelta(days=withdrawn) if withdrawn is not None else None,
        )
        for pid, purpose, decision, start, length, withdrawn in records
    ]
    registry.add(made)
    # the registry keeps one record per identity, withdrawn at the earliest withdrawal given for it
    merged: dict[str, ConsentRecord] = {}
    for r in made:
        key = json.dumps(r.identity(), sort_keys=True)
        prior = merged.get(key)
        stamps = [t for t in (r.withdrawn_at, prior.withdrawn_at if prior else None) if t is not None]
        merged[key] = replace(r, withdrawn_at=min(stamps, default=None))
    at = T0 + timedelta(days=day, hours=1)
    result = registry.filter(["p1", "p2", "p3", "p4"], "HRESCH", at)
    patients = ("p1", "p2", "p3", "p4")
    verdicts = {p: decide([r for r in merged.values() if r.patient_id == p], "HRESCH", at) for p in patients}
    opt_out = model is ConsentModel.OPT_OUT
    assert set(result.kept_patient_ids) == {
        p for p, v in verdicts.items() if v is PERMIT or (v is None and opt_out)
    }
    assert result.denied_count == sum(v is DENY for v in verdicts.values())
    assert result.no_record_count == sum(v is None for v in verdicts.values())
