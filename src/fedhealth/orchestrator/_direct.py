"""Routes served ahead of the app's router: the collective calls, hundreds a second per session.

FastAPI's router tries every route of every included router in turn, and for a collective call of a few
bytes that search (with the exit stack FastAPI keeps for dependencies these plain endpoints do not have)
was about a sixth of the orchestrator's time. :class:`DirectRoutes` sits innermost among the app's
middleware, so every check stays where it was: the request gate (body limit before reading, client
certificate, token with the store's revocation check, rate), the version headers, the enrollment-port
filter, an extension's middleware (the metrics' request timer), and FastAPI's outer error and telemetry
layers. Only the route matching is done here, against the few direct routes; the route is then handled as
the router would (``Route.handle``, behind Starlette's exception middleware with the app's handlers), so an
error has the same status and shape.

A direct route must be the route the router would pick for its paths; :func:`install_direct_routes`
refuses a route that another route of the app shadows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fedhealth.core import ConfigError


class DirectRoutes:
    """Middleware: a request for one of ``routes`` goes to it at once; anything else to the app's router.
    ``marker`` is a substring of every direct route's paths, so other requests cost one ``in`` test."""

    def __init__(self, app: ASGIApp, *, routes: Sequence[Route], marker: str) -> None:
        self.app = app
        self.routes = tuple(routes)
        self.marker = marker
        self._handled: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.marker in scope["path"]:
            for route in self.routes:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    if self._handled is None:
                        self._handled = _with_exception_handlers(scope["app"], _handle)
                    scope["route"] = route  # as the router sets it (the metrics' request timer reads it)
                    scope.update(child_scope)
                    await self._handled(scope, receive, send)
                    return
        await self.app(scope, receive, send)


async def _handle(scope: Scope, receive: Receive, send: Send) -> None:
    await scope["route"].handle(scope, receive, send)


def _with_exception_handlers(app: Starlette, inner: ASGIApp) -> ASGIApp:
    """``inner`` behind the app's exception handlers, as its router is (Starlette's ExceptionMiddleware with
    the same handlers; 500 and Exception stay with the outer ServerErrorMiddleware, which the direct routes
    still pass through)."""
    handlers = {k: v for k, v in app.exception_handlers.items() if k not in (500, Exception)}
    return ExceptionMiddleware(inner, handlers=handlers, debug=app.debug)


def install_direct_routes(app: Starlette, routes: Sequence[Route], *, marker: str) -> None:
    """Serve ``routes`` (already routes of ``app``) through :class:`DirectRoutes`, innermost of the app's
    middleware. Raises ``ConfigError`` if a route of the app listed before one of them would take a
    request of its path first (the direct route would then answer what the router gives to another)."""
    for route in routes:
        if marker not in route.path:
            raise ConfigError(f"direct route {route.path} does not contain {marker!r}")
        for method in route.methods or ():
            probe = {"type": "http", "method": method, "path": _sample_path(route), "root_path": ""}
            for other in _flat_routes(app.router.routes):
                if other is route or _same_route(other, route):
                    break
                if other.matches(probe)[0] is Match.FULL:
                    raise ConfigError(f"{route.path} ({method}) is shadowed by {other!r}")
    app.user_middleware.append(Middleware(DirectRoutes, routes=routes, marker=marker))


def _sample_path(route: Route) -> str:
    """The route's path with a sample value in each parameter: ``/t/{task_id}/{index:int}`` -> ``/t/x/0``."""
    path = route.path
    for name, convertor in route.param_convertors.items():
        sample = "0" if convertor.regex == "[0-9]+" else "x"
        start = path.index("{" + name)
        path = path[:start] + sample + path[path.index("}", start) + 1 :]
    return path


def _flat_routes(routes: Sequence[Any]) -> list[Any]:
    """The app's routes in the order the router tries them (an included router's own routes in place:
    FastAPI keeps the router it was given as ``original_router``)."""
    flat: list[Any] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            flat.extend(_flat_routes(inner.routes))
        else:
            flat.append(route)
    return flat


def _same_route(a: Any, b: Route) -> bool:
    return isinstance(a, Route) and a.path == b.path and a.endpoint is b.endpoint and a.methods == b.methods
