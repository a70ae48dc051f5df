"""An attacker's audit of the sources by their content (docs/connectors.md, docs/imaging.md): a FHIR server
answering bundles of the wrong shape or repeating resources across pages, an OMOP CDM in SQLite (which keeps
any value in any column) with text, infinities and repeated persons, and DICOM files built to break the
reader.

The guarantee tried: a hostile source is one clear error of the data layer (a ``DatasetError``, which the
agent turns into ``dataset_unavailable`` or ``dataset_invalid``), never a foreign exception (``TypeError``,
``AttributeError``: ``internal_error`` and a traceback at ``site dataset add``), never a silently different
dataset. The FHIR server is an ``httpx.MockTransport`` behind the real client, so no socket is opened.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

import fedhealth.data._fhir as fhir_module
from fedhealth.core import DatasetError
from fedhealth.data import FhirClient, SchemaError, open_dataset
from fedhealth.data._omop import _cdm_tables

N = 20
BASE = "https://fhir.test/r4"

# --- FHIR --------------------------------------------------------------------------------------------------

MAPPING = """
index_date = 2024-01-01

[label]
name = "outcome"
resource = "Condition"
codes = ["http://snomed.info/sct|22298006"]
window = [1, 365]

[[features]]
name = "age"
kind = "age"

[[features]]
name = "chol_tests"
kind = "count"
resource = "Observation"
codes = ["2093-3"]
window = [-365, 0]
"""
CAPABILITY = {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1", "status": "active"}


def _patient(i: int) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": f"p{i:03d}", "birthDate": f"{1940 + i}-05-01"}


def _condition(i: int) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": f"c{i:03d}",
        "subject": {"reference": f"Patient/p{i:03d}"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "22298006"}]},
        "onsetDateTime": "2024-03-01",
    }


def _observation(i: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"o{i:03d}",
        "status": "final",
        "subject": {"reference": f"Patient/p{i:03d}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "2093-3"}]},
        "effectiveDateTime": "2023-06-01",
        "valueQuantity": {"value": 180 + i, "unit": "mg/dL"},
    }


def _bundle(resources: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }
    if next_url is not None:
        out["link"] = [{"relation": "next", "url": next_url}]
    return out


# a resource type -> the body (JSON, or raw bytes) the server answers its search with, given the URL (paging)
Pages = dict[str, Callable[[str], Any]]


def _server(overrides: Pages) -> httpx.MockTransport:
    pages: Pages = {
        "Patient": lambda url: _bundle([_patient(i) for i in range(N)]),
        "Condition": lambda url: _bundle([_condition(i) for i in range(0, N, 2)]),
        "Observation": lambda url: _bundle([_observation(i) for i in range(N)]),
        **overrides,
    }

    def handler(request: httpx.Request) -> httpx.Response:
        kind = request.url.path.rsplit("/", 1)[-1]
        if kind == "metadata":
            return httpx.Response(200, json=CAPABILITY)
        body = pages[kind](str(request.url))
        if isinstance(body, bytes):  # what httpx would not write itself: NaN, Infinity
            return httpx.Response(200, content=body, headers={"Content-Type": "application/fhir+json"})
        return httpx.Response(200, json=body)

    return httpx.MockTransport(handler)


@pytest.fixture
def fhir_dataset(tmp_path, monkeypatch) -> Callable[[Pages], Any]:
    """Open a ``fhir+`` dataset whose client talks to the mock server ``overrides`` describes."""
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(MAPPING)

    def open_with(overrides: Pages) -> Any:
        transport = _server(overrides)
        monkeypatch.setattr(
            fhir_module, "client_for", lambda uri: FhirClient(BASE, retries=0, transport=transport)
        )
        return open_dataset(f"fhir+{BASE}?mapping={mapping}&test_fraction=0.5")

    return open_with


def test_the_mock_fhir_server_reads_as_a_dataset_of_one_observation_each(fhir_dataset):
    """The control of the FHIR tests: every patient a row, each with one cholesterol test."""
    dataset = fhir_dataset({})
    assert dataset.num_train + dataset.num_test == N
    assert dataset.feature_names == ("age", "chol_tests")


@pytest.mark.parametrize(
    "patients",
    [
        {"resourceType": "Bundle", "entry": 5},
        {"resourceType": "Bundle", "entry": {"resource": _patient(1)}},
        {**_bundle([_patient(i) for i in range(N)]), "link": 7},
        {**_bundle([_patient(i) for i in range(N)]), "link": {"relation": "next", "url": "/x"}},
        {
            "resourceType": "Bundle",
            "entry": [{"resource": _patient(i), "search": "match"} for i in range(N)],
        },
    ],
    ids=["entry-a-number", "entry-an-object", "link-a-number", "link-an-object", "search-a-string"],
)
def test_a_bundle_of_the_wrong_shape_is_one_data_error_not_a_crash(fhir_dataset, patients):
    with pytest.raises(DatasetError) as caught:
        fhir_dataset({"Patient": lambda url: patients})
    assert "\n" not in str(caught.value)


def test_a_resource_served_again_on_the_next_page_is_counted_once(fhir_dataset):
    """Offset paging over data that changed between pages repeats resources; a count must not double."""

    def observations(url: str) -> Any:
        every = [_observation(i) for i in range(N)]
        if "page=2" in url:
            return _bundle(every[N // 2 :])  # the second half again
        return _bundle(every, next_url=f"{BASE}/Observation?page=2")

    repeated = fhir_dataset({"Observation": observations})
    control = fhir_dataset({})
    np.testing.assert_array_equal(repeated.X_train, control.X_train)
    np.testing.assert_array_equal(repeated.X_test, control.X_test)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "data:application/json,{}", "ftp://fhir.test/r4/x"])
def test_a_next_link_to_a_file_or_another_scheme_is_refused(fhir_dataset, url):
    with pytest.raises(DatasetError, match="another origin"):
        fhir_dataset({"Patient": lambda u: _bundle([_patient(i) for i in range(N)], next_url=url)})


def test_a_search_past_the_page_limit_is_refused(fhir_dataset, monkeypatch):
    monkeypatch.setattr(fhir_module, "MAX_PAGES", 5)
    served: list[str] = []

    def endless(url: str) -> Any:
        served.append(url)
        return _bundle([_patient(len(served))], next_url=f"{BASE}/Patient?page={len(served) + 1}")

    with pytest.raises(DatasetError, match="past 5 pages"):
        fhir_dataset({"Patient": endless})
    assert len(served) == 5


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e309", '{"a": 1}', "[180]"])
def test_an_observation_value_that_is_not_a_finite_number_is_one_data_error(fhir_dataset, literal):
    """Python's JSON reads NaN, Infinity and 1e309 (as inf): none may become a feature value."""

    def observations(url: str) -> Any:
        text = json.dumps(_bundle([_observation(i) for i in range(N)]))
        return text.replace('"value": 180', f'"value": {literal}', 1).encode()

    with pytest.raises(DatasetError) as caught:
        fhir_dataset({"Observation": observations})
    assert "\n" not in str(caught.value)


