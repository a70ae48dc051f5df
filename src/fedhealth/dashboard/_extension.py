"""The dashboard as an orchestrator :class:`~fedhealth.orchestrator.Extension`: it adds the ``/ui`` routes and
watches finished statistics studies for feature drift (:mod:`fedhealth.dashboard._drift_watch`). The serving
command (``fedhealth orchestrator serve``) adds it to the default extensions; the orchestrator package never
imports the dashboard (the layer contract)."""

from __future__ import annotations

from fastapi import APIRouter

from fedhealth.dashboard._assets import check_assets
from fedhealth.dashboard._drift import DriftPolicy, DriftThresholds
from fedhealth.dashboard._drift_watch import DriftObserver
from fedhealth.dashboard._routes import dashboard_router
from fedhealth.orchestrator import ExtensionContext, Registration


class DashboardExtension:
    """The governance dashboard under ``/ui`` on the orchestrator's own port."""

    def __init__(self, drift: DriftThresholds | DriftPolicy | None = None) -> None:
        check_assets()  # a missing asset package fails the start, not a page in a browser
        if drift is None:
            drift = DriftPolicy()
        self.drift = drift if isinstance(drift, DriftPolicy) else DriftPolicy(default=drift)

    def start(self, context: ExtensionContext) -> Registration:
        # the pages read the running service (request.app.state.services); the drift observer writes the
        # comparisons into the orchestrator's audit log, where the drift page reads them
        return Registration(observer=DriftObserver(context.store, context.settings, self.drift))

    def routers(self) -> list[APIRouter]:
        return [dashboard_router(drift=self.drift)]
