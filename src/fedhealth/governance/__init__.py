"""Governance: the hash-chained signed audit log, consent registry and filter, study approval bound to a
spec hash, site policy, provenance and model cards.
"""

__all__: list[str] = []
