"""``fedhealth benchmark connectors``: rows per second each connector extracts, beside pandas' ``read_sql``.

The patients are Fed-Heart-Disease rows drawn with replacement (seeded) from the four centers and given
fresh ids, so every value is a real UCI row's. Each source is loaded once (PostgreSQL through COPY, FHIR
through transaction bundles) and then timed ``repeats`` times; the median is reported:

- PostgreSQL: the SQL connector's extraction of a table of ``patients`` rows (13 columns) into its frame,
  and the whole ``open_dataset`` (extraction, parsing, ordering, split, one-hot, scaling), beside pandas'
  ``read_sql`` of the same table on the same engine;
- OMOP CDM: the compiled cohort query with 10 features over ``omop_persons`` persons (measurements,
  conditions, observations, drug exposures; two measurements per concept and person);
- FHIR: ``fhir_patients`` patients with 5 Observations each (and a Condition for those with the outcome) on a
  sekmet-fhir server on loopback, paged 1,000 resources at a time and checked with the fhir.resources models.
"""

from __future__ import annotations

import dataclasses
import secrets
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from fedhealth.data import DatasetURI, FhirConnector, SqlConnector, open_dataset
from fedhealth.sim._heart_forms import (
    FHIR_MAPPING,
    FLAT_COLUMNS,
    FLAT_SCHEMA,
    INDEX,
    OBSERVATIONS,
    SNOMED,
    UCUM,
    Patient,
    create_cdm,
    flat_rows,
    omop_rows,
    patients,
    sekmet_server,
)

# a cohort and 10 features: what the issue asks the OMOP figure to cover
OMOP_BENCH_DEFINITION = (
    """
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
"""
    + "".join(
        f"""
[[features]]
name = "{name}"
kind = "latest_measurement"
concept_ids = [{concept}]
unit_concept_ids = [{unit}]
window = [-365, 0]
"""
        for name, concept, unit in (
            ("trestbps", 3004249, 8876),
            ("chol", 3027114, 8840),
            ("thalach", 3027018, 8541),
            ("oldpeak", 2000000001, 8588),
        )
    )
    + "".join(
        f"""
[[features]]
name = "{name}"
kind = "{kind}"
domain = "{domain}"
concept_ids = [{concept}]
window = [{start}, 0]
"""
        for name, kind, domain, concept, start in (
            ("fbs", "present", "condition", 2000000011, -3650),
            ("exang", "present", "observation", 2000000041, -3650),
            ("cp_4", "present", "condition", 2000000024, -3650),
            ("statins", "count", "drug", 1539403, -365),
        )
    )
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ExtractionResult:
    """One timed extraction: the median of ``runs`` (seconds) and rows per second at that median."""

    source: str
    what: str
    rows: int
    runs: tuple[float, ...]

    @property
    def seconds(self) -> float:
        return statistics.median(self.runs)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "what": self.what,
            "rows": self.rows,
            "median_s": round(self.seconds, 4),
            "rows_per_s": round(self.rows_per_s, 1),
            "runs_s": [round(r, 4) for r in self.runs],
        }


def synthetic_patients(n: int, data_dir: Path | None, seed: int = 0) -> list[Patient]:
    """``n`` patients drawn with replacement from the four centers' rows, ids ``b0000001``..."""
    pool = [p for center in range(4) for p in patients(center, data_dir)]
    picks = np.random.default_rng(seed).integers(len(pool), size=n)
    return [
        dataclasses.replace(pool[k], pid=f"b{i + 1:07d}", person_id=i + 1)
        for i, k in enumerate(picks.tolist())
    ]


def _timed(repeats: int, run: Callable[[], int]) -> tuple[int, tuple[float, ...]]:
    runs = []
    rows = 0
    for _ in range(repeats):
        started = time.perf_counter()
        rows = run()
        runs.append(time.perf_counter() - started)
    return rows, tuple(runs)


