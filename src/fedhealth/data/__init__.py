"""Data: dataset connectors, benchmark loaders with checksums, and dataset fingerprints."""

__all__: list[str] = []
