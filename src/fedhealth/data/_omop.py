"""OMOP CDM v5.4: a declarative cohort and feature definition, compiled to one SQL query over the standard
tables (person, observation_period, visit_occurrence, condition_occurrence, drug_exposure, measurement,
observation, concept) with SQLAlchemy Core: every concept id, date and window is a bound parameter.

    omop+postgresql+psycopg://analyst@cdm.hospital.org/cdm?definition=/etc/fedhealth/heart.toml
        &cdm_schema=cdm&password_env=CDM_PASSWORD

A definition (TOML)::

    [cohort]
    visit_concept_ids = [9202]            # qualifying events: visits and/or conditions with these concepts
    condition_concept_ids = []
    event_from = 2015-01-01               # optional: only events from / to these dates qualify
    event_to = 2022-12-31
    prior_observation_days = 0            # the index date must lie in an observation period that began at
    post_observation_days = 0             #   least this many days before it and ends at least this many after
    person_id = "person_source_value"     # the patient id consent is matched on: person_id (default) or
                                          #   person_source_value

    [label]                               # 1 if the outcome occurs in the window (days after the index date)
    name = "outcome"
    domain = "condition"                  # condition | drug | measurement | observation | visit
    concept_ids = [317576]
    window = [1, 365]

    [[features]]
    name = "age"
    kind = "age_at_index"                 # year of the index date minus year of birth (OHDSI's convention)

    [[features]]
    name = "gender"
    kind = "gender"                       # gender_concept_id, one-hot over the declared concepts
    categories = [8532, 8507]
    drop_first = true

    [[features]]
    name = "systolic_bp"
    kind = "latest_measurement"           # the latest value_as_number in the window (ties: the latest row)
    concept_ids = [3004249]
    unit_concept_ids = [8876]             # a value in another unit refuses the dataset (UnitMismatchError)
    window = [-365, 0]
    missing = "median"                    # as in a schema: refuse (default) | mean | median | constant

    [[features]]
    name = "statin_exposures"
    kind = "count"                        # records in the domain in the window; "present" gives 0 or 1
    domain = "drug"
    concept_ids = [1539403]
    window = [-365, 0]

``latest_observation`` reads value_as_number from the observation table as ``latest_measurement`` does from
measurement. The cohort is each person's first qualifying event; concept ids are matched exactly (descendants
through concept_ancestor are not expanded: list them). Before the query runs, every table used is looked up
and every concept id is looked up in ``concept``, so a missing table or concept is one clear line.
The query is written for PostgreSQL and SQLite date arithmetic (other databases: PostgreSQL's).
"""

from __future__ import annotations

from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, model_validator

from fedhealth.core import ConfigError
from fedhealth.data._connector import (
    MAX_AGE,
    TABLE_PARAMS,
    DatasetURI,
    TabularConnector,
    load_toml_document,
    table_options,
)
from fedhealth.data._errors import SchemaError, UnitMismatchError
from fedhealth.data._schema import (
    CategoricalColumn,
    ColumnSpec,
    DatasetSchema,
    MissingPolicy,
    NumericColumn,
    UnseenPolicy,
)
from fedhealth.data._sql import Database, database_of, read_only
from fedhealth.data._table import SourceTable, TableOptions

OMOP_PARAMS = frozenset({"definition", "cdm_schema", "vocabulary_schema", "password", "password_env"})
_Frozen = ConfigDict(frozen=True, extra="forbid")


class Domain(StrEnum):
    CONDITION = "condition"
    DRUG = "drug"
    MEASUREMENT = "measurement"
    OBSERVATION = "observation"
    VISIT = "visit"


class FeatureKind(StrEnum):
    AGE_AT_INDEX = "age_at_index"
    GENDER = "gender"
    LATEST_MEASUREMENT = "latest_measurement"
    LATEST_OBSERVATION = "latest_observation"
    COUNT = "count"
    PRESENT = "present"


