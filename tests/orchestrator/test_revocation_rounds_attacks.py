"""Attacks on "revoking a site closes its open tasks" (docs/security.md, "Sites" item 4), in one process: the
real service (store, blobs, round engine) with its handlers called as functions, or the round engine and
store alone. A revocation racing a round's end (its last result, its aggregation, an upload in flight), a
revocation made while the orchestrator was down, a site named only for the evaluation, a second revocation
and one of an unknown site, a secure study whose later round must neither count nor wait for the revoked
site (and must say why it cannot start without it), and a collective study whose retries must not wait for
it either. Nothing here waits on a deadline: every round deadline and secure stage timeout is 600 s, so a
study that ends within a test's bounded polling did not wait for one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from fedhealth.core import NotFoundError
from fedhealth.crypto import IdentityKey, PublicIdentity
from fedhealth.orchestrator import (
    NullObserver,
    OrchestratorService,
    OrchestratorSettings,
    Store,
    make_engine,
    sqlite_url,
    start_service,
)
from fedhealth.orchestrator._http import ApiError
from fedhealth.orchestrator._routes_admin import revoke, rotate
from fedhealth.orchestrator._routes_secure import accept_secagg_message
from fedhealth.orchestrator._routes_sites import accept_approval
from fedhealth.orchestrator._routes_studies import submit_study
from fedhealth.orchestrator._routes_tasks import accept_evaluation, accept_result, poll_task
from fedhealth.orchestrator._store import SiteStatus, TaskRow
from fedhealth.protocol import (
    Ack,
    ApprovalReport,
    ApprovalState,
    RecipeSpec,
    ResultManifest,
    Role,
    RoundStatus,
    SecureAggregationSpec,
    SiteMetrics,
    StudySpec,
    StudyStatus,
    Task,
    TaskKind,
    TaskStatus,
)
from fedhealth.runtime import encode_contribution, encode_update, param_specs
from fedhealth.secagg import (
    ConsistencyRequest,
    KeyDirectory,
    SecAggClient,
    ShareBundle,
    Stage,
    UnmaskRequest,
)
from support import (
    RoundEngineHarness,
    enroll_sites,
    open_round,
    operator_principal,
    run_round_engine,
    synthetic_recipe,
    task_of,
)

REVOKED = "site_revoked: the site was revoked by an admin"
SITES = ["site-a", "site-b", "site-c"]
LONG_S = 600.0  # every deadline and stage timeout: far beyond any test here


ADMIN = operator_principal("admin", Role.ADMIN)
RESEARCHER = operator_principal("alice", Role.RESEARCHER)


async def _until(predicate: Callable[[], bool], what: str) -> None:
    """Let spawned work run until ``predicate`` holds (bounded: 5 s at most, no timing asserted)."""
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


# --- the service, its handlers called as functions ----------------------------------------------------------


class _Closures(NullObserver):
    """Every task closure the engine reports, to catch a task closed (or reported) twice."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    def task_closed(self, task: TaskRow) -> None:
        self.closed.append(task.id)

    def tasks_closed(self, tasks: list[TaskRow]) -> None:
        self.closed.extend(t.id for t in tasks)


def _settings(tmp_path: Path, signing_key: IdentityKey) -> OrchestratorSettings:
    return OrchestratorSettings(state_dir=tmp_path / "state", signing_key=signing_key)


@asynccontextmanager
async def _service(tmp_path: Path, signing_key: IdentityKey) -> AsyncIterator[OrchestratorService]:
    svc = await start_service(_settings(tmp_path, signing_key), [])
    try:
        yield svc
    finally:
        await svc.close()


def _spec(sites: Sequence[str] = SITES, **fields: Any) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "revocation",
            "owner": "alice",
            "dataset": "none",
            "recipe": synthetic_recipe(16),
            "rounds": 2,
            "train_sites": list(sites),
            "min_sites": 1,
            "round_deadline_s": LONG_S,
            "seed": 3,
            **fields,
        }
    )


