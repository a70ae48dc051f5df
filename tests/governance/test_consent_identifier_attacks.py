"""Attacks on "patient consent is honoured at training time" through how a patient id is *spelled*.

The consent registry and the dataset learn a patient's id from two different feeds (a consent CSV or FHIR
server, and the hospital's table), and the two rarely agree byte for byte: one writes ``P0003`` and the other
``p0003``, a database column typed integer drops the leading zeros a text export kept (``01001`` / ``1001``),
a spreadsheet writes ``1001.0``, one system stores full-width digits or a decomposed accent, a sloppy export
leaves a zero-width space in the cell. Matching ids exactly is right for a *permit* (a permit for another
spelling grants nothing, so opt-in can only lose rows), but under opt-out a *deny* that fails to match means
the patient who said no is trained on. These tests deny (or withdraw) one patient under one spelling and run
the registry's task-time filter over the ids as the dataset spells them; each has its control (nothing denied:
the same row is kept), so none can pass because the row was never there.
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import Engine

from fedhealth.data import open_dataset
from fedhealth.governance import (
    AuditLog,
    ConsentDecision,
    ConsentModel,
    ConsentRecord,
    ConsentRegistry,
)

PURPOSE = "research"
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
PERMIT, DENY = ConsentDecision.PERMIT, ConsentDecision.DENY

# (how the consent feed spells the patient, how the dataset spells the same patient)
SPELLINGS = {
    "case": ("P0003", "p0003"),
    "full-width-digits": ("p\uff10\uff10\uff10\uff13", "p0003"),
    "decomposed-accent": (unicodedata.normalize("NFD", "jos\u00e9-3"), "jos\u00e9-3"),
    "zero-width-space": ("p0003", "p0003\u200b"),
    "leading-zeros": ("01001", "1001"),
    "float-text": ("1001.0", "1001"),
}
OTHERS = [f"q{i:04d}" for i in range(12)]


def registry(engine: Engine, log: AuditLog, model: ConsentModel) -> ConsentRegistry:
    return ConsentRegistry(engine, log, model=model)


def record(patient: str, decision: ConsentDecision, **kw: object) -> ConsentRecord:
    return ConsentRecord(patient_id=patient, purpose=PURPOSE, decision=decision, **kw)  # type: ignore[arg-type]


def kept_ids(reg: ConsentRegistry, ids: list[str]) -> set[str]:
    result = reg.filter(ids, PURPOSE, NOW)
    return {ids[i] for i in result.kept_indices}


# --- a deny under another spelling --------------------------------------------------------------------------


@pytest.mark.parametrize(("consent_id", "data_id"), SPELLINGS.values(), ids=SPELLINGS.keys())
def test_under_opt_out_a_deny_spelled_differently_from_the_dataset_still_excludes_the_patient(
    engine, site_log, consent_id, data_id
):
    reg = registry(engine, site_log, ConsentModel.OPT_OUT)
    ids = [*OTHERS, data_id]
    assert data_id in kept_ids(reg, ids)  # control: nobody denied, the row is used
    reg.add([record(consent_id, DENY)])
    kept = kept_ids(reg, ids)
    assert data_id not in kept
    assert kept == set(OTHERS)


@pytest.mark.parametrize(("consent_id", "data_id"), SPELLINGS.values(), ids=SPELLINGS.keys())
def test_under_opt_in_an_exact_permit_does_not_outweigh_a_deny_under_another_spelling(
    engine, site_log, consent_id, data_id
):
    """Two feeds disagree about one patient: the row is left out (fail closed), never trained on."""
    reg = registry(engine, site_log, ConsentModel.OPT_IN)
    reg.add([record(p, PERMIT) for p in [*OTHERS, data_id]])
    ids = [*OTHERS, data_id]
    assert data_id in kept_ids(reg, ids)  # control
    reg.add([record(consent_id, DENY, valid_from=NOW - timedelta(days=400))])
    assert kept_ids(reg, ids) == set(OTHERS)


@pytest.mark.parametrize(("consent_id", "data_id"), SPELLINGS.values(), ids=SPELLINGS.keys())
def test_under_opt_in_a_permit_under_another_spelling_grants_nothing(engine, site_log, consent_id, data_id):
    """The other direction must not widen: opt-in never uses a row whose id matches no permit exactly."""
    reg = registry(engine, site_log, ConsentModel.OPT_IN)
    reg.add([record(p, PERMIT) for p in OTHERS] + [record(consent_id, PERMIT)])
    result = reg.filter([*OTHERS, data_id], PURPOSE, NOW)
    assert set(result.kept_patient_ids) == set(OTHERS)
    assert result.permitted_count == len(OTHERS)


def test_a_withdrawal_under_another_spelling_excludes_the_patient_and_names_the_snapshots_it_was_in(
    engine, site_log
):
    reg = registry(engine, site_log, ConsentModel.OPT_OUT)
    ids = [*OTHERS, "p0003"]
    before = reg.filter(ids, PURPOSE, NOW - timedelta(days=1))
    assert "p0003" in before.kept_patient_ids  # control: trained on before the withdrawal
    notice = reg.withdraw("P0003", when=NOW - timedelta(hours=1))
    assert "p0003" not in kept_ids(reg, ids)
    assert before.snapshot_hash in notice.snapshot_hashes


def test_the_spelling_rule_does_not_exclude_other_patients(engine, site_log):
    """Control on the rule itself: ids that only look alike (another digit, another prefix) are not one."""
    reg = registry(engine, site_log, ConsentModel.OPT_OUT)
    reg.add([record("p0003", DENY)])
    ids = ["p0033", "p003", "q0003", "0003a", "p0003-b", "10010", "1001.5"]
    assert kept_ids(reg, [*ids, "p0003"]) == set(ids)


# --- the id as a typed source gives it ----------------------------------------------------------------------


def parquet_cohort(path: Path, ids: pd.Series) -> str:
    n = len(ids)
    frame = pd.DataFrame({"pid": ids, "age": np.arange(n, dtype=np.float64) % 7, "label": np.arange(n) % 2})
    frame.to_parquet(path, index=False)
    return f"file://{path}?label=label&id=pid"


def dataset_ids(uri: str) -> list[str]:
    dataset = open_dataset(uri)
    assert dataset.patient_ids_train is not None
    assert dataset.patient_ids_test is not None
    return [*dataset.patient_ids_train, *dataset.patient_ids_test]


def test_an_integer_id_column_matches_a_deny_imported_as_text_with_leading_zeros(engine, site_log, tmp_path):
    """The hospital's table types the MRN as an integer (1001); the consent export kept it as text (01001)."""
    uri = parquet_cohort(tmp_path / "c.parquet", pd.Series(range(1000, 1030), dtype="int64"))
    ids = dataset_ids(uri)
    assert "1001" in ids
    reg = registry(engine, site_log, ConsentModel.OPT_OUT)
    assert "1001" in kept_ids(reg, ids)  # control
    (tmp_path / "consent.csv").write_text("patient_id,purpose,decision\n01001,research,deny\n")
    reg.import_csv(tmp_path / "consent.csv")
    kept = kept_ids(reg, ids)
    assert "1001" not in kept
    assert len(kept) == 29


