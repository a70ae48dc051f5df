"""A FHIR mapping and an OMOP definition are read by one helper: each failure (no file, not TOML, a bad key,
a rule over the whole document) is one ConfigError worded the same for both, naming the file."""

from __future__ import annotations

import pytest
from heart_sources import FHIR_MAPPING, OMOP_DEFINITION

from fedhealth.core import ConfigError
from fedhealth.data._fhir import load_mapping
from fedhealth.data._omop import load_definition

LOADERS = [
    pytest.param(load_mapping, FHIR_MAPPING, "FHIR mapping", "patient_id", id="fhir"),
    pytest.param(load_definition, OMOP_DEFINITION, "OMOP definition", "person_id", id="omop"),
]


@pytest.mark.parametrize(("load", "good", "what", "id_column"), LOADERS)
def test_each_failure_of_a_connector_document_is_one_config_error_naming_the_file(
    tmp_path, load, good, what, id_column
):
    path = tmp_path / "doc.toml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{what} {path} does not exist"
    assert info.value.__cause__ is None

    path.write_text("x = [")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{what} {path} cannot be read as TOML (Invalid value (at end of document))"

    path.write_text(good.replace("window = [1, 365]", "window = [1]"))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == (
        f"{what} {path}: label.window: a window is [first day, last day] relative to the index date"
    )

    path.write_text(good.replace('name = "chol"', 'name = "age"'))  # a rule of the whole document: no key
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == (
        f"{path}: feature names must be unique and differ from the label's and {id_column!r}"
    )

    path.write_text(good)
    assert load(path).features