def test_a_bundle_nested_past_the_parsers_depth_is_one_data_error(fhir_dataset, monkeypatch):
    deep = '{"resourceType": "Bundle", "entry": ' + "[" * 100_000 + "]" * 100_000 + "}"

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("metadata"):
            return httpx.Response(200, json=CAPABILITY)
        return httpx.Response(200, content=deep.encode())

    monkeypatch.setattr(
        fhir_module,
        "client_for",
        lambda uri: FhirClient(BASE, retries=0, transport=httpx.MockTransport(handler)),
    )
    client = fhir_module.client_for(None)
    with pytest.raises(DatasetError, match="not a FHIR JSON resource"):
        list(client.search("Patient"))


# --- OMOP in SQLite ----------------------------------------------------------------------------------------

DEFINITION = """
[cohort]
visit_concept_ids = [9202]
person_id = "{key}"

[label]
name = "outcome"
domain = "condition"
concept_ids = [317576]
window = [1, 365]

[[features]]
name = "age"
kind = "age_at_index"

[[features]]
name = "sbp"
kind = "latest_measurement"
concept_ids = [3004249]
window = [-365, 0]
missing = "median"
"""


def _cdm(
    path: Path,
    *,
    persons: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
    value_of: Callable[[int], str] = lambda i: str(120 + i),
) -> Path:
    """A CDM in SQLite with the columns the compiler reads: ``N`` persons, each with a visit (the index),
    a blood pressure a month before, and every other one the outcome."""
    engine = sa.create_engine(f"sqlite:///{path}")
    tables = _cdm_tables(None, None)
    tables["person"].metadata.create_all(engine)
    people = [
        {"person_id": i, "gender_concept_id": 8507, "year_of_birth": 1950 + i, "person_source_value": f"S{i}"}
        for i in range(N)
    ]
    persons(people)
    with engine.begin() as conn:
        conn.execute(tables["concept"].insert(), [{"concept_id": c} for c in (9202, 317576, 3004249)])
        conn.execute(tables["person"].insert(), people)
        period = {"observation_period_start_date": dt.date(2000, 1, 1)}
        period["observation_period_end_date"] = dt.date(2030, 1, 1)
        conn.execute(tables["observation_period"].insert(), [{"person_id": i, **period} for i in range(N)])
        index = {"visit_concept_id": 9202, "visit_start_date": dt.date(2020, 1, 1)}
        visits = [{"person_id": i, "visit_occurrence_id": i, **index} for i in range(N)]
        conn.execute(tables["visit_occurrence"].insert(), visits)
        # SQL text: SQLite stores what it is given, text in a numeric column included
        values = ",".join(f"({i}, 3004249, '2019-12-01', {i}, {value_of(i)}, 8876)" for i in range(N))
        conn.exec_driver_sql(
            "INSERT INTO measurement (person_id, measurement_concept_id, measurement_date, measurement_id, "
            f"value_as_number, unit_concept_id) VALUES {values}"
        )
        outcome = {"condition_concept_id": 317576, "condition_start_date": dt.date(2020, 3, 1)}
        outcomes = [{"person_id": i, "condition_occurrence_id": i, **outcome} for i in range(0, N, 2)]
        conn.execute(tables["condition_occurrence"].insert(), outcomes)
    engine.dispose()
    return path


