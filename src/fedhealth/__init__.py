"""fedhealth: federated learning for hospitals.

Site agents train next to each hospital's data; an orchestrator coordinates rounds; updates are combined by
secure aggregation, bounded by differential privacy and recorded in a verifiable audit trail. See
``docs/architecture.md`` for the package map and the direction of imports.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
