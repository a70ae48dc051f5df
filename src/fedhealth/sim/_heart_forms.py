"""The same Fed-Heart-Disease patients in the four forms a hospital keeps them: a CSV file, a PostgreSQL
table, an OMOP CDM v5.4 database and a FHIR R4 server, with the declarations that read each form into the
same 14 features, in the same order (for the connector tests, their end-to-end test and
``fedhealth benchmark connectors``):

    age, sex (male), resting systolic BP, cholesterol, max heart rate, ST depression, fasting blood sugar
    > 120, exercise-induced angina, chest-pain type 2/3/4, rest ECG 1/2, statin prescriptions in the year;
    label: coronary disease (FLamby's num > 0) diagnosed within a year after the index date.

Every value comes from the UCI rows (``heart_disease_records``); the synthetic parts are only the dates
(the index date 2020-07-01, births on 1 January of index year minus age, measurements a month before),
an older measurement that the "latest" rule must skip, and the statin count, a function of the row
(cholesterol >= 240, age >= 60). OMOP concept ids above 2,000,000,000 are local concepts, as the CDM
convention has it; the others are standard OMOP/LOINC/SNOMED/RxNorm codes.
"""

from __future__ import annotations

import csv
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from fedhealth.data import HeartDiseaseRecord, heart_disease_records

INDEX = date(2020, 7, 1)


@dataclass(frozen=True, slots=True)
class Patient:
    """A heart-disease row with what every form needs."""

    pid: str
    person_id: int
    age: int
    male: bool
    trestbps: float
    chol: float
    thalach: float
    oldpeak: float
    fbs: bool
    exang: bool
    cp: int
    restecg: int
    disease: bool

    @property
    def birth_date(self) -> date:
        return date(INDEX.year - self.age, 1, 1)

    @property
    def statins(self) -> int:
        return int(self.chol >= 240) + int(self.age >= 60)


def patients(center: int, data_dir: Path | None) -> list[Patient]:
    return [_patient(center, r) for r in heart_disease_records(center, data_dir)]


def _patient(center: int, r: HeartDiseaseRecord) -> Patient:
    return Patient(
        pid=r.patient_id,
        person_id=center * 100_000 + int(r.patient_id.split("-")[1]),
        age=int(r.age),
        male=r.sex == 1.0,
        trestbps=r.trestbps,
        chol=r.chol,
        thalach=r.thalach,
        oldpeak=r.oldpeak,
        fbs=r.fbs == 1.0,
        exang=r.exang == 1.0,
        cp=r.cp,
        restecg=r.restecg,
        disease=r.disease == 1,
    )


# --- CSV and a SQL table ------------------------------------------------------------------------------------

FLAT_COLUMNS = [
    "patient_id",
    "birth_date",
    "sex",
    "trestbps",
    "chol",
    "thalach",
    "oldpeak",
    "fbs",
    "exang",
    "cp",
    "restecg",
    "statin_prescriptions",
    "disease",
]

FLAT_SCHEMA = f"""
id = "patient_id"
label = "disease"

[columns.birth_date]
type = "date"
unit = "years"
reference = "{INDEX.isoformat()}"
name = "age"

[columns.sex]
type = "categorical"
categories = ["female", "male"]
drop_first = true

[columns.trestbps]
[columns.chol]
[columns.thalach]
[columns.oldpeak]
[columns.fbs]
[columns.exang]

[columns.cp]
type = "categorical"
categories = [1, 2, 3, 4]
drop_first = true

[columns.restecg]
type = "categorical"
categories = [0, 1, 2]
drop_first = true

[columns.statin_prescriptions]
"""


def flat_rows(people: Sequence[Patient]) -> list[list[Any]]:
    return [
        [
            p.pid,
            p.birth_date.isoformat(),
            "male" if p.male else "female",
            p.trestbps,
            p.chol,
            p.thalach,
            p.oldpeak,
            int(p.fbs),
            int(p.exang),
            p.cp,
            p.restecg,
            p.statins,
            int(p.disease),
        ]
        for p in people
    ]


def write_csv(path: Path, people: Sequence[Patient]) -> Path:
    rows = flat_rows(people)
    rows.reverse()  # storage order never matters: rows are read in patient-id order
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FLAT_COLUMNS)
        writer.writerows(rows)
    return path


