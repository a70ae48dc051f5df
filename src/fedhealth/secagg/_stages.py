"""Stages, actions and the explicit transition tables of the SecAgg+ client and server.

A stage names what the party is waiting to do next: a client in ``SHARE_KEYS`` expects ``share_keys``; a
server in ``SHARE_KEYS`` is collecting encrypted shares. Any (stage, action) pair outside a table raises
:class:`SecAggProtocolError` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType
from typing import TypeVar

from fedhealth.secagg._errors import SecAggProtocolError


class Stage(Enum):
    """The stages of one round: advertise keys -> share keys -> masked input -> consistency -> unmask."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"
    FAILED = "failed"


ACTIVE_STAGES = (
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY,
    Stage.UNMASK,
)


class ClientAction(Enum):
    """What a driver can ask of a client."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    ABORT = "abort"


class ServerAction(Enum):
    """What a driver can ask of the server."""

    RECEIVE_ADVERTISEMENT = "receive_advertisement"
    RECEIVE_SHARES = "receive_shares"
    RECEIVE_MASKED_INPUT = "receive_masked_input"
    RECEIVE_CONSISTENCY = "receive_consistency"
    RECEIVE_UNMASK_RESPONSE = "receive_unmask_response"
    CLOSE_STAGE = "close_stage"
    READ_RESULT = "read_result"
    ABORT = "abort"


CLIENT_TRANSITIONS: Mapping[tuple[Stage, ClientAction], Stage] = MappingProxyType(
    {
        (Stage.ADVERTISE_KEYS, ClientAction.ADVERTISE_KEYS): Stage.SHARE_KEYS,
        (Stage.SHARE_KEYS, ClientAction.SHARE_KEYS): Stage.MASKED_INPUT,
        (Stage.MASKED_INPUT, ClientAction.MASKED_INPUT): Stage.CONSISTENCY,
        (Stage.CONSISTENCY, ClientAction.CONSISTENCY): Stage.UNMASK,
        (Stage.UNMASK, ClientAction.UNMASK): Stage.DONE,
        **{(stage, ClientAction.ABORT): Stage.FAILED for stage in ACTIVE_STAGES},
    }
)

SERVER_TRANSITIONS: Mapping[tuple[Stage, ServerAction], Stage] = MappingProxyType(
    {
        (Stage.ADVERTISE_KEYS, ServerAction.RECEIVE_ADVERTISEMENT): Stage.ADVERTISE_KEYS,
        (Stage.ADVERTISE_KEYS, ServerAction.CLOSE_STAGE): Stage.SHARE_KEYS,
        (Stage.SHARE_KEYS, ServerAction.RECEIVE_SHARES): Stage.SHARE_KEYS,
        (Stage.SHARE_KEYS, ServerAction.CLOSE_STAGE): Stage.MASKED_INPUT,
        (Stage.MASKED_INPUT, ServerAction.RECEIVE_MASKED_INPUT): Stage.MASKED_INPUT,
        (Stage.MASKED_INPUT, ServerAction.CLOSE_STAGE): Stage.CONSISTENCY,
        (Stage.CONSISTENCY, ServerAction.RECEIVE_CONSISTENCY): Stage.CONSISTENCY,
        (Stage.CONSISTENCY, ServerAction.CLOSE_STAGE): Stage.UNMASK,
        (Stage.UNMASK, ServerAction.RECEIVE_UNMASK_RESPONSE): Stage.UNMASK,
        (Stage.UNMASK, ServerAction.CLOSE_STAGE): Stage.DONE,
        (Stage.DONE, ServerAction.READ_RESULT): Stage.DONE,
        **{(stage, ServerAction.ABORT): Stage.FAILED for stage in ACTIVE_STAGES},
    }
)

_A = TypeVar("_A", ClientAction, ServerAction)


def next_stage(table: Mapping[tuple[Stage, _A], Stage], stage: Stage, action: _A, party: str) -> Stage:
    """The stage after ``action``; raises :class:`SecAggProtocolError` if the table does not allow it."""
    try:
        return table[(stage, action)]
    except KeyError:
        raise SecAggProtocolError(f"{party} cannot {action.value} in stage {stage.value}") from None
