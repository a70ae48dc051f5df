"""Data: dataset connectors behind one URI interface, benchmark loaders with checksums, and fingerprints.

A site opens its data with :func:`open_dataset` (``builtin://heart-disease/0``, ``file:///data/x.csv?label=y``,
``sql+postgresql://...``, ``omop+postgresql://...``, ``fhir+https://...``)
and gets a :class:`TabularDataset`: train/test arrays, feature names, pseudonymous patient ids and a content
fingerprint. Nothing here trains models or talks to the orchestrator.
"""

from fedhealth.data._breast_cancer import breast_cancer_federation
from fedhealth.data._breastmnist import (
    BREASTMNIST_MD5,
    breastmnist_arrays,
    breastmnist_federation,
    breastmnist_pooled,
)
from fedhealth.data._connector import (
    TABLE_PARAMS,
    Connector,
    DatasetURI,
    TabularConnector,
    redact_uri,
    table_options,
)
from fedhealth.data._dataset import (
    FillRule,
    Imputation,
    Scaling,
    TabularDataset,
    dataset_fingerprint,
    fit_scaling,
    split_indices,
    standardize,
)
from fedhealth.data._dicom import DicomConnector, dicom_grey
from fedhealth.data._download import download_verified, verify_md5
from fedhealth.data._errors import (
    CredentialsRefusedError,
    NonNumericColumnError,
    SchemaError,
    SourceUnavailableError,
    UnitMismatchError,
    UnsafeQueryError,
)
from fedhealth.data._fhir import FhirClient, FhirConnector, FhirMapping, fetch_consents, load_mapping
from fedhealth.data._files import CsvOptions, FileFormat, read_csv_dataset, read_file_table
from fedhealth.data._heart_disease import (
    HEART_DISEASE_BASE_URL,
    HEART_DISEASE_CENTERS,
    HEART_DISEASE_FEATURES,
    HeartDiseaseCenter,
    HeartDiseaseRecord,
    PooledScaling,
    heart_disease_file,
    heart_disease_records,
    load_heart_disease,
)
from fedhealth.data._images import ImageFolderConnector, image_quality, read_picture
from fedhealth.data._omop import OmopConnector, OmopDefinition, compile_cohort_query, load_definition
from fedhealth.data._quality import ColumnQuality, QualityReport, dataset_quality, table_quality
from fedhealth.data._registry import (
    BUILTIN_DATASETS,
    BuiltinConnector,
    ConnectorRegistry,
    CsvConnector,
    DatasetInspection,
    FileConnector,
    inspect_dataset,
    open_dataset,
    register_connector,
)
from fedhealth.data._schema import (
    CategoricalColumn,
    DatasetSchema,
    DateColumn,
    DateUnit,
    MissingPolicy,
    NumericColumn,
    UnseenPolicy,
    load_schema,
    parse_schema,
)
from fedhealth.data._sql import SqlConnector, check_read_only_sql
from fedhealth.data._table import (
    ParsedColumn,
    ParsedTable,
    SourceTable,
    TableOptions,
    build_dataset,
    parse_table,
    read_table,
)

__all__ = [
    "BREASTMNIST_MD5",
    "BUILTIN_DATASETS",
    "HEART_DISEASE_BASE_URL",
    "HEART_DISEASE_CENTERS",
    "HEART_DISEASE_FEATURES",
    "TABLE_PARAMS",
    "BuiltinConnector",
    "CategoricalColumn",
    "ColumnQuality",
    "Connector",
    "ConnectorRegistry",
    "CredentialsRefusedError",
    "CsvConnector",
    "CsvOptions",
    "DatasetInspection",
    "DatasetSchema",
    "DatasetURI",
    "DateColumn",
    "DateUnit",
    "DicomConnector",
    "FhirClient",
    "FhirConnector",
    "FhirMapping",
    "FileConnector",
    "FileFormat",
    "FillRule",
    "HeartDiseaseCenter",
    "HeartDiseaseRecord",
    "ImageFolderConnector",
    "Imputation",
    "MissingPolicy",
    "NonNumericColumnError",
    "NumericColumn",
    "OmopConnector",
    "OmopDefinition",
    "ParsedColumn",
    "ParsedTable",
    "PooledScaling",
    "QualityReport",
    "Scaling",
    "SchemaError",
    "SourceTable",
    "SourceUnavailableError",
    "SqlConnector",
    "TableOptions",
    "TabularConnector",
    "TabularDataset",
    "UnitMismatchError",
    "UnsafeQueryError",
    "UnseenPolicy",
    "breast_cancer_federation",
    "breastmnist_arrays",
    "breastmnist_federation",
    "breastmnist_pooled",
    "build_dataset",
    "check_read_only_sql",
    "compile_cohort_query",
    "dataset_fingerprint",
    "dataset_quality",
    "dicom_grey",
    "download_verified",
    "fetch_consents",
    "fit_scaling",
    "heart_disease_file",
    "heart_disease_records",
    "image_quality",
    "inspect_dataset",
    "load_definition",
    "load_heart_disease",
    "load_mapping",
    "load_schema",
    "open_dataset",
    "parse_schema",
    "parse_table",
    "read_csv_dataset",
    "read_file_table",
    "read_picture",
    "read_table",
    "redact_uri",
    "register_connector",
    "split_indices",
    "standardize",
    "table_options",
    "table_quality",
    "verify_md5",
]