def _omop(tmp_path: Path, cdm: Path, key: str = "person_id") -> Any:
    definition = tmp_path / "cohort.toml"
    definition.write_text(DEFINITION.format(key=key))
    return open_dataset(f"omop+sqlite:///{cdm}?definition={definition}")


def test_a_sqlite_cdm_reads_as_a_dataset(tmp_path):
    """The control of the OMOP tests."""
    dataset = _omop(tmp_path, _cdm(tmp_path / "cdm.sqlite"))
    assert dataset.num_train + dataset.num_test == N


def test_text_in_a_numeric_cdm_column_is_one_schema_error_naming_no_value(tmp_path):
    cdm = _cdm(tmp_path / "cdm.sqlite", value_of=lambda i: "'PAT-VALUE-7'" if i == 3 else str(120 + i))
    with pytest.raises(SchemaError) as caught:
        _omop(tmp_path, cdm)
    assert "PAT-VALUE-7" not in str(caught.value)


@pytest.mark.parametrize("value", ["9e999", "-9e999"], ids=["infinity", "minus-infinity"])
def test_an_infinite_measurement_is_one_schema_error(tmp_path, value):
    cdm = _cdm(tmp_path / "cdm.sqlite", value_of=lambda i: value if i == 0 else str(120 + i))
    with pytest.raises(SchemaError, match="sbp"):
        _omop(tmp_path, cdm)


@pytest.mark.parametrize(
    ("key", "twice"),
    [
        ("person_id", lambda rows: rows.append(dict(rows[3]))),
        ("person_source_value", lambda rows: rows[4].update(person_source_value="S3")),
    ],
    ids=["a-person-row-twice", "two-persons-one-source-value"],
)
def test_a_person_appearing_twice_is_refused_not_two_rows(tmp_path, key, twice):
    """Consent is matched on the id: two rows of one id would put one patient's consent on two rows."""
    with pytest.raises(SchemaError, match="repeats an id"):
        _omop(tmp_path, _cdm(tmp_path / "cdm.sqlite", persons=twice), key=key)


# --- DICOM -------------------------------------------------------------------------------------------------


def _dicom_folder(tmp_path: Path) -> Path:
    from imaging.imaging_files import dicom_square_folder

    return dicom_square_folder(tmp_path / "ct", 6)


def _dicom_uri(folder: Path) -> str:
    return f"dicom://{quote(str(folder))}?size=8"


def _edit(path: Path, **attributes: Any) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


