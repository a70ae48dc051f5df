"""The dashboard as an orchestrator :class:`~fedhealth.orchestrator.Extension`: it adds the ``/ui`` routes and
watches no study itself. The serving command (``fedhealth orchestrator serve``) adds it to the default
extensions; the orchestrator package never imports the dashboard (the layer contract)."""

from __future__ import annotations

from fastapi import APIRouter

from fedhealth.dashboard._assets import check_assets
from fedhealth.dashboard._routes import dashboard_router
from fedhealth.orchestrator import ExtensionContext, Registration


class DashboardExtension:
    """The governance dashboard under ``/ui`` on the orchestrator's own port."""

    def __init__(self) -> None:
        check_assets()  # a missing asset package fails the start, not a page in a browser

    def start(self, context: ExtensionContext) -> Registration:
        del context  # the pages read the running service (request.app.state.services); no state of its own
        return Registration()

    def routers(self) -> list[APIRouter]:
        return [dashboard_router()]
