"""The dashboard's browser assets, every one served from an installed package (no CDN): htmx from
``django-js-lib-htmx`` (the JavaScript file only; Django is not needed), ``plotly.min.js`` from ``plotly``,
and the dashboard's own stylesheet and script from this package."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from fedhealth.core import FedHealthError


class MissingAsset(FedHealthError):
    """A browser asset's package is not installed (``pip install 'fedhealth[dashboard]'``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Asset:
    name: str
    media_type: str
    body: bytes


def _package_file(package: str, *parts: str) -> Path:
    # Located, not imported: importing plotly would cost the orchestrator's start a tenth of a second.
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    if not locations:
        raise MissingAsset(f"the dashboard needs the {package!r} package: pip install 'fedhealth[dashboard]'")
    found = Path(locations[0]).joinpath(*parts)
    if not found.is_file():
        raise MissingAsset(f"{'/'.join(parts)} is missing from the installed {package!r} package")
    return found


# name -> (package, path inside it, media type)
_SOURCES = {
    "htmx.min.js": ("js_lib_htmx", ("static", "htmx", "htmx.min.js"), "text/javascript"),
    "plotly.min.js": ("plotly", ("package_data", "plotly.min.js"), "text/javascript"),
    "dashboard.css": ("fedhealth.dashboard", ("static", "dashboard.css"), "text/css"),
    "dashboard.js": ("fedhealth.dashboard", ("static", "dashboard.js"), "text/javascript"),
}
ASSET_NAMES = frozenset(_SOURCES)


@functools.cache
def asset(name: str) -> Asset:
    """The named asset's bytes (read once per process); raises :class:`MissingAsset`."""
    package, parts, media_type = _SOURCES[name]
    return Asset(name=name, media_type=media_type, body=_package_file(package, *parts).read_bytes())


def check_assets() -> None:
    """Raise :class:`MissingAsset` unless every asset can be served (called when the dashboard mounts)."""
    for name in sorted(ASSET_NAMES):
        package, parts, _ = _SOURCES[name]
        _package_file(package, *parts)
