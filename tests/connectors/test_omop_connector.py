"""The OMOP CDM v5.4 connector against the test PostgreSQL server: a cohort built from the official DDL
and Fed-Heart-Disease rows gives the same features as the CSV file of those rows; each failure is one line."""

from __future__ import annotations

from datetime import date

import numpy as np
import pytest
from heart_sources import (
    CHOLESTEROL,
    FLAT_SCHEMA,
    MMOL_L,
    OMOP_DEFINITION,
    SBP,
    load_omop,
    patients,
    write_csv,
)

from fedhealth.core import ConfigError
from fedhealth.data import (
    OmopDefinition,
    SchemaError,
    SourceUnavailableError,
    UnitMismatchError,
    compile_cohort_query,
    load_definition,
    open_dataset,
)
from fedhealth.data._omop import _cdm_tables
from support import POSTGRES_URL

pytestmark = pytest.mark.postgres


@pytest.fixture
def cdm(pg, heart_dir, tmp_path):
    """Switzerland's patients in an OMOP CDM, and the same rows as a CSV file."""
    engine, schema = pg
    people = patients(2, heart_dir)
    load_omop(engine, schema, people)
    definition = tmp_path / "heart.toml"
    definition.write_text(OMOP_DEFINITION)
    flat = tmp_path / "flat.toml"
    flat.write_text(FLAT_SCHEMA)
    return engine, schema, definition, write_csv(tmp_path / "heart.csv", people), flat


def omop_uri(schema: str, definition, extra: str = "") -> str:
    return f"omop+{POSTGRES_URL}?definition={definition}&cdm_schema={schema}{extra}"


def test_a_cohort_gives_the_same_features_as_the_csv_file_of_the_same_patients(cdm):
    _, schema, definition, csv, flat = cdm
    omop = open_dataset(omop_uri(schema, definition))
    from_csv = open_dataset(f"file://{csv}?schema={flat}")
    assert omop.num_train + omop.num_test == 46
    np.testing.assert_array_equal(omop.X_train, from_csv.X_train)
    np.testing.assert_array_equal(omop.X_test, from_csv.X_test)
    np.testing.assert_array_equal(omop.y_train, from_csv.y_train)
    assert omop.patient_ids_train == from_csv.patient_ids_train
    assert omop.feature_names[:4] == ("age", "gender=8507", "trestbps", "chol")


def test_the_query_binds_every_value_and_reads_the_latest_measurement(cdm):
    engine, schema, definition, _, _ = cdm
    parsed = load_definition(definition)
    query, _ = compile_cohort_query(parsed, _cdm_tables(schema, None), "postgresql")
    sql = str(query.compile(dialect=engine.dialect))
    for value in ("3004249", "317576", "9202", "365"):
        assert value not in sql  # concept ids and windows travel as parameters
    with engine.connect() as conn:
        rows = dict(conn.execute(query).all()[0]._mapping)
    assert set(rows) >= {"person_key", "trestbps", "trestbps__bad", "disease"}
    # the earlier reading (higher by 7) lies in the window too: the latest one wins
    with engine.connect() as conn:
        latest, earlier = conn.exec_driver_sql(
            f'SELECT value_as_number FROM "{schema}".measurement JOIN "{schema}".person USING (person_id) '
            f"WHERE person_source_value = %s AND measurement_concept_id = {SBP} "
            "ORDER BY measurement_date DESC",
            (rows["person_key"],),
        ).scalars()
    assert float(rows["trestbps"]) == float(latest) == float(earlier) - 7


def test_a_concept_missing_from_the_vocabulary_is_one_line_naming_the_feature(cdm):
    _, schema, definition, _, _ = cdm
    definition.write_text(OMOP_DEFINITION.replace("concept_ids = [3027114]", "concept_ids = [3027115]"))
    with pytest.raises(
        SchemaError, match=r"concept\(s\) not in the CDM's concept table: 3027115 \(feature 'chol'\)"
    ):
        open_dataset(omop_uri(schema, definition))


def test_a_missing_cdm_table_is_one_line(cdm):
    engine, schema, definition, _, _ = cdm
    with engine.begin() as conn:
        conn.exec_driver_sql(f'DROP TABLE "{schema}".drug_exposure')
    with pytest.raises(SchemaError, match=r"the CDM table\(s\) \['drug_exposure'\] do not exist"):
        open_dataset(omop_uri(schema, definition))
    with pytest.raises(SchemaError, match=r"the CDM table\(s\) \['person', "):
        open_dataset(omop_uri("no_such_schema", definition))


