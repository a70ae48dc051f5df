"""Data: dataset connectors behind one URI interface, benchmark loaders with checksums, and fingerprints.

A site opens its data with :func:`open_dataset` (``builtin://heart-disease/0``, ``file:///data/x.csv?label=y``)
and gets a :class:`TabularDataset`: train/test arrays, feature names, pseudonymous patient ids and a content
fingerprint. Nothing here trains models or talks to the orchestrator.
"""

from fedhealth.data._breast_cancer import breast_cancer_federation
from fedhealth.data._csv import CsvOptions, read_csv_dataset
from fedhealth.data._dataset import (
    Scaling,
    TabularDataset,
    dataset_fingerprint,
    fit_scaling,
    split_indices,
    standardize,
)
from fedhealth.data._download import download_verified, verify_md5
from fedhealth.data._errors import NonNumericColumnError, SchemaError
from fedhealth.data._heart_disease import (
    HEART_DISEASE_BASE_URL,
    HEART_DISEASE_CENTERS,
    HEART_DISEASE_FEATURES,
    HeartDiseaseCenter,
    PooledScaling,
    heart_disease_file,
    load_heart_disease,
)
from fedhealth.data._registry import (
    BUILTIN_DATASETS,
    BuiltinConnector,
    Connector,
    ConnectorRegistry,
    CsvConnector,
    DatasetURI,
    open_dataset,
    register_connector,
)

__all__ = [
    "BUILTIN_DATASETS",
    "HEART_DISEASE_BASE_URL",
    "HEART_DISEASE_CENTERS",
    "HEART_DISEASE_FEATURES",
    "BuiltinConnector",
    "Connector",
    "ConnectorRegistry",
    "CsvConnector",
    "CsvOptions",
    "DatasetURI",
    "HeartDiseaseCenter",
    "NonNumericColumnError",
    "PooledScaling",
    "Scaling",
    "SchemaError",
    "TabularDataset",
    "breast_cancer_federation",
    "dataset_fingerprint",
    "download_verified",
    "fit_scaling",
    "heart_disease_file",
    "load_heart_disease",
    "open_dataset",
    "read_csv_dataset",
    "register_connector",
    "split_indices",
    "standardize",
    "verify_md5",
]