def load_flat_table(engine: sa.Engine, schema: str, table: str, people: Sequence[Patient]) -> None:
    """A typed table, as a warehouse would hold it: dates as DATE, numbers as double precision."""
    md = sa.MetaData(schema=schema)
    f = sa.Float(precision=53)
    t = sa.Table(
        table,
        md,
        sa.Column("patient_id", sa.String(20), primary_key=True),
        sa.Column("birth_date", sa.Date),
        sa.Column("sex", sa.String(10)),
        *[sa.Column(c, f) for c in ("trestbps", "chol", "thalach", "oldpeak")],
        *[
            sa.Column(c, sa.Integer)
            for c in ("fbs", "exang", "cp", "restecg", "statin_prescriptions", "disease")
        ],
    )
    md.create_all(engine)
    rows = [dict(zip(FLAT_COLUMNS, r, strict=True)) for r in flat_rows(people)]
    for row in rows:
        row["birth_date"] = date.fromisoformat(row["birth_date"])
    with engine.begin() as conn:
        conn.execute(t.insert(), rows[::-1])


# --- OMOP CDM v5.4 -----------------------------------------------------------------------------------------

EHR = 32817  # type concept: EHR
MALE, FEMALE, OUTPATIENT = 8507, 8532, 9202
SBP, CHOLESTEROL, HEART_RATE, ST_DEPRESSION = 3004249, 3027114, 3027018, 2_000_000_001
MMHG, MG_DL, PER_MINUTE, MM, MMOL_L = 8876, 8840, 8541, 8588, 8753
FBS, EXANG = 2_000_000_011, 2_000_000_041
CP = {2: 2_000_000_022, 3: 2_000_000_023, 4: 2_000_000_024}
RESTECG = {1: 2_000_000_031, 2: 2_000_000_032}
SIMVASTATIN, CORONARY_ARTERIOSCLEROSIS = 1539403, 317576

CONCEPTS = [
    (MALE, "MALE", "Gender", "Gender", "Gender", "8507"),
    (FEMALE, "FEMALE", "Gender", "Gender", "Gender", "8532"),
    (OUTPATIENT, "Outpatient Visit", "Visit", "Visit", "Visit", "OP"),
    (SBP, "Systolic blood pressure", "Measurement", "LOINC", "Clinical Observation", "8480-6"),
    (
        CHOLESTEROL,
        "Cholesterol [Mass/volume] in Serum or Plasma",
        "Measurement",
        "LOINC",
        "Lab Test",
        "2093-3",
    ),
    (HEART_RATE, "Heart rate", "Measurement", "LOINC", "Clinical Observation", "8867-4"),
    (ST_DEPRESSION, "ST depression induced by exercise", "Measurement", "Local", "Local", "st-depression"),
    (MMHG, "millimeter mercury column", "Unit", "UCUM", "Unit", "mm[Hg]"),
    (MG_DL, "milligram per deciliter", "Unit", "UCUM", "Unit", "mg/dL"),
    (PER_MINUTE, "per minute", "Unit", "UCUM", "Unit", "/min"),
    (MM, "millimeter", "Unit", "UCUM", "Unit", "mm"),
    (MMOL_L, "millimole per liter", "Unit", "UCUM", "Unit", "mmol/L"),
    (FBS, "Fasting blood sugar above 120 mg/dL", "Condition", "Local", "Local", "fbs"),
    (EXANG, "Exercise-induced angina", "Observation", "Local", "Local", "exang"),
    *[(c, f"Chest pain type {k}", "Condition", "Local", "Local", f"cp-{k}") for k, c in CP.items()],
    *[
        (c, f"Resting ECG finding {k}", "Condition", "Local", "Local", f"restecg-{k}")
        for k, c in RESTECG.items()
    ],
    (SIMVASTATIN, "simvastatin", "Drug", "RxNorm", "Ingredient", "36567"),
    (
        CORONARY_ARTERIOSCLEROSIS,
        "Coronary arteriosclerosis",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        "53741008",
    ),
    (EHR, "EHR", "Type Concept", "Type Concept", "Type Concept", "OMOP4976890"),
]

