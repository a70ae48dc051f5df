from pathlib import Path

import numpy as np
import pytest

from fedhealth.core import ConfigError
from fedhealth.data import (
    BuiltinConnector,
    ConnectorRegistry,
    DatasetURI,
    TabularDataset,
    breast_cancer_federation,
    load_heart_disease,
    open_dataset,
)


def test_breast_cancer_uri_opens_the_same_site_as_the_function():
    d = open_dataset("builtin://breast-cancer/2?sites=5&seed=7")
    assert d.fingerprint == breast_cancer_federation(5, 7)[2].fingerprint
    assert (
        open_dataset("builtin://breast-cancer/0").fingerprint == breast_cancer_federation(4, 0)[0].fingerprint
    )


def test_heart_disease_uris_open_the_loader_datasets(heart_data_dir):
    assert (
        open_dataset("builtin://heart-disease/3", heart_data_dir).fingerprint
        == load_heart_disease(3, heart_data_dir, download=False).fingerprint
    )
    pooled = open_dataset("builtin://heart-disease/pooled?scaling=global", heart_data_dir)
    assert pooled.num_train == 486


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        (
            "s3://bucket/x.csv",
            r"no connector for scheme 's3'.*known schemes: "
            r"\['builtin', 'dicom', 'fhir', 'file', 'images', 'omop', 'sql'\]",
        ),
        ("heart-disease/0", "has no scheme"),
        (
            "builtin://mnist/0",
            r"unknown builtin dataset 'mnist'.*\['breast-cancer', 'breastmnist', 'heart-disease'\]",
        ),
        ("builtin://heart-disease/5", "must be 0, 1, 2, 3 or pooled"),
        ("builtin://heart-disease/0?seed=1", r"unknown parameter\(s\) \['seed'\]"),
        ("builtin://heart-disease/pooled?scaling=weird", "is not one of"),
        ("builtin://breast-cancer/4?sites=4", "site 4 does not exist"),
        ("builtin://breast-cancer/x", "must be a site index"),
        ("builtin://breast-cancer/0?sites=1", "must be at least 2"),
        ("builtin://breast-cancer/0?sites=four", "is not an integer"),
        ("builtin://breast-cancer/0#frag", "fragments"),
    ],
)
def test_unknown_or_malformed_uris_are_config_errors(uri, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        open_dataset(uri, tmp_path)


class _ConstantConnector:
    """A stand-in for a future connector (SQL, FHIR...)."""

    def __init__(self) -> None:
        self.seen: list[tuple[DatasetURI, Path]] = []

    def open(self, uri: DatasetURI, data_dir: Path) -> TabularDataset:
        self.seen.append((uri, data_dir))
        return TabularDataset(
            name=uri.path.strip("/"),
            X_train=np.zeros((2, 1)),
            y_train=np.array([0, 1]),
            X_test=np.zeros((0, 1)),
            y_test=np.zeros(0, dtype=np.int64),
            feature_names=("x",),
        )


def test_a_new_connector_plugs_in_under_its_scheme(tmp_path):
    registry = ConnectorRegistry()
    connector = _ConstantConnector()
    registry.register("omop", connector)
    d = registry.open("omop://warehouse/cohort_42?version=5.4", tmp_path)
    assert d.name == "cohort_42"
    uri, folder = connector.seen[0]
    assert (uri.scheme, uri.host, dict(uri.params)) == ("omop", "warehouse", {"version": "5.4"})
    assert folder == tmp_path
    with pytest.raises(ConfigError, match="already registered"):
        registry.register("OMOP", _ConstantConnector())
    registry.register("omop", _ConstantConnector(), replace=True)


def test_builtin_names_cannot_be_registered_twice():
    builtin = BuiltinConnector()
    builtin.add("toy", lambda uri, part, folder: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError, match="already registered"):
        builtin.add("toy", lambda uri, part, folder: None)  # type: ignore[arg-type,return-value]
