"""The orchestrator's SecAgg+ round driver over real protocol messages (in memory, no sockets): a stage closes
as soon as every expected site answered or left the round (its task closed: a reported failure), instead of
waiting for its timeout; while a site that may still answer is awaited, it waits, as before."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from fedhealth.crypto import IdentityKey
from fedhealth.orchestrator._secure import SecureRoundDriver, SecureRounds
from fedhealth.protocol import TaskKind
from fedhealth.secagg import KeyDirectory, SecAggClient, SecAggConfig, SecAggServer, ShareBundle, Stage
from fedhealth.secagg._simulate import benchmark_codec

SITES = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")
TIMEOUT_S = 600.0  # far longer than any test: a stage that closed did not wait for it


class Round:
    """One secure round at the driver, the four sites' protocol clients beside it."""

    def __init__(self) -> None:
        self.codec = benchmark_codec(len(SITES), 3)
        config = SecAggConfig(
            study_id="st_test/attempt", round=1, sites=SITES, threshold=3, vector_length=self.codec.length
        )
        keys = {s: IdentityKey.generate() for s in SITES}
        publics = {s: k.public() for s, k in keys.items()}
        self.clients = {s: SecAggClient(config, s, keys[s], publics) for s in SITES}
        self.failed: list[str] = []
        self.done: list[str] = []
        self.rounds = SecureRounds()
        self.driver = SecureRoundDriver(
            round_id="rd_test",
            kind=TaskKind.TRAIN,
            codec=self.codec,
            config=config,
            server=SecAggServer(config, identities=publics),
            peer_keys={s: publics[s].raw.hex() for s in SITES},
            attempt="attempt",
            stage_timeout_s=TIMEOUT_S,
            on_done=self.done.append,
            on_failed=lambda _rid, reason: self.failed.append(reason),
        )
        self.rounds._drivers["rd_test"] = self.driver
        self.rounds._tasks.update({f"tk_{s}": (s, "rd_test") for s in SITES})
        self.driver.arm()

    def stage(self) -> Stage:
        return self.driver.server.stage

    def advertise(self, sites: tuple[str, ...]) -> None:
        for s in sites:
            self.driver.receive(s, "advertise_keys", self.clients[s].advertise_keys().to_bytes())

    def share(self, sites: tuple[str, ...]) -> None:
        for s in sites:
            directory = KeyDirectory.from_bytes(self.driver.outbox[Stage.ADVERTISE_KEYS][s])
            self.driver.receive(s, "share_keys", self.clients[s].share_keys(directory).to_bytes())

    def mask(self, sites: tuple[str, ...]) -> None:
        for s in sites:
            bundle = ShareBundle.from_bytes(self.driver.outbox[Stage.SHARE_KEYS][s])
            values = {
                "weighted_delta": np.full(3, 0.25, np.float32),
                "samples": 10,
                "loss_sum": 1.0,
                "correct": 5,
            }
            message = self.clients[s].masked_input(bundle, self.codec.encode(values))
            self.driver.receive(s, "masked_input", message.to_bytes())

    def leave(self, site: str) -> None:
        """The site's task closed (it reported a failure), as the engine tells the secure rounds."""
        self.rounds.task_closed(f"tk_{site}")


async def _a_site_leaving_at_the_masked_input_stage_closes_it_with_the_others() -> Round:
    r = Round()
    r.advertise(SITES)
    r.share(SITES)
    assert r.stage() is Stage.MASKED_INPUT
    r.mask(SITES[:3])
    assert r.stage() is Stage.MASKED_INPUT  # still waiting for hospital-d, as before
    r.leave("hospital-d")
    await asyncio.sleep(0)
    return r


def test_a_site_that_leaves_while_awaited_no_longer_holds_the_stage_until_its_timeout():
    r = asyncio.run(_a_site_leaving_at_the_masked_input_stage_closes_it_with_the_others())
    assert r.stage() is Stage.CONSISTENCY  # closed with the three that answered, not after 600 s
    assert set(r.driver.outbox[Stage.MASKED_INPUT]) == set(SITES[:3])
    assert r.driver.dropped_at == {"hospital-d": Stage.MASKED_INPUT}
    assert r.failed == []


async def _too_few_left(leavers: tuple[str, ...]) -> Round:
    r = Round()
    r.advertise(SITES)
    r.share(SITES)
    r.mask(SITES[:1])  # hospital-a answered; the others leave
    for site in leavers:
        r.leave(site)
    await asyncio.sleep(0)
    return r


def test_when_every_awaited_site_left_too_few_answers_fail_the_round_at_once_with_the_timeouts_reason():
    r = asyncio.run(_too_few_left(SITES[1:]))
    assert r.driver.ended is not None
    assert r.failed == [r.driver.ended]
    assert "secure aggregation failed at the masked_input stage: too_few_sites" in r.failed[0]


def test_a_site_still_awaited_is_waited_for_even_when_too_few_could_answer():
    """Two of three needed cannot be reached, but hospital-d may yet answer, or report its own reason for
    refusing: the stage waits for it (or for its timeout), as before."""
    r = asyncio.run(_too_few_left(SITES[1:3]))
    assert r.stage() is Stage.MASKED_INPUT
    assert r.driver.ended is None
    assert r.failed == []


async def _waits_for_a_silent_site() -> Round:
    r = Round()
    r.advertise(SITES)
    r.share(SITES)
    r.mask(SITES[:3])
    await asyncio.sleep(0.05)
    return r


def test_a_silent_site_whose_task_is_open_is_still_waited_for():
    """The control: nothing closes a stage early while every missing site might still answer."""
    r = asyncio.run(_waits_for_a_silent_site())
    assert r.stage() is Stage.MASKED_INPUT
    assert r.failed == []
    assert r.driver.ended is None


async def _left_before_its_stage() -> Round:
    r = Round()
    r.advertise(SITES)
    r.leave("hospital-d")  # answered the first stage, then its task closed
    r.share(SITES[:3])
    await asyncio.sleep(0)
    return r


def test_a_site_that_left_after_answering_is_not_awaited_at_the_next_stage():
    r = asyncio.run(_left_before_its_stage())
    assert r.stage() is Stage.MASKED_INPUT
    assert set(r.driver.outbox[Stage.SHARE_KEYS]) == set(SITES[:3])


@pytest.mark.parametrize("site", ["hospital-z", "hospital-a"])
def test_a_closed_task_of_another_round_or_site_changes_nothing(site):
    async def run() -> Round:
        r = Round()
        r.advertise(SITES[:3])
        r.rounds.task_closed("tk_unknown")  # a task this process does not hold
        r.driver.site_left("hospital-z")  # not a participant
        if site == "hospital-a":
            r.leave(site)  # answered this stage already: hospital-d is still awaited
        await asyncio.sleep(0)
        return r

    r = asyncio.run(run())
    assert r.stage() is Stage.ADVERTISE_KEYS
    assert r.failed == []