OMOP_DEFINITION = """
[cohort]
visit_concept_ids = [9202]
person_id = "person_source_value"

[label]
name = "disease"
domain = "condition"
concept_ids = [317576]
window = [1, 365]

[[features]]
name = "age"
kind = "age_at_index"

[[features]]
name = "gender"
kind = "gender"
categories = [8532, 8507]
drop_first = true

[[features]]
name = "trestbps"
kind = "latest_measurement"
concept_ids = [3004249]
unit_concept_ids = [8876]
window = [-365, 0]

[[features]]
name = "chol"
kind = "latest_measurement"
concept_ids = [3027114]
unit_concept_ids = [8840]
window = [-365, 0]

[[features]]
name = "thalach"
kind = "latest_measurement"
concept_ids = [3027018]
unit_concept_ids = [8541]
window = [-365, 0]

[[features]]
name = "oldpeak"
kind = "latest_measurement"
concept_ids = [2000000001]
unit_concept_ids = [8588]
window = [-365, 0]

[[features]]
name = "fbs"
kind = "present"
domain = "condition"
concept_ids = [2000000011]
window = [-3650, 0]

[[features]]
name = "exang"
kind = "present"
domain = "observation"
concept_ids = [2000000041]
window = [-3650, 0]

[[features]]
name = "cp_2"
kind = "present"
domain = "condition"
concept_ids = [2000000022]
window = [-3650, 0]

[[features]]
name = "cp_3"
kind = "present"
domain = "condition"
concept_ids = [2000000023]
window = [-3650, 0]

[[features]]
name = "cp_4"
kind = "present"
domain = "condition"
concept_ids = [2000000024]
window = [-3650, 0]

[[features]]
name = "restecg_1"
kind = "present"
domain = "condition"
concept_ids = [2000000031]
window = [-3650, 0]

[[features]]
name = "restecg_2"
kind = "present"
domain = "condition"
concept_ids = [2000000032]
window = [-3650, 0]

[[features]]
name = "statins"
kind = "count"
domain = "drug"
concept_ids = [1539403]
window = [-365, 0]
"""


def create_cdm(engine: sa.Engine, schema: str, ddl: Path) -> None:
    """The CDM tables of an official DDL file (``@cdmDatabaseSchema`` placeholders) in ``schema``."""
    text = ddl.read_text().replace("@cdmDatabaseSchema", f'"{schema}"')
    body = "\n".join(line for line in text.splitlines() if not line.strip().startswith("--"))
    with engine.begin() as conn:
        for statement in body.split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)


def omop_rows(people: Sequence[Patient]) -> dict[str, list[dict[str, Any]]]:
    """The CDM rows of the patients (before the index date: findings; after it: the outcome)."""
    rows: dict[str, list[dict[str, Any]]] = {
        k: []
        for k in (
            "person",
            "observation_period",
            "visit_occurrence",
            "condition_occurrence",
            "drug_exposure",
            "measurement",
            "observation",
        )
    }
    counter = iter(range(1, 10**9))
    for p in people:
        pid = p.person_id
        rows["person"].append(
            {
                "person_id": pid,
                "gender_concept_id": MALE if p.male else FEMALE,
                "year_of_birth": p.birth_date.year,
                "month_of_birth": 1,
                "day_of_birth": 1,
                "race_concept_id": 0,
                "ethnicity_concept_id": 0,
                "person_source_value": p.pid,
            }
        )
        rows["observation_period"].append(
            {
                "observation_period_id": next(counter),
                "person_id": pid,
                "observation_period_start_date": date(2010, 1, 1),
                "observation_period_end_date": date(2022, 12, 31),
                "period_type_concept_id": EHR,
            }
        )
        rows["visit_occurrence"].append(
            {
                "visit_occurrence_id": next(counter),
                "person_id": pid,
                "visit_concept_id": OUTPATIENT,
                "visit_start_date": INDEX,
                "visit_end_date": INDEX,
                "visit_type_concept_id": EHR,
            }
        )
        # a later visit of the same kind: the index is the first one
        later = {"visit_start_date": date(2021, 3, 1), "visit_end_date": date(2021, 3, 1)}
        rows["visit_occurrence"].append(
            {**rows["visit_occurrence"][-1], "visit_occurrence_id": next(counter), **later}
        )
        for concept, unit, value in (
            (SBP, MMHG, p.trestbps),
            (CHOLESTEROL, MG_DL, p.chol),
            (HEART_RATE, PER_MINUTE, p.thalach),
            (ST_DEPRESSION, MM, p.oldpeak),
        ):
            for day, shown in ((INDEX - timedelta(days=30), value), (INDEX - timedelta(days=200), value + 7)):
                rows["measurement"].append(
                    {
                        "measurement_id": next(counter),
                        "person_id": pid,
                        "measurement_concept_id": concept,
                        "measurement_date": day,
                        "measurement_type_concept_id": EHR,
                        "value_as_number": shown,
                        "unit_concept_id": unit,
                    }
                )
        findings = [FBS] * p.fbs + [CP[p.cp] for _ in [1] if p.cp in CP]
        findings += [RESTECG[p.restecg] for _ in [1] if p.restecg in RESTECG]
        for concept in findings:
            rows["condition_occurrence"].append(
                _condition(next(counter), pid, concept, INDEX - timedelta(days=16))
            )
        if p.disease:
            rows["condition_occurrence"].append(
                _condition(next(counter), pid, CORONARY_ARTERIOSCLEROSIS, INDEX + timedelta(days=62))
            )
        if p.exang:
            rows["observation"].append(
                {
                    "observation_id": next(counter),
                    "person_id": pid,
                    "observation_concept_id": EXANG,
                    "observation_date": INDEX - timedelta(days=16),
                    "observation_type_concept_id": EHR,
                }
            )
        for k in range(p.statins):
            start = INDEX - timedelta(days=90 * (k + 1))
            rows["drug_exposure"].append(
                {
                    "drug_exposure_id": next(counter),
                    "person_id": pid,
                    "drug_concept_id": SIMVASTATIN,
                    "drug_exposure_start_date": start,
                    "drug_exposure_end_date": start + timedelta(days=30),
                    "drug_type_concept_id": EHR,
                }
            )
    return rows