def test_a_measurement_in_an_unexpected_unit_is_refused(cdm):
    engine, schema, definition, _, _ = cdm
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f'UPDATE "{schema}".measurement SET unit_concept_id = {MMOL_L}, value_as_number = 6.2 '
            f'WHERE measurement_id = (SELECT max(measurement_id) FROM "{schema}".measurement '
            f"WHERE measurement_concept_id = {CHOLESTEROL})"
        )
    with pytest.raises(
        UnitMismatchError,
        match=r"feature 'chol': 1 value\(s\) in the window carry unit concept\(s\) \['8753'\]",
    ):
        open_dataset(omop_uri(schema, definition))


def test_a_missing_measurement_follows_the_declared_policy(cdm):
    engine, schema, definition, _, _ = cdm
    with engine.begin() as conn:
        person = conn.exec_driver_sql(f'SELECT min(person_id) FROM "{schema}".person').scalar_one()
        conn.exec_driver_sql(
            f'DELETE FROM "{schema}".measurement '
            f"WHERE person_id = {person} AND measurement_concept_id = {SBP}"
        )
    with pytest.raises(SchemaError, match=r"column 'trestbps' is empty \(a missing value"):
        open_dataset(omop_uri(schema, definition, "&test_fraction=0"))
    definition.write_text(
        OMOP_DEFINITION.replace(
            "concept_ids = [3004249]\nunit_concept_ids = [8876]\nwindow = [-365, 0]",
            "concept_ids = [3004249]\nunit_concept_ids = [8876]\nwindow = [-365, 0]\n"
            'missing = "median"\nindicator = true',
        )
    )
    d = open_dataset(omop_uri(schema, definition, "&test_fraction=0&standardize=false"))
    assert d.feature_names[3] == "trestbps_missing"
    assert d.X_train[:, 3].sum() == 1


def test_the_cohort_keeps_persons_with_a_qualifying_event_inside_an_observation_period(cdm):
    engine, schema, definition, _, _ = cdm
    with engine.begin() as conn:
        ids = conn.exec_driver_sql(
            f'SELECT person_id FROM "{schema}".person ORDER BY person_id LIMIT 2'
        ).scalars()
        first, second = list(ids)
        conn.exec_driver_sql(f'DELETE FROM "{schema}".visit_occurrence WHERE person_id = {first}')
        conn.exec_driver_sql(
            f"UPDATE \"{schema}\".observation_period SET observation_period_end_date = '2020-01-01' "
            f"WHERE person_id = {second}"
        )
    d = open_dataset(omop_uri(schema, definition, "&test_fraction=0"))
    assert d.num_train == 44
    # only events from event_from on qualify: the index moves to the later visit
    text = OMOP_DEFINITION.replace("[cohort]\n", f"[cohort]\nevent_from = {date(2021, 1, 1).isoformat()}\n")
    definition.write_text(text)
    later = open_dataset(omop_uri(schema, definition, "&test_fraction=0&standardize=false"))
    assert later.num_train == 44
    # the outcomes (two months after the first visit) now lie before the index: no label is 1
    assert d.y_train.sum() > 0
    assert later.y_train.sum() == 0


def test_an_unreachable_cdm_database_is_one_line(tmp_path):
    definition = tmp_path / "d.toml"
    definition.write_text(OMOP_DEFINITION)
    with pytest.raises(
        SourceUnavailableError, match=r"cannot reach the database at postgresql\+psycopg://x@127"
    ):
        open_dataset(f"omop+postgresql+psycopg://x@127.0.0.1:9/cdm?definition={definition}")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (('kind = "count"\ndomain = "drug"', 'kind = "count"'), "a count feature needs a domain"),
        (("window = [1, 365]", "window = [365, 1]"), "starts on day 365, after it ends on day 1"),
        (("visit_concept_ids = [9202]", "visit_concept_ids = []"), "needs visit_concept_ids or condition"),
        (('name = "chol"', 'name = "age"'), "feature names must be unique"),
    ],
)
def test_a_bad_definition_names_the_key(tmp_path, edit, match):
    definition = tmp_path / "d.toml"
    definition.write_text(OMOP_DEFINITION.replace(*edit))
    with pytest.raises(ConfigError, match=match):
        open_dataset(f"omop+postgresql+psycopg://x@127.0.0.1:9/cdm?definition={definition}")


def test_the_definition_gives_the_schema_the_table_code_reads():
    import tomllib

    parsed = OmopDefinition.model_validate(tomllib.loads(OMOP_DEFINITION))
    schema = parsed.dataset_schema()
    assert schema.id == "person_key"
    assert schema.label == "disease"
    assert len(schema.feature_names) == 14
