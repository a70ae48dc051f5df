"""Dashboard: read-only views of training, drift, consent and budget."""

__all__: list[str] = []
