"""Client: a typed Python client of the orchestrator's operator API (used by the CLI, the demo, tests and
notebooks; see docs/python-api.md).

It trusts only the federation's CA, trades the user's API key for short-lived operator tokens and renews
them as they expire. Study spec files (:func:`load_spec`, :func:`spec_template`) and downloaded models
(:func:`load_model`, :func:`predict_csv`) are read here too, so a notebook needs nothing else.
"""

from fedhealth.client._model import (
    LogisticModel,
    ModelFileError,
    Predictions,
    Scaling,
    export_package,
    load_model,
    predict_csv,
    predict_csv_with_package,
)
from fedhealth.client._operator import (
    ClientError,
    OperatorClient,
    load_signing_key,
    signing_key_path,
)
from fedhealth.client._spec_file import SpecFileError, load_spec, spec_template, study_spec_hash
from fedhealth.client._words import field_errors, rule_in_words

__all__ = [
    "ClientError",
    "LogisticModel",
    "ModelFileError",
    "OperatorClient",
    "Predictions",
    "Scaling",
    "SpecFileError",
    "export_package",
    "field_errors",
    "load_model",
    "load_signing_key",
    "load_spec",
    "predict_csv",
    "predict_csv_with_package",
    "rule_in_words",
    "signing_key_path",
    "spec_template",
    "study_spec_hash",
]
