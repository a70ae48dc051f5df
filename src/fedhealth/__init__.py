"""fedhealth: federated learning for hospitals.

Site agents train next to each hospital's data; an orchestrator coordinates rounds; updates are combined by
secure aggregation, bounded by differential privacy and recorded in a verifiable audit trail. See
``docs/architecture.md`` for the package map and the direction of imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedhealth.learning import ModelPackage

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def load_model(path: Path | str) -> ModelPackage:
    """Read and verify a model package (``fedhealth model export STUDY --out DIR``): an object whose
    ``predict_proba(DataFrame)`` applies the study's preprocessing and model (docs/model-packages.md)."""
    from fedhealth.learning import load_package  # imported on use: `import fedhealth` stays light

    return load_package(path)
