"""fedhealth: federated learning for hospitals.

Site agents train next to each hospital's data; an orchestrator coordinates rounds; updates are combined by
secure aggregation, bounded by differential privacy and recorded in a verifiable audit trail. See
``docs/architecture.md`` for the package map and the direction of imports.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

# onnxruntime (1.29 and later) sends telemetry to Microsoft from Linux too, keeps a device identifier and an
# event cache in ~/.cache/Microsoft, and reads this switch once, when it is imported: set before any fedhealth
# code can import it (model packages check their ONNX file with it), and on purpose not left to the
# environment, since nothing is to leave a site unasked (docs/security.md, "Nothing phones home").
if "onnxruntime" in sys.modules and os.environ.get("ORT_DISABLE_TELEMETRY") != "1":
    warnings.warn(
        "onnxruntime was imported before fedhealth with its telemetry on: this process may send telemetry "
        "to Microsoft; import fedhealth first or set ORT_DISABLE_TELEMETRY=1 (docs/security.md)",
        RuntimeWarning,
        stacklevel=2,
    )
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

if TYPE_CHECKING:
    from fedhealth.learning import ModelPackage

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def load_model(path: Path | str) -> ModelPackage:
    """Read and verify a model package (``fedhealth model export STUDY --out DIR``): an object whose
    ``predict_proba(DataFrame)`` applies the study's preprocessing and model (docs/model-packages.md)."""
    from fedhealth.learning import load_package  # imported on use: `import fedhealth` stays light

    return load_package(path)
