"""Dashboard: the orchestrator's governance views in a browser (``/ui``: federation, studies, privacy budgets,
models, audit), with sign-in by operator credential and roles, and Prometheus metrics on a separate port.

Everything is read through the orchestrator's store and report functions; every asset is served from
installed packages (``pip install 'fedhealth[dashboard]'``).
"""

from fedhealth.dashboard._assets import MissingAsset
from fedhealth.dashboard._bench import DashboardBenchmark, PageTime, benchmark_dashboard
from fedhealth.dashboard._drift import DriftInputError, DriftPolicy, DriftThresholds
from fedhealth.dashboard._extension import DashboardExtension
from fedhealth.dashboard._metrics import DEFAULT_METRICS_HOST, FederationMetrics, MetricsExtension
from fedhealth.dashboard._onboarding import PACK_FILES, onboarding_pack
from fedhealth.dashboard._onboarding import write_pack as write_onboarding_pack
from fedhealth.dashboard._routes import dashboard_router
from fedhealth.dashboard._site import serve_site_dashboard, site_dashboard_app, site_dashboard_link

__all__ = [
    "DEFAULT_METRICS_HOST",
    "PACK_FILES",
    "DashboardBenchmark",
    "DashboardExtension",
    "DriftInputError",
    "DriftPolicy",
    "DriftThresholds",
    "FederationMetrics",
    "MetricsExtension",
    "MissingAsset",
    "PageTime",
    "benchmark_dashboard",
    "dashboard_router",
    "onboarding_pack",
    "serve_site_dashboard",
    "site_dashboard_app",
    "site_dashboard_link",
    "write_onboarding_pack",
]
