"""Simulation: runs a whole federation on one machine (orchestrator + N agents as real processes over
loopback) for the demo, the end-to-end tests and the benchmarks."""

from fedhealth.sim._bench import RoundBenchmark, benchmark_rounds
from fedhealth.sim._federation import FederationError, LocalFederation

__all__ = ["FederationError", "LocalFederation", "RoundBenchmark", "benchmark_rounds"]