def test_a_float_typed_id_column_matches_the_permit_of_its_integer_id(engine, site_log, tmp_path):
    """A nullable integer read as float (1001.0) is the patient 1001: the permit is found, nothing lost."""
    uri = parquet_cohort(tmp_path / "f.parquet", pd.Series([float(i) for i in range(1000, 1030)]))
    ids = dataset_ids(uri)
    reg = registry(engine, site_log, ConsentModel.OPT_IN)
    reg.add([record(str(i), PERMIT) for i in range(1000, 1030)])
    assert len(kept_ids(reg, ids)) == 30


def test_a_binary_id_column_is_read_as_the_text_it_holds(engine, site_log, tmp_path):
    """A Parquet BINARY column (no string annotation) holds the same ids as text: ``b'p0003'`` would match
    no consent record, and under opt-out the patient who denied would be trained on."""
    uri = parquet_cohort(tmp_path / "b.parquet", pd.Series([f"p{i:04d}".encode() for i in range(30)]))
    ids = dataset_ids(uri)
    assert "p0003" in ids
    reg = registry(engine, site_log, ConsentModel.OPT_OUT)
    reg.add([record("p0003", DENY)])
    assert "p0003" not in kept_ids(reg, ids)
    assert len(kept_ids(reg, ids)) == 29


# --- one patient, several rows ------------------------------------------------------------------------------


def test_every_row_of_a_withdrawn_patient_is_dropped_however_many_there_are(engine, site_log):
    reg = registry(engine, site_log, ConsentModel.OPT_IN)
    reg.add([record(p, PERMIT) for p in [*OTHERS, "p0003"]])
    rows = ["p0003", *OTHERS[:4], "p0003", *OTHERS[4:], "p0003"]
    assert len(reg.filter(rows, PURPOSE, NOW).kept_indices) == len(rows)  # control
    reg.withdraw("p0003", when=NOW - timedelta(hours=1))
    result = reg.filter(rows, PURPOSE, NOW)
    assert [rows[i] for i in result.kept_indices] == OTHERS
    assert result.denied_count == 1  # counted once: counts are over patients


# --- FHIR Consent vs the dataset's ids ---------------------------------------------------------------------


def fhir_deny(patient_ref: dict[str, object]) -> dict[str, object]:
    return {
        "resourceType": "Consent",
        "id": "c-1",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
        "patient": patient_ref,
        "dateTime": "2025-01-10T08:00:00Z",
        "provision": {"type": "deny"},
    }


@pytest.mark.parametrize(
    "patient_ref",
    [
        {"reference": "Patient/P0003"},
        {"reference": "https://ehr.example/fhir/Patient/P0003"},
        {"identifier": {"system": "urn:mrn", "value": "P0003"}},
    ],
    ids=["relative", "absolute", "identifier"],
)
def test_a_fhir_deny_for_the_patient_under_another_case_excludes_the_dataset_row(
    engine, site_log, patient_ref
):
    reg = registry(engine, site_log, ConsentModel.OPT_OUT)
    ids = [*OTHERS, "p0003"]
    assert "p0003" in kept_ids(reg, ids)  # control
    deny = fhir_deny(patient_ref)
    reg.import_fhir({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": deny}]})
    assert kept_ids(reg, ids) == set(OTHERS)
