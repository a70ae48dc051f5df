"""The orchestrator's side of versions on the wire (see :mod:`fedhealth.protocol._versions`): every answer
states its versions in headers, and a login whose client shares no protocol with it is refused with 426 and
one sentence; an agent's versions are recorded at login, for the operator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import fedhealth
from fedhealth.orchestrator._store import Store
from fedhealth.protocol import PeerVersion, negotiate, ours, version_headers

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]
_HEADERS = [
    (k.lower().encode("latin-1"), v.encode("latin-1"))
    for k, v in version_headers(fedhealth.__version__).items()
]
# a client that states no version is a release from before version headers: protocol 1
UNSTATED = PeerVersion(protocol=1, min_protocol=1, software=None)


class VersionHeadersMiddleware:
    """Adds ``X-Fedhealth-Protocol``, ``-Protocol-Min`` and ``X-Fedhealth-Version`` to every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_versions(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_versions)


def check_client(headers: Mapping[str, str], *, client_name: str, where: str) -> PeerVersion:
    """The client's versions; raises ``ProtocolMismatch`` (answered 426) if it shares no protocol with us."""
    peer = PeerVersion.from_headers(headers) or UNSTATED
    negotiate(ours(fedhealth.__version__), peer, client_name=client_name, where=where)
    return peer


def record_agent(store: Store, site: str, peer: PeerVersion) -> None:
    """What the operator sees in ``fedhealth site list``: the versions the site's agent stated at login."""
    store.set_versions(site, software_version=peer.software or "unknown", protocol_version=peer.protocol)