@pytest.mark.parametrize("slope", ["1e308", "-1e308"], ids=["overflows", "overflows-negative"])
def test_a_rescale_slope_that_overflows_is_a_problem_named_by_its_file_not_a_black_image(tmp_path, slope):
    folder = _dicom_folder(tmp_path)
    _edit(folder / "img002.dcm", RescaleSlope=slope)
    with pytest.raises(SchemaError, match=r"img002\.dcm: its rescaled pixel values are not finite"):
        open_dataset(_dicom_uri(folder))


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS:UserWarning")  # pydicom's, on reading "NaN"
@pytest.mark.parametrize("slope", ["NaN", "inf"])
def test_a_rescale_slope_that_is_not_finite_is_a_problem_named_by_its_file(tmp_path, slope):
    """Without the check every value is NaN, min == max, and the file reads as an all-black image."""
    folder = _dicom_folder(tmp_path)
    _edit(folder / "img002.dcm", RescaleSlope=slope)
    with pytest.raises(SchemaError, match=r"img002\.dcm: its rescaled pixel values are not finite"):
        open_dataset(_dicom_uri(folder))


def test_a_dicom_image_of_more_pixels_than_pillow_reads_is_refused_before_decoding(tmp_path, monkeypatch):
    """An RLE file of a few MiB decodes into gigabytes: the bound PNG and JPEG files get (Pillow's
    MAX_IMAGE_PIXELS) holds for DICOM too. Lowered here so that a 16 x 16 image is over it."""
    from PIL import Image

    folder = _dicom_folder(tmp_path)
    assert open_dataset(_dicom_uri(folder)).num_train > 0  # the control, at Pillow's own bound
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15 * 15)
    with pytest.raises(SchemaError, match=r"img000\.dcm: more pixels than are read safely"):
        open_dataset(_dicom_uri(folder))


def test_a_compressed_transfer_syntax_without_a_decoder_is_a_problem_named_by_its_file(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate

    folder = _dicom_folder(tmp_path)
    path = folder / "img002.dcm"
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 100 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless  # no JPEG-LS decoder is installed
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(SchemaError, match=r"img002\.dcm: its pixel data cannot be decoded"):
        open_dataset(_dicom_uri(folder))


def test_a_deflated_dicom_file_is_refused_from_its_file_meta_before_it_is_inflated(tmp_path, monkeypatch):
    """pydicom inflates a deflated file whole, with no bound, before any tag can be checked: a few MiB could
    become gigabytes. The file meta (never deflated) names the transfer syntax; the file is refused there."""
    import zlib

    import pydicom

    folder = _dicom_folder(tmp_path)
    path = folder / "img001.dcm"
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).Rows > 0  # a valid deflated file, which pydicom itself reads
    inflated: list[int] = []
    real = zlib.decompress
    monkeypatch.setattr(zlib, "decompress", lambda *a, **k: inflated.append(1) or real(*a, **k))
    with pytest.raises(SchemaError, match=r"img001\.dcm: a deflated DICOM file"):
        open_dataset(_dicom_uri(folder))
    assert inflated == []  # refused before pydicom inflated anything


@pytest.mark.parametrize("year", [2031, 9999, 1700], ids=["born-after-the-index", "year-9999", "year-1700"])
def test_an_implausible_year_of_birth_is_one_schema_error_naming_no_person(tmp_path, year):
    """An age at the index date below 0 or above 130 is a wrong year_of_birth, not a patient: refused in one
    line that counts the persons and names neither them nor the year."""

    def born(rows: list[dict[str, Any]]) -> None:
        rows[5]["year_of_birth"] = year

    with pytest.raises(
        SchemaError, match=r"feature 'age': 1 person\(s\) with an age at the index date"
    ) as caught:
        _omop(tmp_path, _cdm(tmp_path / "cdm.sqlite", persons=born))
    assert str(year) not in str(caught.value)
    assert "S5" not in str(caught.value)


@pytest.mark.parametrize("born", ["2030-01-01", "1700-05-01"], ids=["after-the-index", "1700"])
def test_an_implausible_fhir_birth_date_is_one_schema_error_naming_no_patient(fhir_dataset, born):
    """As for OMOP: an age at the index date below 0 or above 130 is a wrong birth date, not an age."""

    def patients(url: str) -> Any:
        people = [_patient(i) for i in range(N)]
        people[4]["birthDate"] = born
        return _bundle(people)

    with pytest.raises(SchemaError, match=r"feature 'age': a Patient's birthDate gives an age") as caught:
        fhir_dataset({"Patient": patients})
    assert "p004" not in str(caught.value)
    assert born[:4] not in str(caught.value)