def _condition(row_id: int, pid: int, concept: int, day: date) -> dict[str, Any]:
    return {
        "condition_occurrence_id": row_id,
        "person_id": pid,
        "condition_concept_id": concept,
        "condition_start_date": day,
        "condition_type_concept_id": EHR,
    }


def load_omop(
    engine: sa.Engine, schema: str, people: Sequence[Patient], *, ddl: Path, concepts: bool = True
) -> None:
    create_cdm(engine, schema, ddl)
    md = sa.MetaData(schema=schema)
    md.reflect(engine)
    with engine.begin() as conn:
        for table, rows in omop_rows(people).items():
            if rows:
                conn.execute(md.tables[f"{schema}.{table}"].insert(), rows)
        if concepts:
            conn.execute(
                md.tables[f"{schema}.concept"].insert(),
                [
                    {
                        "concept_id": c,
                        "concept_name": name,
                        "domain_id": domain,
                        "vocabulary_id": vocabulary,
                        "concept_class_id": klass,
                        "standard_concept": "S",
                        "concept_code": code,
                        "valid_start_date": date(1970, 1, 1),
                        "valid_end_date": date(2099, 12, 31),
                    }
                    for c, name, domain, vocabulary, klass, code in CONCEPTS
                ],
            )


# --- FHIR R4 ------------------------------------------------------------------------------------------------

LOCAL = "http://fedhealth.example/codes"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
OBSERVATIONS = {  # feature: (system, code, UCUM unit)
    "trestbps": ("http://loinc.org", "8480-6", "mm[Hg]"),
    "chol": ("http://loinc.org", "2093-3", "mg/dL"),
    "thalach": ("http://loinc.org", "8867-4", "/min"),
    "oldpeak": (LOCAL, "st-depression", "mm"),
}

FHIR_MAPPING = (
    f"""
index_date = {INDEX.isoformat()}

[label]
name = "disease"
resource = "Condition"
codes = ["{SNOMED}|53741008"]
window = [1, 365]

[[features]]
name = "age"
kind = "age"

[[features]]
name = "sex"
kind = "gender"
categories = ["female", "male"]
drop_first = true
"""
    + "".join(
        f"""
[[features]]
name = "{name}"
kind = "latest"
resource = "Observation"
codes = ["{system}|{code}"]
unit = "{unit}"
window = [-365, 0]
"""
        for name, (system, code, unit) in OBSERVATIONS.items()
    )
    + "".join(
        f"""
[[features]]
name = "{name}"
kind = "present"
resource = "Condition"
codes = ["{LOCAL}|{code}"]
window = [-3650, 0]
"""
        for name, code in (
            ("fbs", "fbs"),
            ("exang", "exang"),
            ("cp_2", "cp-2"),
            ("cp_3", "cp-3"),
            ("cp_4", "cp-4"),
            ("restecg_1", "restecg-1"),
            ("restecg_2", "restecg-2"),
        )
    )
    + f"""
[[features]]
name = "statins"
kind = "count"
resource = "MedicationRequest"
codes = ["{RXNORM}|36567"]
window = [-365, 0]
"""
)