async def _start_study(svc: OrchestratorService, spec: StudySpec) -> str:
    """Submit ``spec`` and approve it at every site it names: it runs."""
    info = await submit_study(svc, RESEARCHER, spec)
    assert info.spec_hash is not None
    for site in sorted({*spec.train_sites, *spec.evaluation_sites}):
        report = ApprovalReport(spec_hash=info.spec_hash, state=ApprovalState.APPROVED)
        assert await accept_approval(svc, site, report) == Ack()
    assert svc.store.get_study(info.study_id).status is StudyStatus.RUNNING
    return info.study_id


def _update(task: Task) -> bytes:
    delta = {s.name: np.full(s.shape, 0.01, dtype=np.float32) for s in param_specs(task.recipe)}
    manifest = ResultManifest(task_id=task.task_id, metrics=SiteMetrics(num_samples=10))
    return encode_update(delta, manifest)


async def _polled(svc: OrchestratorService, site: str) -> Task:
    polled = await poll_task(svc, site, wait=0)
    assert polled.task is not None, f"{site} got no task"
    return polled.task


async def _train(svc: OrchestratorService, site: str) -> None:
    task = await _polled(svc, site)
    assert task.kind is TaskKind.TRAIN
    assert await accept_result(svc, site, task.task_id, _update(task)) == Ack()


async def _evaluate(svc: OrchestratorService, site: str) -> None:
    task = await _polled(svc, site)
    assert task.kind is TaskKind.EVALUATE
    manifest = ResultManifest(task_id=task.task_id, metrics=SiteMetrics(num_samples=10))
    assert await accept_evaluation(svc, site, task.task_id, manifest) == Ack()


def _revocations(svc: OrchestratorService) -> int:
    assert svc.database is not None
    with svc.database.connect() as c:
        q = sa.text("SELECT count(*) FROM gov_audit_entries WHERE type = 'site.revoked'")
        return int(c.execute(q).scalar_one())


def _run(tmp_path: Path, body: Callable[[OrchestratorService], Awaitable[None]]) -> None:
    async def main() -> None:
        async with _service(tmp_path, IdentityKey.generate()) as svc:
            await body(svc)

    asyncio.run(main())


def test_revoking_right_after_the_last_result_leaves_the_closed_round_alone(tmp_path: Path) -> None:
    # the race: the site's task closed (completed) an instant before its revocation; its round is over
    async def body(svc: OrchestratorService) -> None:
        enroll_sites(svc, SITES[:2])
        closures = _Closures()
        svc.engine.observers.append(closures)
        study_id = await _start_study(svc, _spec(SITES[:2]))
        first = open_round(svc.store, study_id)
        for site in SITES[:2]:
            await _train(svc, site)
        second = open_round(svc.store, study_id)
        assert second.number == 2
        await revoke(svc, ADMIN, "site-b")
        # round 1 as it was: both results counted, nothing reopened or re-closed
        assert svc.store.get_round(first.id).status is RoundStatus.COMPLETED
        assert svc.store.get_round(first.id).metrics["sites"] == 2  # type: ignore[index]
        assert {t.site: (t.status, t.reason) for t in svc.store.tasks_of_round(first.id)} == {
            "site-a": (TaskStatus.COMPLETED, None),
            "site-b": (TaskStatus.COMPLETED, None),
        }
        b2 = task_of(svc.store, second.id, "site-b")
        assert (b2.status, b2.reason) == (TaskStatus.FAILED, REVOKED)
        assert open_round(svc.store, study_id).id == second.id  # site-a still trains round 2
        await _train(svc, "site-a")
        third = open_round(svc.store, study_id)
        assert (third.number, third.kind) == (3, TaskKind.EVALUATE)
        await _until(lambda: not task_of(svc.store, third.id, "site-b").is_open, "site-b's evaluation closed")
        b3 = task_of(svc.store, third.id, "site-b")
        assert (b3.status, b3.reason) == (TaskStatus.FAILED, REVOKED)
        await _evaluate(svc, "site-a")
        study = svc.store.get_study(study_id)
        assert study.status is StudyStatus.COMPLETED, study.reason
        assert study.completed_rounds == 2
        assert study.reason == f"no evaluation from site-b: failed ({REVOKED})"
        every = [t.id for r in svc.store.rounds_of(study_id) for t in svc.store.tasks_of_round(r.id)]
        assert sorted(closures.closed) == sorted(every)  # each task reported closed exactly once

    _run(tmp_path, body)


