"""The libraries that recipes import on first use, loaded ahead by a long-running service.

Heavy optional dependencies are imported lazily (a missing one gives a clear message, and a process that never
needs one never pays for it). A service that will run studies pays them once, at start: otherwise the first
study pays them inside its timed path, e.g. the orchestrator's check of a boosting study's params (XGBoost
and LightGBM pull in scikit-learn and SciPy, ~1.5 s of CPU) or a site's first split of its rows (scikit-learn,
~1.5 s). PyTorch is left out: it is large in memory, and a deployment that runs its recipe pays it once per
process anyway.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

log = logging.getLogger(__name__)

# scikit-learn: the sites' row split and metrics; lightgbm, xgboost (with grpc, its federated proxy): the
# boosting recipes' libraries, which the orchestrator also loads to check a study's params
RECIPE_LIBRARIES: tuple[str, ...] = (
    "sklearn.model_selection",
    "sklearn.metrics",
    "lightgbm",
    "xgboost",
    "grpc",
)


def preload_libraries(modules: tuple[str, ...] = RECIPE_LIBRARIES) -> list[str]:
    """Import each of ``modules`` that is installed; returns those imported. A library that fails to import
    is left for its recipe to report when a study needs it."""
    loaded = []
    for name in modules:
        try:
            if importlib.util.find_spec(name.partition(".")[0]) is None:
                continue
            importlib.import_module(name)
        except Exception as exc:  # a broken optional install: its recipe says so when a study uses it
            log.warning("could not preload %s: %s: %s", name, type(exc).__name__, exc)
            continue
        loaded.append(name)
    return loaded
