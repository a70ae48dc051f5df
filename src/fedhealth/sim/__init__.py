"""Simulation: runs a whole federation on one machine (orchestrator + N agents as real processes)."""

__all__: list[str] = []