def test_revoking_while_the_round_aggregates_changes_nothing_of_it_and_fails_the_next_task(
    tmp_path: Path,
) -> None:
    async def body(svc: OrchestratorService) -> None:
        enroll_sites(svc, SITES[:2])
        study_id = await _start_study(svc, _spec(SITES[:2]))
        first = open_round(svc.store, study_id)
        entered, release = asyncio.Event(), asyncio.Event()
        real = svc.engine._aggregate_updates

        async def gated(*args: Any) -> str | None:
            entered.set()
            await release.wait()
            return await real(*args)

        svc.engine._aggregate_updates = gated  # type: ignore[method-assign,assignment]
        await _train(svc, "site-a")
        b_task = await _polled(svc, "site-b")
        upload = asyncio.ensure_future(accept_result(svc, "site-b", b_task.task_id, _update(b_task)))
        await _until(entered.is_set, "round 1 aggregating")
        assert svc.store.get_round(first.id).status is RoundStatus.OPEN  # not recorded yet
        info = await revoke(svc, ADMIN, "site-b")
        assert info.status == SiteStatus.REVOKED.value
        assert svc.store.get_task(b_task.task_id).status is TaskStatus.COMPLETED  # in before the revocation
        release.set()
        assert await upload == Ack()
        done = svc.store.get_round(first.id)
        assert done.status is RoundStatus.COMPLETED
        assert done.metrics is not None
        assert done.metrics["sites"] == 2
        second = open_round(svc.store, study_id)
        assert second.number == 2
        await _until(
            lambda: not task_of(svc.store, second.id, "site-b").is_open, "site-b's round-2 task closed"
        )
        b2 = task_of(svc.store, second.id, "site-b")
        assert (b2.status, b2.reason) == (TaskStatus.FAILED, REVOKED)
        assert task_of(svc.store, second.id, "site-a").is_open
        assert svc.store.get_study(study_id).status is StudyStatus.RUNNING

    _run(tmp_path, body)


