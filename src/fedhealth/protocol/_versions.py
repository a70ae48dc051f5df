"""Versions on the wire: which protocol each side speaks, and what happens when they differ.

Every request and answer carries ``X-Fedhealth-Protocol`` (the newest protocol the sender speaks),
``X-Fedhealth-Protocol-Min`` (the oldest) and ``X-Fedhealth-Version`` (its fedhealth release). At login the
orchestrator records an agent's versions (the operator sees them in ``fedhealth site list``) and refuses, with
426 and one sentence, an agent whose range does not meet its own; the agent refuses an orchestrator the same
way. Two peers whose ranges overlap speak the newer protocol both know (:func:`negotiate`).

Messages forbid unknown fields, so a typo is a 422, never a silently ignored setting. A field that a newer
protocol added is not a typo, though: it is negotiated.

- A sender leaves out the fields its peer's protocol does not have yet (:func:`for_peer`, from
  :data:`FIELDS_SINCE`, which names each field added after protocol 1 and the protocol that added it).
- A reader whose peer speaks a newer protocol than its own drops the fields it does not know before
  validating (:func:`from_peer`); from a peer of the same protocol an unknown field is still an error.

Spec fields are never dropped: a study spec is approved by the hash of all of it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import UnionType
from typing import Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel

from fedhealth.core import ProtocolError
from fedhealth.protocol._models import PROTOCOL_VERSION, StudySpec

MIN_PROTOCOL_VERSION = 1  # the oldest protocol this release still speaks
PROTOCOL_HEADER = "X-Fedhealth-Protocol"
MIN_PROTOCOL_HEADER = "X-Fedhealth-Protocol-Min"
SOFTWARE_HEADER = "X-Fedhealth-Version"
# model name -> field -> the protocol version that added it (fields of protocol 1 are not listed)
FIELDS_SINCE: dict[str, dict[str, int]] = {}

M = TypeVar("M", bound=BaseModel)


class ProtocolMismatch(ProtocolError):
    """The two sides share no protocol version; the message says which side to upgrade."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerVersion:
    """What a peer stated in its headers."""

    protocol: int
    min_protocol: int
    software: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> PeerVersion | None:
        """None when the peer stated no protocol (a release from before version headers: protocol 1)."""
        lowered = {k.lower(): v for k, v in headers.items()}
        text = lowered.get(PROTOCOL_HEADER.lower())
        if text is None:
            return None
        try:
            protocol = int(text)
            min_protocol = int(lowered.get(MIN_PROTOCOL_HEADER.lower(), text))
        except ValueError:
            raise ProtocolMismatch(
                f"the peer's {PROTOCOL_HEADER} header is not a number: {text[:20]!r}"
            ) from None
        if not (0 <= min_protocol <= _MAX_STATED and 0 <= protocol <= _MAX_STATED):
            raise ProtocolMismatch(
                f"the peer's {PROTOCOL_HEADER} or {MIN_PROTOCOL_HEADER} header is out of range: {text[:20]!r}"
            )
        software = (lowered.get(SOFTWARE_HEADER.lower()) or "")[:40]
        return cls(
            protocol=protocol,
            min_protocol=min(min_protocol, protocol),
            # what `fedhealth site list` prints: a release, never a tab or an escape sequence (else unknown)
            software=software if _RELEASE.fullmatch(software) else None,
        )


_MAX_STATED = 1_000_000  # a protocol version a peer may state (stored in a 32-bit column)
_RELEASE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]{0,39}")  # as a readiness report's software_version


def version_headers(
    software: str, *, protocol: int | None = None, min_protocol: int | None = None
) -> dict[str, str]:
    """The headers that state this side's versions."""
    return {
        PROTOCOL_HEADER: str(PROTOCOL_VERSION if protocol is None else protocol),
        MIN_PROTOCOL_HEADER: str(MIN_PROTOCOL_VERSION if min_protocol is None else min_protocol),
        SOFTWARE_HEADER: software,
    }


def ours(software: str) -> PeerVersion:
    """This release's versions."""
    return PeerVersion(protocol=PROTOCOL_VERSION, min_protocol=MIN_PROTOCOL_VERSION, software=software)


