"""Bad input at `fedhealth site dataset add/check`: each connector failure is exactly one ``error:`` line
(what failed, then what to do), nothing is registered, and no secret is printed."""

from __future__ import annotations

import json

import pytest
from heart_sources import FLAT_SCHEMA, MMOL_L, OMOP_DEFINITION, load_flat_table, load_omop, patients
from site_cli import cli, make_site_home

from support import POSTGRES_URL

pytestmark = pytest.mark.postgres


def one_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: dataset 'heart': ")
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def site(pg, heart_dir, tmp_path):
    engine, schema = pg
    people = patients(3, heart_dir)
    load_flat_table(engine, schema, "heart", people)
    load_omop(engine, schema, people)
    (tmp_path / "flat.toml").write_text(FLAT_SCHEMA)
    (tmp_path / "omop.toml").write_text(OMOP_DEFINITION)
    return make_site_home(tmp_path), engine, schema, tmp_path


@pytest.mark.parametrize(
    ("case", "words", "hint"),
    [
        (
            "unreachable",
            "cannot reach the database at postgresql+psycopg://analyst:***@127.0.0.1:9/test",
            "running",
        ),
        ("unknown user", "refuses this site's credentials", "check the user name and the password"),
        ("writes", "the dataset query is a DELETE statement; only SELECT is run", "one SELECT"),
        ("missing table", "table '{schema}.admissions' does not exist", "check table= and db_schema="),
        (
            "missing concept",
            "concept(s) not in the CDM's concept table: 4329847 (the cohort)",
            "load the vocabulary",
        ),
        ("unit", "feature 'chol': 1 value(s) in the window carry unit concept(s) ['8753']", "convert the"),
        ("text in a number", "column 'chol' holds 'high', not a number", "declare it in a schema file"),
    ],
)
def test_each_bad_source_is_one_line_at_add_and_nothing_is_registered(site, case, words, hint):
    home, engine, schema, folder = site
    flat, omop = folder / "flat.toml", folder / "omop.toml"
    sql = f"sql+{POSTGRES_URL}?db_schema={schema}&schema={flat}"
    cdm = f"omop+{POSTGRES_URL}?cdm_schema={schema}&definition={omop}"
    if case == "unreachable":
        uri = "sql+postgresql+psycopg://analyst:hunter2@127.0.0.1:9/test?table=heart&label=disease"
    elif case == "unknown user":
        uri = f"{sql}&table=heart".replace("postgres@", "no_such_user@")
    elif case == "writes":
        uri = f"{sql}&query=DELETE FROM heart"
    elif case == "missing table":
        uri = f"{sql}&table=admissions"
    elif case == "missing concept":
        omop.write_text(
            OMOP_DEFINITION.replace("visit_concept_ids = [9202]", "condition_concept_ids = [4329847]")
        )
        uri = cdm
    elif case == "unit":
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f'UPDATE "{schema}".measurement SET unit_concept_id = {MMOL_L} WHERE measurement_id = '
                f'(SELECT min(measurement_id) FROM "{schema}".measurement '
                "WHERE measurement_concept_id = 3027114)"
            )
        uri = cdm
    else:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'ALTER TABLE "{schema}".heart ALTER COLUMN chol TYPE text')
            conn.exec_driver_sql(
                f"UPDATE \"{schema}\".heart SET chol = 'high' WHERE patient_id = 'hd3-000004'"
            )
        uri = f"{sql}&table=heart"
    line = one_error(cli("site", "dataset", "add", "heart", uri, "--home", home))
    assert words.format(schema=schema) in line
    assert hint in line
    assert "hunter2" not in line
    assert not (home / "datasets.json").exists()


def test_a_registered_source_that_breaks_is_one_line_at_check_and_list_marks_it(site):
    home, engine, schema, folder = site
    uri = f"sql+{POSTGRES_URL}?db_schema={schema}&table=heart&schema={folder / 'flat.toml'}"
    assert cli("site", "dataset", "add", "heart", uri, "--home", home).exit_code == 0
    with engine.begin() as conn:
        conn.exec_driver_sql(f'ALTER TABLE "{schema}".heart RENAME COLUMN chol TO cholesterol')
    line = one_error(cli("site", "dataset", "check", "heart", "--home", home))
    assert "column(s) ['chol'] of the dataset's schema are not among the source's columns" in line
    assert "add the dataset again with --replace" in line
    listed = json.loads(cli("site", "dataset", "list", "--home", home, "--json").stdout)
    assert listed[0]["ok"] is False