def _copy(engine: sa.Engine, schema: str, table: str, rows: Sequence[dict[str, Any]]) -> None:
    """Bulk load through PostgreSQL's COPY (every row has the first row's keys)."""
    if not rows:
        return
    columns = list(rows[0])
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cursor:
            names = ", ".join(columns)
            with cursor.copy(f'COPY "{schema}".{table} ({names}) FROM STDIN') as copy:  # type: ignore[attr-defined]
                for row in rows:
                    copy.write_row([row.get(c) for c in columns])
        raw.commit()
    finally:
        raw.close()


@contextmanager
def _schema(engine: sa.Engine) -> Iterator[str]:
    name = f"fedhealth_bench_{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    try:
        yield name
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')


def benchmark_sql(
    engine: sa.Engine, url: str, people: Sequence[Patient], workdir: Path, repeats: int
) -> list[ExtractionResult]:
    results = []
    with _schema(engine) as schema:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f'CREATE TABLE "{schema}".heart (patient_id varchar(20) PRIMARY KEY, birth_date date, '
                "sex varchar(10), trestbps double precision, chol double precision, "
                "thalach double precision, "
                "oldpeak double precision, fbs integer, exang integer, cp integer, restecg integer, "
                "statin_prescriptions integer, disease integer)"
            )
        rows = [dict(zip(FLAT_COLUMNS, r, strict=True)) for r in flat_rows(people)]
        _copy(engine, schema, "heart", rows)
        with engine.begin() as conn:
            conn.exec_driver_sql(f'ANALYZE "{schema}".heart')
        declared = workdir / "flat.toml"
        declared.write_text(FLAT_SCHEMA)
        uri = f"sql+{url}?table=heart&db_schema={schema}&schema={declared}"
        parsed = DatasetURI.parse(uri)
        connector = SqlConnector()
        n, runs = _timed(repeats, lambda: len(connector.read(parsed, workdir)[0].frame))
        results.append(
            ExtractionResult(source="PostgreSQL", what="fedhealth SQL connector: extract", rows=n, runs=runs)
        )
        table = sa.Table("heart", sa.MetaData(), autoload_with=engine, schema=schema)
        n, runs = _timed(repeats, lambda: len(pd.read_sql(sa.select(table), engine)))
        results.append(
            ExtractionResult(source="PostgreSQL", what="pandas read_sql, same table", rows=n, runs=runs)
        )
        n, runs = _timed(repeats, lambda: _rows(open_dataset(uri)))
        results.append(
            ExtractionResult(
                source="PostgreSQL", what="fedhealth open_dataset (extract + build)", rows=n, runs=runs
            )
        )
    return results


def _rows(dataset: Any) -> int:
    return int(dataset.num_train + dataset.num_test)


def benchmark_omop(
    engine: sa.Engine, url: str, people: Sequence[Patient], ddl: Path, workdir: Path, repeats: int
) -> list[ExtractionResult]:
    from fedhealth.data import database_of, read_cohort

    results = []
    with _schema(engine) as schema:
        create_cdm(engine, schema, ddl)
        for table, rows in omop_rows(people).items():
            _copy(engine, schema, table, rows)
        from fedhealth.sim._heart_forms import CONCEPTS

        concept_rows = [
            {
                "concept_id": c,
                "concept_name": name,
                "domain_id": domain,
                "vocabulary_id": vocabulary,
                "concept_class_id": klass,
                "standard_concept": "S",
                "concept_code": code,
                "valid_start_date": "1970-01-01",
                "valid_end_date": "2099-12-31",
            }
            for c, name, domain, vocabulary, klass, code in CONCEPTS
        ]
        _copy(engine, schema, "concept", concept_rows)
        with engine.begin() as conn:
            # planner statistics, as a warehouse's autovacuum keeps them (without them PostgreSQL plans
            # nested loops over every feature)
            for table in (*omop_rows([]), "concept"):
                conn.exec_driver_sql(f'ANALYZE "{schema}".{table}')
        definition = workdir / "omop-bench.toml"
        definition.write_text(OMOP_BENCH_DEFINITION)
        from fedhealth.data import load_definition

        parsed = load_definition(definition)
        uri = DatasetURI.parse(f"omop+{url}?definition={definition}&cdm_schema={schema}")
        db = database_of(uri, "omop")
        n, runs = _timed(repeats, lambda: len(read_cohort(db, parsed, schema, None, "bench")))
        results.append(
            ExtractionResult(source="OMOP CDM", what="cohort + 10 features: extract", rows=n, runs=runs)
        )
    return results


