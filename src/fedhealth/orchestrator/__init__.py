"""Orchestrator: the coordinating service (FastAPI + SQLAlchemy + a content-addressed blob store)."""

__all__: list[str] = []
