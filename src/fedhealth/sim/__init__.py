"""Simulation: runs a whole federation on one machine (orchestrator + N agents as real processes over
loopback) for the demo, the end-to-end tests and the benchmarks."""

from fedhealth.sim._bench import (
    FLAMBY_HEART_DISEASE,
    CollectiveBenchmark,
    MethodResult,
    RoundBenchmark,
    benchmark_collective,
    benchmark_heart_disease,
    benchmark_rounds,
)
from fedhealth.sim._boosting_bench import BoostingBenchmark, BoostingRun, benchmark_boosting
from fedhealth.sim._connector_bench import ExtractionResult, benchmark_connectors
from fedhealth.sim._federation import FederationError, LocalFederation
from fedhealth.sim._membership_bench import (
    MembershipDataset,
    SettingResult,
    benchmark_membership,
    membership_report,
    plot_membership,
)
from fedhealth.sim._privacy_bench import PrivacyResult, benchmark_privacy, plot_privacy

__all__ = [
    "FLAMBY_HEART_DISEASE",
    "BoostingBenchmark",
    "BoostingRun",
    "CollectiveBenchmark",
    "ExtractionResult",
    "FederationError",
    "LocalFederation",
    "MembershipDataset",
    "MethodResult",
    "PrivacyResult",
    "RoundBenchmark",
    "SettingResult",
    "benchmark_boosting",
    "benchmark_collective",
    "benchmark_connectors",
    "benchmark_heart_disease",
    "benchmark_membership",
    "benchmark_privacy",
    "benchmark_rounds",
    "membership_report",
    "plot_membership",
    "plot_privacy",
]
