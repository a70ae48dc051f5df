"""The transition tables: every (stage, action) pair outside them raises the protocol's own error."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from secagg_federation import Federation, make_federation

from fedhealth.core import ProtocolError
from fedhealth.secagg import (
    CLIENT_TRANSITIONS,
    SERVER_TRANSITIONS,
    ClientAction,
    ConsistencyRequest,
    KeyDirectory,
    SecAggClient,
    SecAggProtocolError,
    SecAggServer,
    ServerAction,
    ShareBundle,
    Stage,
    UnmaskRequest,
)

SITE = "site-00"

# the order the protocol defines (Bonawitz et al. 2017 with the consistency check), written out, not read
# from the tables under test
CLIENT_STAGES = [
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY,
    Stage.UNMASK,
    Stage.DONE,
    Stage.FAILED,
]


def _client_at(stage: Stage) -> tuple[Federation, SecAggClient]:
    """A 3-site federation whose first client is in ``stage`` (the others keep pace)."""
    fed = make_federation(3, 2, 4)
    client = fed.clients[SITE]
    if stage is Stage.FAILED:
        client.abort()
        return fed, client
    inputs = fed.inputs(0)
    steps: list[Callable[[], object]] = []
    state: dict[str, dict[str, object]] = {}
    steps.append(lambda: state.update(directories=fed.advertise()))
    steps.append(lambda: state.update(bundles=fed.share(state["directories"])))  # type: ignore[arg-type]
    steps.append(lambda: state.update(checks=fed.mask(state["bundles"], inputs)))  # type: ignore[arg-type]
    steps.append(lambda: state.update(requests=fed.sign(state["checks"])))  # type: ignore[arg-type]
    steps.append(lambda: fed.unmask(state["requests"]))  # type: ignore[arg-type]
    order = [*CLIENT_STAGES[:5], Stage.DONE]
    for step in steps[: order.index(stage)]:
        step()
    assert client.stage is stage
    return fed, client


def _client_call(fed: Federation, client: SecAggClient, action: ClientAction) -> None:
    digest = fed.config.digest()
    vector = np.zeros(fed.config.vector_length, dtype=np.uint32)
    calls: dict[ClientAction, Callable[[], object]] = {
        ClientAction.ADVERTISE_KEYS: client.advertise_keys,
        ClientAction.SHARE_KEYS: lambda: client.share_keys(
            KeyDirectory(recipient=SITE, config_digest=digest, advertisements=())
        ),
        ClientAction.MASKED_INPUT: lambda: client.masked_input(
            ShareBundle(recipient=SITE, config_digest=digest, boxes=()), vector
        ),
        ClientAction.CONSISTENCY: lambda: client.consistency(
            ConsistencyRequest(recipient=SITE, config_digest=digest, survivors=fed.sites)
        ),
        ClientAction.UNMASK: lambda: client.unmask(
            UnmaskRequest(recipient=SITE, config_digest=digest, survivors=fed.sites, signatures=())
        ),
        ClientAction.ABORT: client.abort,
    }
    calls[action]()


FORBIDDEN_CLIENT = [(s, a) for s in CLIENT_STAGES for a in ClientAction if (s, a) not in CLIENT_TRANSITIONS]


@pytest.mark.parametrize(("stage", "action"), FORBIDDEN_CLIENT, ids=lambda v: v.value)
def test_client_refuses_every_action_outside_its_transition_table(stage: Stage, action: ClientAction) -> None:
    fed, client = _client_at(stage)
    with pytest.raises(SecAggProtocolError) as info:
        _client_call(fed, client, action)
    assert isinstance(info.value, ProtocolError)
    assert client.stage is stage


@pytest.mark.parametrize("stage", CLIENT_STAGES[:5], ids=lambda v: v.value)
def test_client_abort_from_any_active_stage_fails_it(stage: Stage) -> None:
    _, client = _client_at(stage)
    client.abort()
    assert client.stage is CLIENT_TRANSITIONS[(stage, ClientAction.ABORT)] is Stage.FAILED


def test_client_moves_through_the_stages_in_protocol_order() -> None:
    fed = make_federation(3, 2, 4)
    client = fed.clients[SITE]
    seen = [client.stage]
    directories = fed.advertise()
    seen.append(client.stage)
    bundles = fed.share(directories)
    seen.append(client.stage)
    checks = fed.mask(bundles, fed.inputs(0))
    seen.append(client.stage)
    requests = fed.sign(checks)
    seen.append(client.stage)
    fed.unmask(requests)
    seen.append(client.stage)
    assert seen == [
        Stage.ADVERTISE_KEYS,
        Stage.SHARE_KEYS,
        Stage.MASKED_INPUT,
        Stage.CONSISTENCY,
        Stage.UNMASK,
        Stage.DONE,
    ]


def test_the_tables_allow_exactly_the_protocol_order_and_abort() -> None:
    forward = {
        (Stage.ADVERTISE_KEYS, ClientAction.ADVERTISE_KEYS): Stage.SHARE_KEYS,
        (Stage.SHARE_KEYS, ClientAction.SHARE_KEYS): Stage.MASKED_INPUT,
        (Stage.MASKED_INPUT, ClientAction.MASKED_INPUT): Stage.CONSISTENCY,
        (Stage.CONSISTENCY, ClientAction.CONSISTENCY): Stage.UNMASK,
        (Stage.UNMASK, ClientAction.UNMASK): Stage.DONE,
    }
    aborts = {(stage, ClientAction.ABORT): Stage.FAILED for stage in CLIENT_STAGES[:5]}
    assert dict(CLIENT_TRANSITIONS) == {**forward, **aborts}
    closes = {
        (Stage.ADVERTISE_KEYS, ServerAction.CLOSE_STAGE): Stage.SHARE_KEYS,
        (Stage.SHARE_KEYS, ServerAction.CLOSE_STAGE): Stage.MASKED_INPUT,
        (Stage.MASKED_INPUT, ServerAction.CLOSE_STAGE): Stage.CONSISTENCY,
        (Stage.CONSISTENCY, ServerAction.CLOSE_STAGE): Stage.UNMASK,
        (Stage.UNMASK, ServerAction.CLOSE_STAGE): Stage.DONE,
    }
    receives = {
        (Stage.ADVERTISE_KEYS, ServerAction.RECEIVE_ADVERTISEMENT): Stage.ADVERTISE_KEYS,
        (Stage.SHARE_KEYS, ServerAction.RECEIVE_SHARES): Stage.SHARE_KEYS,
        (Stage.MASKED_INPUT, ServerAction.RECEIVE_MASKED_INPUT): Stage.MASKED_INPUT,
        (Stage.CONSISTENCY, ServerAction.RECEIVE_CONSISTENCY): Stage.CONSISTENCY,
        (Stage.UNMASK, ServerAction.RECEIVE_UNMASK_RESPONSE): Stage.UNMASK,
    }
    server_aborts = {(stage, ServerAction.ABORT): Stage.FAILED for stage in CLIENT_STAGES[:5]}
    result = {(Stage.DONE, ServerAction.READ_RESULT): Stage.DONE}
    assert dict(SERVER_TRANSITIONS) == {**closes, **receives, **server_aborts, **result}


def test_a_stage_called_twice_raises() -> None:
    fed = make_federation(3, 2)
    fed.clients[SITE].advertise_keys()
    with pytest.raises(SecAggProtocolError):
        fed.clients[SITE].advertise_keys()


def _server_at(stage: Stage) -> tuple[Federation, dict[str, object]]:
    """A federation whose server is in ``stage``, and one real message of each kind from site-00."""
    fed = make_federation(3, 2, 4)
    ref = make_federation(3, 2, 4, keys=fed.keys)  # a twin round to mint well-formed messages
    inputs = ref.inputs(0)
    msgs: dict[str, object] = {}
    c = ref.clients[SITE]
    msgs["advert"] = c.advertise_keys()
    for s in ref.sites[1:]:
        ref.server.receive(ref.clients[s].advertise_keys())
    ref.server.receive(msgs["advert"])  # type: ignore[arg-type]
    directories = ref.server.close_stage()
    msgs["shares"] = c.share_keys(directories[SITE])  # type: ignore[arg-type]
    for s in ref.sites[1:]:
        ref.server.receive(ref.clients[s].share_keys(directories[s]))  # type: ignore[arg-type]
    ref.server.receive(msgs["shares"])  # type: ignore[arg-type]
    bundles = ref.server.close_stage()
    msgs["masked"] = c.masked_input(bundles[SITE], inputs[SITE])  # type: ignore[arg-type]
    for s in ref.sites[1:]:
        ref.server.receive(ref.clients[s].masked_input(bundles[s], inputs[s]))  # type: ignore[arg-type]
    ref.server.receive(msgs["masked"])  # type: ignore[arg-type]
    checks = ref.server.close_stage()
    msgs["signature"] = c.consistency(checks[SITE])  # type: ignore[arg-type]
    for s in ref.sites[1:]:
        ref.server.receive(ref.clients[s].consistency(checks[s]))  # type: ignore[arg-type]
    ref.server.receive(msgs["signature"])  # type: ignore[arg-type]
    requests = ref.server.close_stage()
    msgs["response"] = c.unmask(requests[SITE])  # type: ignore[arg-type]

    if stage is Stage.FAILED:
        fed.server.abort()
        return fed, msgs
    order = [*CLIENT_STAGES[:5], Stage.DONE]
    state: dict[str, dict[str, object]] = {}
    fed_inputs = fed.inputs(1)
    steps: list[Callable[[], object]] = [
        lambda: state.update(directories=fed.advertise()),
        lambda: state.update(bundles=fed.share(state["directories"])),  # type: ignore[arg-type]
        lambda: state.update(checks=fed.mask(state["bundles"], fed_inputs)),  # type: ignore[arg-type]
        lambda: state.update(requests=fed.sign(state["checks"])),  # type: ignore[arg-type]
        lambda: fed.unmask(state["requests"]),  # type: ignore[arg-type]
    ]
    for step in steps[: order.index(stage)]:
        step()
    assert fed.server.stage is stage
    return fed, msgs


def _server_call(server: SecAggServer, action: ServerAction, msgs: dict[str, object]) -> None:
    calls: dict[ServerAction, Callable[[], object]] = {
        ServerAction.RECEIVE_ADVERTISEMENT: lambda: server.receive(msgs["advert"]),  # type: ignore[arg-type]
        ServerAction.RECEIVE_SHARES: lambda: server.receive(msgs["shares"]),  # type: ignore[arg-type]
        ServerAction.RECEIVE_MASKED_INPUT: lambda: server.receive(msgs["masked"]),  # type: ignore[arg-type]
        ServerAction.RECEIVE_CONSISTENCY: lambda: server.receive(msgs["signature"]),  # type: ignore[arg-type]
        ServerAction.RECEIVE_UNMASK_RESPONSE: lambda: server.receive(msgs["response"]),  # type: ignore[arg-type]
        ServerAction.CLOSE_STAGE: server.close_stage,
        ServerAction.READ_RESULT: server.result,
        ServerAction.ABORT: server.abort,
    }
    calls[action]()


SERVER_STAGES = CLIENT_STAGES
FORBIDDEN_SERVER = [(s, a) for s in SERVER_STAGES for a in ServerAction if (s, a) not in SERVER_TRANSITIONS]


@pytest.mark.parametrize(("stage", "action"), FORBIDDEN_SERVER, ids=lambda v: v.value)
def test_server_refuses_every_action_outside_its_transition_table(stage: Stage, action: ServerAction) -> None:
    fed, msgs = _server_at(stage)
    with pytest.raises(SecAggProtocolError):
        _server_call(fed.server, action, msgs)
    assert fed.server.stage is stage


def test_server_refuses_a_message_type_it_never_receives() -> None:
    fed = make_federation(3, 2)
    request = UnmaskRequest(
        recipient=SITE, config_digest=fed.config.digest(), survivors=fed.sites, signatures=()
    )
    with pytest.raises(SecAggProtocolError):
        fed.server.receive(request)  # type: ignore[arg-type]


def test_server_moves_through_the_stages_in_protocol_order() -> None:
    fed = make_federation(3, 2, 4)
    seen = [fed.server.stage]
    directories = fed.advertise()
    seen.append(fed.server.stage)
    bundles = fed.share(directories)
    seen.append(fed.server.stage)
    checks = fed.mask(bundles, fed.inputs(0))
    seen.append(fed.server.stage)
    requests = fed.sign(checks)
    seen.append(fed.server.stage)
    fed.unmask(requests)
    seen.append(fed.server.stage)
    assert seen == [
        Stage.ADVERTISE_KEYS,
        Stage.SHARE_KEYS,
        Stage.MASKED_INPUT,
        Stage.CONSISTENCY,
        Stage.UNMASK,
        Stage.DONE,
    ]
    assert fed.server.result().contributors == fed.sites


def test_client_refuses_the_wrong_kind_of_message_for_its_stage_without_changing_stage() -> None:
    fed = make_federation(3, 2, 4)
    directories = fed.advertise()
    client = fed.clients[SITE]
    wrong = ShareBundle(recipient=SITE, config_digest=fed.config.digest(), boxes=())
    with pytest.raises(SecAggProtocolError):
        client.share_keys(wrong)  # type: ignore[arg-type]
    assert client.stage is Stage.SHARE_KEYS
    bundles = fed.share(directories)
    with pytest.raises(SecAggProtocolError):
        client.masked_input(directories[SITE], np.zeros(4, dtype=np.uint32))  # type: ignore[arg-type]
    checks = fed.mask(bundles, fed.inputs(0))
    with pytest.raises(SecAggProtocolError):
        client.consistency(bundles[SITE])  # type: ignore[arg-type]
    assert client.stage is Stage.CONSISTENCY
    requests = fed.sign(checks)
    with pytest.raises(SecAggProtocolError):
        client.unmask(checks[SITE])  # type: ignore[arg-type]
    assert client.stage is Stage.UNMASK
    client.unmask(requests[SITE])
    assert client.stage is Stage.DONE