# domain -> (table, concept column, date column, row id column)
_DOMAINS: dict[Domain, tuple[str, str, str, str]] = {
    Domain.CONDITION: (
        "condition_occurrence",
        "condition_concept_id",
        "condition_start_date",
        "condition_occurrence_id",
    ),
    Domain.DRUG: ("drug_exposure", "drug_concept_id", "drug_exposure_start_date", "drug_exposure_id"),
    Domain.MEASUREMENT: ("measurement", "measurement_concept_id", "measurement_date", "measurement_id"),
    Domain.OBSERVATION: ("observation", "observation_concept_id", "observation_date", "observation_id"),
    Domain.VISIT: ("visit_occurrence", "visit_concept_id", "visit_start_date", "visit_occurrence_id"),
}


class Window(BaseModel):
    """Days relative to the index date, both ends included."""

    model_config = _Frozen
    start: int
    end: int

    @model_validator(mode="before")
    @classmethod
    def _pair(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            if len(value) != 2:
                raise ValueError("a window is [first day, last day] relative to the index date")
            return {"start": value[0], "end": value[1]}
        return value

    @model_validator(mode="after")
    def _order(self) -> Window:
        if self.start > self.end:
            raise ValueError(f"the window starts on day {self.start}, after it ends on day {self.end}")
        return self


class Cohort(BaseModel):
    model_config = _Frozen
    visit_concept_ids: tuple[int, ...] = ()
    condition_concept_ids: tuple[int, ...] = ()
    event_from: date | None = None
    event_to: date | None = None
    prior_observation_days: int = 0
    post_observation_days: int = 0
    person_id: Literal["person_id", "person_source_value"] = "person_id"

    @model_validator(mode="after")
    def _check(self) -> Cohort:
        if not self.visit_concept_ids and not self.condition_concept_ids:
            raise ValueError("a cohort needs visit_concept_ids or condition_concept_ids")
        if min(self.prior_observation_days, self.post_observation_days) < 0:
            raise ValueError("observation days cannot be negative")
        return self


class Outcome(BaseModel):
    model_config = _Frozen
    name: str = "outcome"
    domain: Domain
    concept_ids: tuple[int, ...]
    window: Window

    @model_validator(mode="after")
    def _check(self) -> Outcome:
        if not self.concept_ids:
            raise ValueError("the label needs concept_ids")
        return self


class Feature(BaseModel):
    model_config = _Frozen
    name: str
    kind: FeatureKind
    domain: Domain | None = None
    concept_ids: tuple[int, ...] = ()
    unit_concept_ids: tuple[int, ...] = ()
    window: Window | None = None
    categories: tuple[int, ...] = ()
    drop_first: bool = False
    unseen: UnseenPolicy = UnseenPolicy.REFUSE
    missing: MissingPolicy = MissingPolicy.REFUSE
    fill: float | None = None
    indicator: bool = False

    @model_validator(mode="after")
    def _check(self) -> Feature:
        kind = self.kind
        needs_events = kind not in (FeatureKind.AGE_AT_INDEX, FeatureKind.GENDER)
        if needs_events and (not self.concept_ids or self.window is None):
            raise ValueError(f"a {kind.value} feature needs concept_ids and a window")
        if kind in (FeatureKind.COUNT, FeatureKind.PRESENT) and self.domain is None:
            raise ValueError(f"a {kind.value} feature needs a domain")
        if kind is FeatureKind.GENDER and not self.categories:
            raise ValueError("a gender feature needs its categories (gender concept ids)")
        if self.unit_concept_ids and kind not in (
            FeatureKind.LATEST_MEASUREMENT,
            FeatureKind.LATEST_OBSERVATION,
        ):
            raise ValueError("unit_concept_ids go with latest_measurement and latest_observation")
        return self

    @property
    def event_domain(self) -> Domain | None:
        if self.kind is FeatureKind.LATEST_MEASUREMENT:
            return Domain.MEASUREMENT
        if self.kind is FeatureKind.LATEST_OBSERVATION:
            return Domain.OBSERVATION
        return self.domain

    def column(self) -> ColumnSpec:
        """How the shared table code reads this feature's column."""
        if self.kind is FeatureKind.GENDER:
            return CategoricalColumn(
                categories=tuple(str(c) for c in self.categories),
                drop_first=self.drop_first,
                unseen=self.unseen,
                missing=self.missing,
                indicator=self.indicator,
            )
        return NumericColumn(missing=self.missing, fill=self.fill, indicator=self.indicator)


class OmopDefinition(BaseModel):
    """A cohort, its label and its features (see the module docstring)."""

    model_config = _Frozen
    cohort: Cohort
    label: Outcome
    features: tuple[Feature, ...]

    @model_validator(mode="after")
    def _check(self) -> OmopDefinition:
        if not self.features:
            raise ValueError("a definition needs at least one feature")
        names = [f.name for f in self.features] + [self.label.name, "person_id"]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique and differ from the label's and 'person_id'")
        return self

    def dataset_schema(self) -> DatasetSchema:
        return DatasetSchema(
            id=_ID, label=self.label.name, columns={f.name: f.column() for f in self.features}
        )

    def concepts(self) -> dict[int, str]:
        """Every concept id the definition names, with what names it (for the missing-concept message)."""
        named: dict[int, str] = {}
        for c in self.cohort.visit_concept_ids + self.cohort.condition_concept_ids:
            named.setdefault(c, "the cohort")
        for c in self.label.concept_ids:
            named.setdefault(c, f"the label {self.label.name!r}")
        for f in self.features:
            for c in (*f.concept_ids, *f.unit_concept_ids, *f.categories):
                named.setdefault(c, f"feature {f.name!r}")
        return named

    def tables(self) -> list[str]:
        used = ["person", "observation_period", "concept"]
        if self.cohort.visit_concept_ids:
            used.append("visit_occurrence")
        if self.cohort.condition_concept_ids:
            used.append("condition_occurrence")
        for domain in [self.label.domain, *(f.event_domain for f in self.features)]:
            if domain is not None:
                used.append(_DOMAINS[domain][0])
        return list(dict.fromkeys(used))


_ID = "person_key"  # the id column of the frame (the chosen person id, as text)


def load_definition(path: Path) -> OmopDefinition:
    return load_toml_document(OmopDefinition, path, "OMOP definition")


# --- the compiler -------------------------------------------------------------------------------------------


def _cdm_tables(cdm_schema: str | None, vocabulary_schema: str | None) -> dict[str, sa.Table]:
    """The columns the compiler uses of each CDM table (names and types as in the v5.4 DDL)."""
    md = sa.MetaData()
    i, d, v = sa.Integer, sa.Date, sa.String
    tables = {
        "person": sa.Table(
            "person", md, sa.Column("person_id", i), sa.Column("gender_concept_id", i),
            sa.Column("year_of_birth", i), sa.Column("person_source_value", v), schema=cdm_schema,
        ),
        "observation_period": sa.Table(
            "observation_period", md, sa.Column("person_id", i),
            sa.Column("observation_period_start_date", d), sa.Column("observation_period_end_date", d),
            schema=cdm_schema,
        ),
        "concept": sa.Table(
            "concept", md, sa.Column("concept_id", i), schema=vocabulary_schema or cdm_schema
        ),
    }  # fmt: skip
    for domain, (name, concept, day, row) in _DOMAINS.items():
        columns = [sa.Column("person_id", i), sa.Column(concept, i), sa.Column(day, d), sa.Column(row, i)]
        if domain in (Domain.MEASUREMENT, Domain.OBSERVATION):
            columns += [sa.Column("value_as_number", sa.Numeric), sa.Column("unit_concept_id", i)]
        tables[name] = sa.Table(name, md, *columns, schema=cdm_schema)
    return tables


class _Dates:
    """Date arithmetic in the connection's dialect: PostgreSQL's date + integer, or SQLite's date()."""

    def __init__(self, dialect: str) -> None:
        self.sqlite = dialect == "sqlite"

    def shift(self, day: sa.ColumnElement[Any], days: int) -> sa.ColumnElement[Any]:
        if self.sqlite:
            return sa.func.date(day, sa.literal(f"{days:+d} days"))
        return day + sa.literal(days, sa.Integer)

    def year(self, day: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        if self.sqlite:
            return sa.cast(sa.func.strftime("%Y", day), sa.Integer)
        return sa.cast(sa.extract("year", day), sa.Integer)


def compile_cohort_query(
    definition: OmopDefinition, tables: dict[str, sa.Table], dialect: str
) -> tuple[sa.Select[Any], list[tuple[Feature, str]]]:
    """The query: one row per cohort member with ``person_key``, each feature, the label (and, for each
    latest value whose unit is checked, ``<feature>__bad``: how many values in the window carry another
    unit, and ``<feature>__unit``: one of those units)."""
    dates = _Dates(dialect)
    cohort = definition.cohort
    person, period = tables["person"], tables["observation_period"]
    events: list[sa.Select[Any]] = []
    for domain, ids in (
        (Domain.VISIT, cohort.visit_concept_ids),
        (Domain.CONDITION, cohort.condition_concept_ids),
    ):
        if not ids:
            continue
        name, concept, day, _ = _DOMAINS[domain]
        t = tables[name]
        query = sa.select(t.c.person_id, t.c[day].label("event_date")).where(t.c[concept].in_(ids))
        if cohort.event_from is not None:
            query = query.where(t.c[day] >= cohort.event_from)
        if cohort.event_to is not None:
            query = query.where(t.c[day] <= cohort.event_to)
        events.append(query)
    union = events[0] if len(events) == 1 else sa.union_all(*events)
    qualifying = union.subquery("qualifying")
    first = (
        sa.select(qualifying.c.person_id, sa.func.min(qualifying.c.event_date).label("index_date"))
        .group_by(qualifying.c.person_id)
        .subquery("first_event")
    )
    covered = sa.exists().where(
        period.c.person_id == first.c.person_id,
        period.c.observation_period_start_date
        <= dates.shift(first.c.index_date, -cohort.prior_observation_days),
        period.c.observation_period_end_date >= dates.shift(first.c.index_date, cohort.post_observation_days),
    )
    members = (
        sa.select(
            first.c.person_id,
            first.c.index_date,
            person.c.gender_concept_id,
            person.c.year_of_birth,
            person.c.person_source_value,
        )
        .join(person, person.c.person_id == first.c.person_id)
        .where(covered)
        .cte("cohort")
    )
    key = members.c.person_id if cohort.person_id == "person_id" else members.c.person_source_value
    columns: list[sa.ColumnElement[Any]] = [sa.cast(key, sa.String).label(_ID)]
    joins: list[tuple[sa.Subquery, sa.ColumnElement[bool]]] = []
    unit_checks: list[tuple[Feature, str]] = []
    for n, feature in enumerate(definition.features):
        kind = feature.kind
        if kind is FeatureKind.AGE_AT_INDEX:
            columns.append((dates.year(members.c.index_date) - members.c.year_of_birth).label(feature.name))
            continue
        if kind is FeatureKind.GENDER:
            columns.append(members.c.gender_concept_id.label(feature.name))
            continue
        domain = feature.event_domain
        assert domain is not None
        assert feature.window is not None
        name, concept, day, row = _DOMAINS[domain]
        t = tables[name]
        in_window = sa.and_(
            t.c.person_id == members.c.person_id,
            t.c[concept].in_(feature.concept_ids),
            t.c[day] >= dates.shift(members.c.index_date, feature.window.start),
            t.c[day] <= dates.shift(members.c.index_date, feature.window.end),
        )
        if kind in (FeatureKind.COUNT, FeatureKind.PRESENT):
            counted = (
                sa.select(members.c.person_id, sa.func.count().label("n"))
                .select_from(members.join(t, in_window))
                .group_by(members.c.person_id)
                .subquery(f"f{n}")
            )
            joins.append((counted, counted.c.person_id == members.c.person_id))
            value = sa.func.coalesce(counted.c.n, 0)
            if kind is FeatureKind.PRESENT:
                value = sa.case((value > 0, 1), else_=0)
            columns.append(value.label(feature.name))
            continue
        checks: list[sa.ColumnElement[Any]] = []
        if feature.unit_concept_ids:
            # every value in the window is checked, not only the latest: mixed units are a data problem
            declared = t.c.unit_concept_id.in_(feature.unit_concept_ids)
            checks = [
                sa.func.sum(sa.case((declared, 0), else_=1))
                .over(partition_by=members.c.person_id)
                .label("bad"),
                sa.func.max(sa.case((declared, None), else_=sa.func.coalesce(t.c.unit_concept_id, -1)))
                .over(partition_by=members.c.person_id)
                .label("bad_unit"),
            ]
        ranked = (
            sa.select(
                members.c.person_id,
                t.c.value_as_number,
                *checks,
                sa.func.row_number()
                .over(partition_by=members.c.person_id, order_by=(t.c[day].desc(), t.c[row].desc()))
                .label("rank"),
            )
            .select_from(members.join(t, sa.and_(in_window, t.c.value_as_number.is_not(None))))
            .subquery(f"r{n}")
        )
        latest = sa.select(ranked).where(ranked.c.rank == 1).subquery(f"f{n}")
        joins.append((latest, latest.c.person_id == members.c.person_id))
        columns.append(latest.c.value_as_number.label(feature.name))
        if feature.unit_concept_ids:
            columns.append(latest.c.bad.label(f"{feature.name}__bad"))
            columns.append(latest.c.bad_unit.label(f"{feature.name}__unit"))
            unit_checks.append((feature, feature.name))
    outcome = definition.label
    name, concept, day, _ = _DOMAINS[outcome.domain]
    t = tables[name]
    # a grouped join, not a correlated EXISTS: PostgreSQL would scan the domain table once per person
    outcomes = (
        sa.select(members.c.person_id, sa.func.count().label("n"))
        .select_from(
            members.join(
                t,
                sa.and_(
                    t.c.person_id == members.c.person_id,
                    t.c[concept].in_(outcome.concept_ids),
                    t.c[day] >= dates.shift(members.c.index_date, outcome.window.start),
                    t.c[day] <= dates.shift(members.c.index_date, outcome.window.end),
                ),
            )
        )
        .group_by(members.c.person_id)
        .subquery("outcome")
    )
    joins.append((outcomes, outcomes.c.person_id == members.c.person_id))
    columns.append(sa.case((outcomes.c.n > 0, 1), else_=0).label(outcome.name))
    source: sa.FromClause = members
    for joined, on in joins:
        source = source.outerjoin(joined, on)
    return sa.select(*columns).select_from(source).order_by(key), unit_checks


# --- the connector ------------------------------------------------------------------------------------------


class OmopConnector(TabularConnector):
    """``omop+<sqlalchemy-url>?definition=/abs/cohort.toml&cdm_schema=cdm``: see the module docstring."""

    def read(self, uri: DatasetURI, data_dir: Path) -> tuple[SourceTable, TableOptions]:
        del data_dir
        uri.check_params(TABLE_PARAMS | OMOP_PARAMS | {k for k in uri.params if k.startswith("db.")})
        if "definition" not in uri.params:
            raise ConfigError(f"dataset URI {uri.raw!r}: missing required parameter(s) ['definition']")
        path = Path(uri.params["definition"])
        if not path.is_absolute():
            raise ConfigError(f"dataset URI {uri.raw!r}: definition= must be an absolute path")
        definition = load_definition(path)
        options = table_options(uri)
        db = database_of(uri, "omop")
        cdm_schema = uri.params.get("cdm_schema")
        where = f"the OMOP CDM at {db.shown}" + (f" (schema {cdm_schema})" if cdm_schema else "")
        frame = read_cohort(db, definition, cdm_schema, uri.params.get("vocabulary_schema"), where)
        source = SourceTable(name=path.stem, where=where, frame=frame, schema=definition.dataset_schema())
        if options.id_column not in (None, _ID):
            raise ConfigError(f"dataset URI {uri.raw!r}: an OMOP dataset's id is the cohort's person id")
        return source, TableOptions(
            label=options.label,
            id_column=_ID,
            schema=options.schema,
            test_fraction=options.test_fraction,
            seed=options.seed,
            standardize=options.standardize,
        )


def read_cohort(
    db: Database,
    definition: OmopDefinition,
    cdm_schema: str | None,
    vocabulary_schema: str | None,
    where: str,
) -> pd.DataFrame:
    """Check the tables and concepts, then run the compiled query in a read-only transaction."""
    tables = _cdm_tables(cdm_schema, vocabulary_schema)
    with read_only(db, where) as conn:
        inspector = sa.inspect(conn)
        absent = [
            name for name in definition.tables() if not inspector.has_table(name, schema=tables[name].schema)
        ]
        if absent:
            raise SchemaError(
                f"{where}: the CDM table(s) {absent} do not exist (or this user cannot see them)",
                hint="check cdm_schema= (and vocabulary_schema=) and that the CDM tables are loaded",
            )
        named = definition.concepts()
        concept = tables["concept"]
        found = set(
            conn.scalars(sa.select(concept.c.concept_id).where(concept.c.concept_id.in_(sorted(named))))
        )
        missing = sorted(set(named) - found)
        if missing:
            which = "; ".join(f"{c} ({named[c]})" for c in missing)
            raise SchemaError(
                f"{where}: concept(s) not in the CDM's concept table: {which}",
                hint="load the vocabulary into the concept table, or fix the definition's concept ids",
            )
        query, unit_checks = compile_cohort_query(definition, tables, conn.dialect.name)
        result = conn.execute(query)
        try:
            rows = result.fetchall()
        except (TypeError, ValueError, ArithmeticError) as exc:
            # SQLite keeps any value in any column: text in value_as_number fails the numeric conversion
            raise SchemaError(
                f"{where}: the cohort query returned a value that is not of its column's type "
                f"({type(exc).__name__})",
                hint="check that the CDM's numeric columns (value_as_number) hold numbers only",
            ) from None
        frame = pd.DataFrame.from_records([tuple(r) for r in rows], columns=list(result.keys()))
    for feature, name in unit_checks:
        # a value of unknown unit (NULL, counted as -1) cannot be checked either: refused like a wrong one
        bad = pd.to_numeric(frame[f"{name}__bad"]).fillna(0)
        if (bad > 0).any():
            units = frame.loc[bad > 0, f"{name}__unit"]
            seen = sorted({"none" if int(u) == -1 else str(int(u)) for u in units})
            raise UnitMismatchError(
                f"{where}: feature {name!r}: {int(bad.sum())} value(s) in the window carry unit concept(s) "
                f"{seen}, not the declared {list(feature.unit_concept_ids)}"
            )
        frame = frame.drop(columns=[f"{name}__bad", f"{name}__unit"])
    if frame.empty:
        raise SchemaError(
            f"{where}: the cohort is empty (no person has a qualifying event in an observation period)"
        )
    for feature in definition.features:
        if feature.kind is FeatureKind.AGE_AT_INDEX:
            ages = pd.to_numeric(frame[feature.name], errors="coerce")
            implausible = int(((ages < 0) | (ages > MAX_AGE)).sum())
            if implausible:  # a year of birth after the index date, or centuries before it: a data error
                raise SchemaError(
                    f"{where}: feature {feature.name!r}: {implausible} person(s) with an age at the index "
                    f"date outside 0..{MAX_AGE}",
                    hint="check year_of_birth in the CDM's person table",
                )
    return frame