def test_an_upload_in_flight_when_its_site_is_revoked_is_refused_and_counted_once(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        enroll_sites(svc, SITES[:2])
        closures = _Closures()
        svc.engine.observers.append(closures)
        study_id = await _start_study(svc, _spec(SITES[:2]))
        first = open_round(svc.store, study_id)
        task = await _polled(svc, "site-b")
        update = _update(task)
        half, go_on = asyncio.Event(), asyncio.Event()

        async def slow() -> AsyncIterator[bytes]:  # the body arrives in two pieces, the revocation between
            yield update[:100]
            half.set()
            await go_on.wait()
            yield update[100:]

        upload = asyncio.ensure_future(accept_result(svc, "site-b", task.task_id, slow()))
        await _until(half.is_set, "half the upload in")
        await revoke(svc, ADMIN, "site-b")
        go_on.set()
        with pytest.raises(ApiError) as refused:
            await upload
        assert (refused.value.status, refused.value.error) == (409, f"task is failed: {REVOKED}")
        row = svc.store.get_task(task.task_id)
        assert (row.status, row.reason, row.result_digest) == (TaskStatus.FAILED, REVOKED, None)
        assert closures.closed.count(task.task_id) == 1
        assert svc.store.get_round(first.id).status is RoundStatus.OPEN  # site-a may still answer
        await _train(svc, "site-a")
        r1 = svc.store.get_round(first.id)
        assert r1.status is RoundStatus.COMPLETED
        assert r1.metrics is not None
        assert r1.metrics["sites"] == 1

    _run(tmp_path, body)


def test_revoking_twice_or_an_unknown_site_closes_nothing_more(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        enroll_sites(svc, SITES[:2])
        study_id = await _start_study(svc, _spec(SITES[:2]))
        first = open_round(svc.store, study_id)
        with pytest.raises(NotFoundError):
            await revoke(svc, ADMIN, "site-z")
        assert _revocations(svc) == 0
        assert all(t.is_open for t in svc.store.tasks_of_round(first.id))
        assert {s.name: s.status for s in svc.store.list_sites()} == {
            "site-a": SiteStatus.ACTIVE,
            "site-b": SiteStatus.ACTIVE,
        }
        await revoke(svc, ADMIN, "site-b")
        once = svc.store.get_task(task_of(svc.store, first.id, "site-b").id)
        assert (once.status, once.reason) == (TaskStatus.FAILED, REVOKED)
        again = await revoke(svc, ADMIN, "site-b")
        assert again.status == SiteStatus.REVOKED.value
        assert _revocations(svc) == 1  # the second revocation changed nothing, so recorded nothing
        assert svc.store.get_task(once.id) == once
        assert task_of(svc.store, first.id, "site-a").is_open
        assert open_round(svc.store, study_id).id == first.id
        assert svc.store.get_study(study_id).status is StudyStatus.RUNNING

    _run(tmp_path, body)


def test_a_re_keyed_site_revoked_before_it_enrolled_again_loses_its_open_task(tmp_path: Path) -> None:
    # a rotation keeps the task (the site may finish it); revoking the site afterwards must still close it
    async def body(svc: OrchestratorService) -> None:
        enroll_sites(svc, SITES[:2])
        study_id = await _start_study(svc, _spec(SITES[:2]))
        first = open_round(svc.store, study_id)
        rotate(svc, ADMIN, "site-b")
        assert svc.store.get_site("site-b").status is SiteStatus.PENDING
        assert task_of(svc.store, first.id, "site-b").is_open
        await revoke(svc, ADMIN, "site-b")
        b = task_of(svc.store, first.id, "site-b")
        assert (b.status, b.reason) == (TaskStatus.FAILED, REVOKED)
        await _train(svc, "site-a")
        r1 = svc.store.get_round(first.id)
        assert r1.status is RoundStatus.COMPLETED
        assert r1.metrics is not None
        assert r1.metrics["sites"] == 1
        assert open_round(svc.store, study_id).number == 2

    _run(tmp_path, body)


def test_a_site_named_only_for_the_evaluation_fails_its_evaluation_task_as_that_round_opens(
    tmp_path: Path,
) -> None:
    async def body(svc: OrchestratorService) -> None:
        enroll_sites(svc, SITES)
        spec = _spec(SITES[:2], eval_sites=["site-a", "site-c"], rounds=1)
        study_id = await _start_study(svc, spec)
        first = open_round(svc.store, study_id)
        await revoke(svc, ADMIN, "site-c")  # it has no task yet
        assert all(t.is_open for t in svc.store.tasks_of_round(first.id))
        for site in SITES[:2]:
            await _train(svc, site)
        evaluation = open_round(svc.store, study_id)
        assert (evaluation.number, evaluation.kind) == (2, TaskKind.EVALUATE)
        assert sorted(t.site for t in svc.store.tasks_of_round(evaluation.id)) == ["site-a", "site-c"]
        await _until(lambda: not task_of(svc.store, evaluation.id, "site-c").is_open, "site-c's task closed")
        c = task_of(svc.store, evaluation.id, "site-c")
        assert (c.status, c.reason) == (TaskStatus.FAILED, REVOKED)
        assert (await poll_task(svc, "site-c", wait=0)).task is None  # nothing left for it
        await _evaluate(svc, "site-a")
        study = svc.store.get_study(study_id)
        assert study.status is StudyStatus.COMPLETED, study.reason
        assert study.reason == f"no evaluation from site-c: failed ({REVOKED})"

    _run(tmp_path, body)


def test_a_site_revoked_while_the_orchestrator_was_down_is_closed_out_when_it_comes_back(
    tmp_path: Path,
) -> None:
    # revoked straight in the database (Store.revoke_site) while no orchestrator ran: the restarted one
    # closes the site's task of the open round at start-up, and the round ends without it
    signing_key = IdentityKey.generate()

    async def first_life() -> tuple[str, str]:
        async with _service(tmp_path, signing_key) as svc:
            enroll_sites(svc, SITES)
            study_id = await _start_study(svc, _spec(min_sites=2, rounds=1))
            for site in ("site-a", "site-b"):
                await _train(svc, site)
            r = open_round(svc.store, study_id)
            assert task_of(svc.store, r.id, "site-c").is_open  # the round waits for site-c
            return study_id, r.id

    study_id, round_id = asyncio.run(first_life())
    db = make_engine(sqlite_url(tmp_path / "state" / "orchestrator.sqlite"))
    assert Store(db).revoke_site("site-c", datetime.now(UTC))
    db.dispose()

    async def second_life() -> None:
        async with _service(tmp_path, signing_key) as svc:
            await _until(
                lambda: svc.store.get_round(round_id).status is not RoundStatus.OPEN, "round 1 closed"
            )
            c = task_of(svc.store, round_id, "site-c")
            assert (c.status, c.reason) == (TaskStatus.FAILED, REVOKED)
            assert svc.store.get_round(round_id).status is RoundStatus.COMPLETED
            evaluation = open_round(svc.store, study_id)
            assert (evaluation.number, evaluation.kind) == (2, TaskKind.EVALUATE)
            await _until(lambda: not task_of(svc.store, evaluation.id, "site-c").is_open, "evaluation closed")
            for site in ("site-a", "site-b"):
                await _evaluate(svc, site)
            study = svc.store.get_study(study_id)
            assert study.status is StudyStatus.COMPLETED, study.reason
            assert study.reason == f"no evaluation from site-c: failed ({REVOKED})"

    asyncio.run(second_life())


# --- the round engine and store alone (support.RoundEngineHarness) -----------------------------------------


def test_after_a_restart_a_revoked_sites_open_task_closes_and_the_round_goes_on_without_it(
    tmp_path: Path,
) -> None:
    async def first_life(o: RoundEngineHarness) -> None:
        study_id = await o.start(min_sites=2)
        await o.engine.task_closed(*o.complete(study_id, "north"))
        # the process "dies" here; east is revoked in the database meanwhile (no engine to tell)
        assert o.store.revoke_site("east", o.clock.now())

    async def second_life(o: RoundEngineHarness) -> None:
        (r1,) = o.store.open_rounds()
        await o.engine.recover()
        await _until(lambda: not task_of(o.store, r1.id, "east").is_open, "east's task closed at start-up")
        east = task_of(o.store, r1.id, "east")
        assert (east.status, east.reason) == (TaskStatus.FAILED, REVOKED)
        assert open_round(o.store, r1.study_id).id == r1.id  # south may still answer: it is waited for
        await o.engine.task_closed(*o.complete(r1.study_id, "south"))
        assert o.store.get_round(r1.id).status is RoundStatus.COMPLETED
        r2 = open_round(o.store, r1.study_id)
        assert r2.number == 2
        await _until(lambda: not task_of(o.store, r2.id, "east").is_open, "east's round-2 task closed")
        assert task_of(o.store, r2.id, "east").reason == REVOKED
        for site in ("north", "south"):
            await o.engine.task_closed(*o.complete(r1.study_id, site))
        r3 = open_round(o.store, r1.study_id)
        assert (r3.number, r3.kind) == (3, TaskKind.EVALUATE)
        await _until(lambda: not task_of(o.store, r3.id, "east").is_open, "east's evaluation closed")
        for site in ("north", "south"):
            await o.engine.task_closed(*o.complete(r1.study_id, site))
        study = o.store.get_study(r1.study_id)
        assert study.status is StudyStatus.COMPLETED, study.reason
        assert study.completed_rounds == 2

    run_round_engine(first_life, tmp_path, round_deadline_s=LONG_S)
    run_round_engine(second_life, tmp_path, round_deadline_s=LONG_S)


def test_a_quorum_that_needs_a_site_revoked_while_down_fails_at_start_up_naming_it(tmp_path: Path) -> None:
    async def first_life(o: RoundEngineHarness) -> None:
        study_id = await o.start(min_sites=3)
        await o.engine.task_closed(*o.complete(study_id, "north"))
        await o.engine.task_closed(*o.complete(study_id, "south"))
        assert o.store.revoke_site("east", o.clock.now())

    async def second_life(o: RoundEngineHarness) -> None:
        (r1,) = o.store.open_rounds()
        await o.engine.recover()
        await _until(lambda: o.store.get_study(r1.study_id).status is not StudyStatus.RUNNING, "study ended")
        study = o.store.get_study(r1.study_id)
        assert study.status is StudyStatus.FAILED
        assert study.reason == (
            f"round 1: quorum not met: 2 valid update(s), 3 required (east: failed ({REVOKED}))"
        )
        assert o.store.open_rounds() == []

    run_round_engine(first_life, tmp_path, round_deadline_s=LONG_S)
    run_round_engine(second_life, tmp_path, round_deadline_s=LONG_S)


# --- secure aggregation: a revoked site is no participant of a later round ----------------------------------


def _secure_spec(keys: dict[str, IdentityKey], **secure: Any) -> StudySpec:
    fingerprints = {s: k.public().fingerprint for s, k in keys.items()}
    return _spec(
        list(keys),
        rounds=1,
        min_sites=2,
        secure_aggregation=SecureAggregationSpec(site_keys=fingerprints, stage_timeout_s=LONG_S, **secure),
    )


class _SecureRound:
    """The sites' side of one secure round, their messages handed to the handlers (as the agents do)."""

    def __init__(self, svc: OrchestratorService, study_id: str, keys: dict[str, IdentityKey]) -> None:
        self.svc = svc
        self.round = open_round(svc.store, study_id)
        driver = svc.engine.secure.get(self.round.id)
        assert driver is not None, "no secure round runs"
        self.driver = driver
        self.spec = svc.store.spec(study_id)
        peers = {s: PublicIdentity(bytes.fromhex(k)) for s, k in driver.peer_keys.items()}
        self.clients = {s: SecAggClient(driver.config, s, keys[s], peers) for s in driver.config.sites}
        self.tasks = {s: task_of(svc.store, self.round.id, s).id for s in driver.config.sites}

    @property
    def participants(self) -> tuple[str, ...]:
        return tuple(self.driver.config.sites)

    def send(self, site: str, stage: Stage, body: bytes) -> None:
        accept_secagg_message(self.svc, site, self.tasks[site], stage.value, body, None)

    def run(self, sites: Sequence[str], before_unmask: Callable[[], None] | None = None) -> None:
        """Every stage for ``sites``; ``before_unmask`` runs after the first of them sent its unmask."""
        d = self.driver
        for s in sites:
            self.send(s, Stage.ADVERTISE_KEYS, self.clients[s].advertise_keys().to_bytes())
        for s in sites:
            directory = KeyDirectory.from_bytes(d.outbox[Stage.ADVERTISE_KEYS][s])
            self.send(s, Stage.SHARE_KEYS, self.clients[s].share_keys(directory).to_bytes())
        metrics = SiteMetrics(num_samples=10, train_loss=0.5)
        delta = None
        if self.round.kind is TaskKind.TRAIN:
            delta = {t.name: np.full(t.shape, 0.01) for t in param_specs(self.spec.recipe)}
        for s in sites:
            vector = encode_contribution(d.codec, self.spec, metrics, delta)
            bundle = ShareBundle.from_bytes(d.outbox[Stage.SHARE_KEYS][s])
            self.send(s, Stage.MASKED_INPUT, self.clients[s].masked_input(bundle, vector).to_bytes())
        for s in sites:
            check = ConsistencyRequest.from_bytes(d.outbox[Stage.MASKED_INPUT][s])
            self.send(s, Stage.CONSISTENCY, self.clients[s].consistency(check).to_bytes())
        for i, s in enumerate(sites):
            request = UnmaskRequest.from_bytes(d.outbox[Stage.CONSISTENCY][s])
            self.send(s, Stage.UNMASK, self.clients[s].unmask(request).to_bytes())
            if i == 0 and before_unmask is not None:
                before_unmask()


def test_a_site_revoked_in_a_secure_study_is_no_participant_of_its_later_round(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        keys = enroll_sites(svc, SITES)
        study_id = await _start_study(svc, _secure_spec(keys, threshold=2, collusion=0))
        first = _SecureRound(svc, study_id, keys)
        assert first.participants == tuple(SITES)
        await revoke(svc, ADMIN, "site-c")  # before it sent anything: the first stage stops waiting for it
        c1 = task_of(svc.store, first.round.id, "site-c")
        assert (c1.status, c1.reason) == (TaskStatus.FAILED, REVOKED)
        first.run(["site-a", "site-b"])
        await _until(lambda: svc.store.get_round(first.round.id).status is not RoundStatus.OPEN, "round 1")
        r1 = svc.store.get_round(first.round.id)
        assert r1.status is RoundStatus.COMPLETED, svc.store.get_study(study_id).reason
        assert r1.metrics is not None
        assert r1.metrics["sites"] == 2
        assert task_of(svc.store, first.round.id, "site-c").reason == REVOKED  # not overwritten at the close
        # the evaluation round opens without site-c: no participant, its task failed as the round opened
        evaluation = _SecureRound(svc, study_id, keys)
        assert (evaluation.round.number, evaluation.round.kind) == (2, TaskKind.EVALUATE)
        assert evaluation.participants == ("site-a", "site-b")
        await _until(lambda: not task_of(svc.store, evaluation.round.id, "site-c").is_open, "site-c's task")
        c2 = task_of(svc.store, evaluation.round.id, "site-c")
        assert (c2.status, c2.reason) == (TaskStatus.FAILED, REVOKED)
        evaluation.run(["site-a", "site-b"])  # no stage waits for site-c
        await _until(lambda: svc.store.get_study(study_id).status is not StudyStatus.RUNNING, "study ended")
        study = svc.store.get_study(study_id)
        assert study.status is StudyStatus.COMPLETED, study.reason
        assert study.reason == "no evaluation from site-c"

    _run(tmp_path, body)


def test_a_secure_round_short_of_its_threshold_without_a_revoked_site_fails_at_once_naming_it(
    tmp_path: Path,
) -> None:
    # threshold 3 of 3: once site-c is revoked no later round can be held; it must not wait out its stage
    # timeout (600 s) and the study's reason must say which site it lacks and why
    async def body(svc: OrchestratorService) -> None:
        keys = enroll_sites(svc, SITES)
        study_id = await _start_study(svc, _secure_spec(keys, threshold=3, collusion=1))
        first = _SecureRound(svc, study_id, keys)
        revoked: list[Any] = []

        def revoke_c() -> None:  # site-c has sent its unmask message: round 1 is still summed over three
            revoked.append(asyncio.ensure_future(revoke(svc, ADMIN, "site-c")))

        first.run(["site-c", "site-a", "site-b"], before_unmask=revoke_c)
        await asyncio.gather(*revoked)
        await _until(lambda: svc.store.get_round(first.round.id).status is not RoundStatus.OPEN, "round 1")
        assert svc.store.get_round(first.round.id).status is RoundStatus.COMPLETED
        await _until(lambda: svc.store.get_study(study_id).status is not StudyStatus.RUNNING, "study ended")
        study = svc.store.get_study(study_id)
        assert study.status is StudyStatus.FAILED
        assert study.reason is not None
        assert study.reason.startswith("round 2: secure aggregation cannot start: "), study.reason
        assert study.reason.endswith(f" (without site-c: {REVOKED})"), study.reason
        (evaluation,) = [r for r in svc.store.rounds_of(study_id) if r.number == 2]
        assert evaluation.status is RoundStatus.FAILED
        c2 = task_of(svc.store, evaluation.id, "site-c")
        assert (c2.status, c2.reason) == (TaskStatus.FAILED, REVOKED)
        assert not any(t.is_open for t in svc.store.tasks_of_round(evaluation.id))

    _run(tmp_path, body)


def test_revoking_a_site_the_running_secure_round_needs_fails_it_at_once(tmp_path: Path) -> None:
    # threshold 3 of 3 and site-c revoked before it advertised its keys: the first stage stops waiting for
    # it, closes with two, and the round fails then rather than after its 600 s stage timeout
    async def body(svc: OrchestratorService) -> None:
        keys = enroll_sites(svc, SITES)
        study_id = await _start_study(svc, _secure_spec(keys, threshold=3, collusion=1))
        first = _SecureRound(svc, study_id, keys)
        for site in ("site-a", "site-b"):
            first.send(site, Stage.ADVERTISE_KEYS, first.clients[site].advertise_keys().to_bytes())
        assert first.driver.server.stage is Stage.ADVERTISE_KEYS  # waiting for site-c
        await revoke(svc, ADMIN, "site-c")
        await _until(lambda: svc.store.get_study(study_id).status is not StudyStatus.RUNNING, "study ended")
        study = svc.store.get_study(study_id)
        assert study.status is StudyStatus.FAILED
        assert study.reason is not None
        assert study.reason == (
            "round 1: secure aggregation failed at the advertise_keys stage: too_few_sites: "
            "2 sites advertised keys, 3 needed"
        )
        c = task_of(svc.store, first.round.id, "site-c")
        assert (c.status, c.reason) == (TaskStatus.FAILED, REVOKED)
        assert {t.site: t.status for t in svc.store.tasks_of_round(first.round.id)} == {
            "site-a": TaskStatus.TIMED_OUT,
            "site-b": TaskStatus.TIMED_OUT,
            "site-c": TaskStatus.FAILED,
        }

    _run(tmp_path, body)


def test_a_secure_round_reopened_after_a_restart_without_a_site_revoked_meanwhile_fails_naming_it(
    tmp_path: Path,
) -> None:
    # round 1 of a 3-of-3 secure study was open when the orchestrator stopped; site-c was revoked in the
    # database meanwhile: the restarted round cannot be held, and says why at once (not after 600 s)
    signing_key = IdentityKey.generate()

    async def first_life() -> tuple[str, str]:
        async with _service(tmp_path, signing_key) as svc:
            keys = enroll_sites(svc, SITES)
            study_id = await _start_study(svc, _secure_spec(keys, threshold=3, collusion=1))
            return study_id, open_round(svc.store, study_id).id

    study_id, round_id = asyncio.run(first_life())
    db = make_engine(sqlite_url(tmp_path / "state" / "orchestrator.sqlite"))
    assert Store(db).revoke_site("site-c", datetime.now(UTC))
    db.dispose()

    async def second_life() -> None:
        async with _service(tmp_path, signing_key) as svc:
            await _until(lambda: svc.store.get_study(study_id).status is not StudyStatus.RUNNING, "ended")
            study = svc.store.get_study(study_id)
            assert study.status is StudyStatus.FAILED
            assert study.reason is not None
            assert study.reason.startswith("round 1: secure aggregation cannot start: "), study.reason
            assert study.reason.endswith(f" (without site-c: {REVOKED})"), study.reason
            assert svc.store.get_round(round_id).status is RoundStatus.FAILED
            c = task_of(svc.store, round_id, "site-c")
            assert (c.status, c.reason) == (TaskStatus.FAILED, REVOKED)
            assert not any(t.is_open for t in svc.store.tasks_of_round(round_id))

    asyncio.run(second_life())


# --- a collective study and its retries ---------------------------------------------------------------------


def test_a_collective_studys_retries_do_not_wait_for_a_revoked_participant(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        keys = enroll_sites(svc, SITES)
        spec = StudySpec(
            name="gbdt",
            owner="alice",
            dataset="heart",
            recipe=RecipeSpec(name="lightgbm", params={"n_features": 4, "retries": 2}),
            rounds=1,
            train_sites=SITES,
            round_deadline_s=LONG_S,
            secure_aggregation=SecureAggregationSpec(
                site_keys={s: k.public().fingerprint for s, k in keys.items()}, stage_timeout_s=LONG_S
            ),
        )
        study_id = await _start_study(svc, spec)
        first = open_round(svc.store, study_id)
        assert (first.number, first.kind) == (1, TaskKind.COLLECTIVE)
        assert svc.engine.collective.get(first.id) is not None
        await revoke(svc, ADMIN, "site-c")
        await _until(lambda: svc.store.get_study(study_id).status is not StudyStatus.RUNNING, "study ended")
        study = svc.store.get_study(study_id)
        assert study.status is StudyStatus.FAILED
        rounds = svc.store.rounds_of(study_id)
        assert [(r.number, r.status) for r in rounds] == [(n, RoundStatus.FAILED) for n in (1, 2, 3)]
        # the revocation failed the running session at once; each retry's session failed as it opened
        retried = f"collective session failed: site_lost: site-c's task ended ({REVOKED})"
        assert study.reason == f"round 3: {retried}"
        assert rounds[0].reason == (
            "collective session failed: site_lost: site-c was revoked or re-keyed during the session"
        )
        for r in rounds[1:]:
            assert r.reason == retried
        for r in rounds:
            c = task_of(svc.store, r.id, "site-c")
            assert (c.status, c.reason) == (TaskStatus.FAILED, REVOKED)
            assert not any(t.is_open for t in svc.store.tasks_of_round(r.id))
            assert svc.engine.collective.get(r.id) is None  # no session left running
        assert svc.store.open_rounds() == []

    _run(tmp_path, body)