def bench_fhir_resources(people: Sequence[Patient]) -> list[dict[str, Any]]:
    """A Patient, 5 Observations (the 4 features' latest readings and an older blood pressure) and, for
    patients with the outcome, a Condition."""
    out: list[dict[str, Any]] = []
    for p in people:
        subject = {"reference": f"Patient/{p.pid}"}
        out.append(
            {
                "resourceType": "Patient",
                "id": p.pid,
                "gender": "male" if p.male else "female",
                "birthDate": p.birth_date.isoformat(),
            }
        )
        readings = [(name, getattr(p, name), 30) for name in OBSERVATIONS] + [
            ("trestbps", p.trestbps + 7, 200)
        ]
        for k, (name, value, days) in enumerate(readings):
            system, code, unit = OBSERVATIONS[name]
            out.append(
                {
                    "resourceType": "Observation",
                    "id": f"{p.pid}-o{k}",
                    "status": "final",
                    "code": {"coding": [{"system": system, "code": code}]},
                    "subject": subject,
                    "effectiveDateTime": (INDEX - timedelta(days=days)).isoformat(),
                    "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
                }
            )
        if p.disease:
            out.append(
                {
                    "resourceType": "Condition",
                    "id": f"{p.pid}-c",
                    "code": {"coding": [{"system": SNOMED, "code": "53741008"}]},
                    "subject": subject,
                    "onsetDateTime": (INDEX + timedelta(days=62)).isoformat(),
                }
            )
    return out


BENCH_FHIR_MAPPING = FHIR_MAPPING[: FHIR_MAPPING.index('[[features]]\nname = "fbs"')]


def benchmark_fhir(
    sekmet: Path, people: Sequence[Patient], workdir: Path, repeats: int
) -> list[ExtractionResult]:
    with sekmet_server(sekmet, workdir / "fhir", token=secrets.token_urlsafe(16)) as server:
        resources = bench_fhir_resources(people)
        server.load(resources)
        mapping = workdir / "fhir-bench.toml"
        mapping.write_text(BENCH_FHIR_MAPPING)
        uri = DatasetURI.parse(
            f"fhir+{server.base_url}?mapping={mapping}&token={server.token}&page_size=1000&timeout_s=120"
        )
        connector = FhirConnector()
        n, runs = _timed(repeats, lambda: len(connector.read(uri, workdir)[0].frame))
        observations = sum(1 for r in resources if r["resourceType"] == "Observation")
        return [
            ExtractionResult(
                source="FHIR R4 (sekmet-fhir)",
                what=f"patients ({observations // max(n, 1)} Observations each): extract",
                rows=n,
                runs=runs,
            )
        ]


def benchmark_connectors(
    *,
    postgres_url: str,
    ddl: Path,
    sekmet: Path | None,
    workdir: Path,
    data_dir: Path | None = None,
    patients_n: int = 100_000,
    omop_persons: int = 100_000,
    fhir_patients: int = 10_000,
    repeats: int = 3,
    on_step: Callable[[str], None] = lambda _: None,
) -> list[ExtractionResult]:
    """Every measurement of the module docstring; FHIR is left out when ``sekmet`` is None."""
    engine = sa.create_engine(postgres_url)
    workdir = workdir.resolve()  # dataset URIs name their declaration files by absolute path
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = []
        on_step(f"PostgreSQL: {patients_n:,} patients")
        results += benchmark_sql(
            engine, postgres_url, synthetic_patients(patients_n, data_dir), workdir, repeats
        )
        on_step(f"OMOP CDM: {omop_persons:,} persons")
        results += benchmark_omop(
            engine, postgres_url, synthetic_patients(omop_persons, data_dir, seed=1), ddl, workdir, repeats
        )
        if sekmet is not None:
            on_step(f"FHIR: {fhir_patients:,} patients")
            results += benchmark_fhir(
                sekmet, synthetic_patients(fhir_patients, data_dir, seed=2), workdir, repeats
            )
        return results
    finally:
        engine.dispose()