def fhir_resources(
    people: Sequence[Patient], *, unit_of: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Patients and their Observations, Conditions and MedicationRequests (``unit_of`` overrides a unit)."""
    out: list[dict[str, Any]] = []
    n = 0

    def rid() -> str:
        nonlocal n
        n += 1
        return f"r{n:07d}"

    for p in people:
        subject = {"reference": f"Patient/{p.pid}"}
        out.append(
            {"resourceType": "Patient", "id": p.pid, "gender": "male" if p.male else "female",
             "birthDate": p.birth_date.isoformat()}
        )  # fmt: skip
        for name, (system, code, unit) in OBSERVATIONS.items():
            value = getattr(p, name)
            shown = (unit_of or {}).get(name, unit)
            for day, v in ((INDEX - timedelta(days=30), value), (INDEX - timedelta(days=200), value + 7)):
                out.append(
                    {
                        "resourceType": "Observation",
                        "id": rid(),
                        "status": "final",
                        "code": {"coding": [{"system": system, "code": code}]},
                        "subject": subject,
                        "effectiveDateTime": day.isoformat(),
                        "valueQuantity": {"value": v, "unit": shown, "system": UCUM, "code": shown},
                    }
                )
        codes = (
            ["fbs"] * p.fbs
            + ["exang"] * p.exang
            + [f"cp-{p.cp}"] * (p.cp in CP)
            + [f"restecg-{p.restecg}"] * (p.restecg in RESTECG)
        )
        for code in codes:
            out.append(_fhir_condition(rid(), subject, LOCAL, code, INDEX - timedelta(days=16)))
        if p.disease:
            out.append(_fhir_condition(rid(), subject, SNOMED, "53741008", INDEX + timedelta(days=62)))
        for k in range(p.statins):
            out.append(
                {
                    "resourceType": "MedicationRequest",
                    "id": rid(),
                    "status": "active",
                    "intent": "order",
                    "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "36567"}]},
                    "subject": subject,
                    "authoredOn": (INDEX - timedelta(days=90 * (k + 1))).isoformat(),
                }
            )
    return out


def _fhir_condition(rid: str, subject: dict[str, str], system: str, code: str, day: date) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": rid,
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": subject,
        "onsetDateTime": day.isoformat(),
    }


HL7 = "http://terminology.hl7.org/CodeSystem"


def research_consent(pid: str, decision: str = "permit") -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": f"consent-{pid}",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{pid}"},
        "dateTime": "2019-01-01",
        "policyRule": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]
        },
        "provision": {"type": decision},
    }


# --- a FHIR server on loopback: PyPI's sekmet-fhir, in its own virtualenv ----------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FhirServer:
    base_url: str
    process: subprocess.Popen[bytes]
    token: str

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/fhir+json"},
            timeout=300,
        )

    def load(self, resources: Sequence[dict[str, Any]], batch: int = 1000) -> None:
        """PUT every resource (with its id) in transaction bundles."""
        with self.client() as http:
            for start in range(0, len(resources), batch):
                entries = [
                    {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                    for r in resources[start : start + batch]
                ]
                response = http.post(
                    "", json={"resourceType": "Bundle", "type": "transaction", "entry": entries}
                )
                assert response.status_code == 200, response.text[:500]


@contextmanager
def sekmet_server(exe: Path, scratch: Path, *, token: str | None = None) -> Iterator[FhirServer]:
    """A sekmet-fhir server (PyPI ``sekmet-fhir``, run from its own virtualenv: ``exe`` is its ``sekmet``
    command) on a free loopback port with bearer auth (a random token unless one is given), its data in
    ``scratch``."""
    token = token or secrets.token_urlsafe(24)
    port = free_port()
    scratch.mkdir(parents=True, exist_ok=True)
    settings = scratch / "settings.yaml"
    base = f"http://127.0.0.1:{port}/fhir"
    settings.write_text(
        f"base_url: {base}\nhost: 127.0.0.1\nport: {port}\ndata_dir: {scratch / 'data'}\n"
        "simulator: {enabled: false}\nlog_inbound: false\n"
        f"server_auth: {{types: [bearer], tokens: [{token}]}}\n"
    )
    log = (scratch / "server.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_")}
    process = subprocess.Popen(
        [str(exe), "serve", "-c", str(settings)], stdout=log, stderr=subprocess.STDOUT, cwd=scratch, env=env
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the FHIR server exited: {(scratch / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/metadata", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the FHIR server did not answer /metadata within 60 s")
            time.sleep(0.2)
        yield FhirServer(base_url=base, process=process, token=token)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