def negotiate(
    orchestrator: PeerVersion, client: PeerVersion, *, client_name: str = "agent", where: str
) -> int:
    """The protocol an orchestrator and a client (an agent, a command) speak: the newest both know. Raise
    :class:`ProtocolMismatch` with one sentence, the same on both sides, naming both versions and what to
    upgrade, when their ranges do not meet. ``where`` is where the client runs ("at this site")."""
    agreed = min(orchestrator.protocol, client.protocol)
    if agreed >= max(orchestrator.min_protocol, client.min_protocol):
        return agreed
    if client.protocol < orchestrator.min_protocol:
        hint = f"upgrade fedhealth {where}"
    else:
        hint = f"upgrade the orchestrator, or run an older fedhealth {where}"
    raise ProtocolMismatch(
        f"orchestrator speaks protocol {_range(orchestrator)}, this {client_name} {_range(client)}: {hint}"
    )


def _range(peer: PeerVersion) -> str:
    return str(peer.protocol) + (
        f" (oldest {peer.min_protocol})" if peer.min_protocol < peer.protocol else ""
    )


def for_peer(message: BaseModel, peer_protocol: int) -> dict[str, Any]:
    """``message`` as JSON data for a peer speaking ``peer_protocol``: the fields added after it left out."""
    stripped: dict[str, Any] = _strip(type(message), message.model_dump(mode="json"), peer_protocol)
    return stripped


def _strip(model: type[BaseModel], data: Any, peer_protocol: int) -> Any:
    if not isinstance(data, dict) or model in _SPEC_MODELS:
        return data
    since = FIELDS_SINCE.get(model.__name__, {})
    out = {}
    for name, value in data.items():
        if since.get(name, 1) > peer_protocol:
            continue
        field = model.model_fields.get(name)
        out[name] = (
            _walk(field.annotation, value, lambda m, v: _strip(m, v, peer_protocol)) if field else value
        )
    return out


def from_peer(model: type[M], data: bytes | str | Mapping[str, Any], peer_protocol: int | None) -> M:
    """Validate a peer's message (JSON text, or data parsed from it). From a peer that speaks a newer
    protocol, fields this release does not know are dropped first (they are what that protocol added);
    otherwise an unknown field is an error."""
    strict = peer_protocol is None or peer_protocol <= PROTOCOL_VERSION
    if isinstance(data, bytes | str):
        if strict:
            return model.model_validate_json(data)
        data = json.loads(data)
    return model.model_validate(data if strict else _known(model, data))


def _known(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict) or model in _SPEC_MODELS:  # whole: a field we lack refuses the spec
        return data
    out = {}
    for name, value in data.items():
        field = model.model_fields.get(name)
        if field is None:
            continue
        out[name] = _walk(field.annotation, value, _known)
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _parts(model: type[BaseModel]) -> frozenset[type[BaseModel]]:
    """``model`` and every model its fields hold, however deep."""
    found = {model}
    pending = [model]
    while pending:
        for field in pending.pop().model_fields.values():
            for part in _models_in(field.annotation):
                if part not in found:
                    found.add(part)
                    pending.append(part)
    return frozenset(found)


# A study spec and its parts (a task's copy of the recipe too) are never cut, reading or sending: a spec is
# approved by the hash of all of it, so one with a field this side lacks is refused, never run shorter.
_SPEC_MODELS = _parts(StudySpec)


def _walk(annotation: Any, value: Any, visit: Any) -> Any:
    """Apply ``visit(model, value)`` to the values of ``annotation`` that are models, through lists, dicts
    and unions."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return visit(annotation, value)
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (list, tuple) and isinstance(value, list) and args:
        return [_walk(args[0], v, visit) for v in value]
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return {k: _walk(args[1], v, visit) for k, v in value.items()}
    if origin in (Union, UnionType) and isinstance(value, dict):
        for arg in args:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return visit(arg, value)
    if origin is not None and args and hasattr(annotation, "__metadata__"):  # Annotated[T, ...]
        return _walk(args[0], value, visit)
    return value
