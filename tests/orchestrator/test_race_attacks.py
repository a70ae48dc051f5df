"""Races against every "at most once" and "atomically" the documents promise (docs/security.md, "Sites",
"Enrollment-token lifecycle", "Limits and retries"; docs/architecture.md, "What a round looks like on the
wire"; docs/governance.md, "Study approval"; docs/privacy.md, the ledger's "one locked database
transaction"), on SQLite and on PostgreSQL: the two competing calls are sent at the same moment from
threads, many times over, and where the scheduler would rarely produce the bad interleaving it is forced
(a statement hook holds one call just after it took its first lock until the other one has taken its own,
or for a short window if the code under test makes it wait).

What is raced here, beside what test_token_attacks (one enrollment token, one challenge, SQLite),
test_api_input_fuzz (two uploads, two registrations, one approval reported at once) and test_ledger /
test_budget_attacks (two reservations at once) already try:

- one enrollment token spent by many enrollments through the route handler, with its audit entry, and an
  enrollment racing the admin's re-issue of the site's token (never an enrolled site with a live token);
- one login challenge spent by many logins, on both databases;
- a round closed by two callers at once (one next round, one model version), and a study cancelled at the
  moment its round closes: the last round (cancelled or completed, never both, never an error) and a middle
  round (a cancelled study keeps no open round nor open task);
- an upload whose study is cancelled while its body streams in (refused, its bytes not kept);
- a study started by its last approval while it is cancelled;
- an API key replaced while a login with the old one is in flight (no token of the old key works after);
- two tasks of two studies reserving the last of one dataset's budget at once through the site's privacy
  gate, and one reservation committed and released at once;
- one secure round claimed for unmasking by two agent processes at once.
"""

# Each racing closure runs, and is joined, within the loop iteration that defined it.
# ruff: noqa: B023

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy import event

from fedhealth.agent import PrivacyGate, TaskContext, TaskRefused
from fedhealth.agent._secure import UnmaskRecord
from fedhealth.core import ConflictError, canonical_json, sha256_hex
from fedhealth.crypto import Audience, IdentityKey
from fedhealth.governance import AuditEventType
from fedhealth.orchestrator import (
    NewRound,
    OrchestratorSettings,
    Store,
    create_app,
    default_extensions,
    make_engine,
    sqlite_url,
    upgrade_database,
)
from fedhealth.orchestrator._auth import Unauthenticated
from fedhealth.orchestrator._db import enrollment_tokens
from fedhealth.orchestrator._http import ApiError
from fedhealth.orchestrator._routes_admin import register_site, reissue_enrollment_token, replace_api_key
from fedhealth.orchestrator._routes_auth import enroll_site
from fedhealth.orchestrator._routes_studies import cancel, submit_study
from fedhealth.orchestrator._routes_tasks import accept_result
from fedhealth.orchestrator._store import ModelVersion, SiteStatus
from fedhealth.privacy import BudgetLedger, ReservationStateError, epsilon, sqlite_engine
from fedhealth.protocol import (
    ApprovalState,
    EnrollRequest,
    PrivacySpec,
    ResultManifest,
    Role,
    RoundStatus,
    SiteCreate,
    SiteMetrics,
    StudySpec,
    StudyStatus,
    Task,
    TaskKind,
    TaskStatus,
    agent_login_message,
)
from fedhealth.runtime import encode_update, param_specs
from fedhealth.runtime._privacy import task_plan
from support import (
    TestClient,
    agent_bearer,
    breast_spec,
    logreg_recipe,
    open_round,
    operator_principal,
    postgres_schema,
    synthetic_recipe,
    task_of,
)

POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres)
DATABASES = ["sqlite", POSTGRES]
T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
DIGEST_IN = "a" * 64
# How long a held call waits for its rival to take a lock that the code under test should make it wait
# for: it never arrives when the code is right, so this is the price of each such round, not a timing bound.
HOLD_S = 0.4


# --- helpers -----------------------------------------------------------------------------------------------


def race(calls: list[Callable[[], Any]], timeout: float = 30.0) -> list[Any]:
    """Run ``calls`` in threads released together; each one's result, or what it raised."""
    out: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        try:
            out[i] = calls[i]()
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,), name=f"racer-{i}") for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a racing call hung"
    return out


class StatementHook:
    """Pause a named thread right after it ran a statement matching a pattern (its lock is then held), until
    another thread ran a statement matching another pattern, or :data:`HOLD_S` passed."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.rules: list[tuple[str, re.Pattern[str], threading.Event, threading.Event | None]] = []
        event.listen(engine, "after_cursor_execute", self._after)

    def after(
        self, thread: str, pattern: str, *, signal: threading.Event, wait: threading.Event | None
    ) -> None:
        self.rules.append((thread, re.compile(pattern, re.I), signal, wait))

    def _after(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        name = threading.current_thread().name
        for thread, pattern, signal, wait in self.rules:
            if thread == name and not signal.is_set() and pattern.search(statement):
                signal.set()
                if wait is not None:
                    wait.wait(HOLD_S)

    def close(self) -> None:
        event.remove(self.engine, "after_cursor_execute", self._after)


# --- the store, on both databases ---------------------------------------------------------------------------


@contextlib.contextmanager
def _database_url(db: str, tmp_path: Path) -> Iterator[str]:
    if db == "sqlite":
        yield sqlite_url(tmp_path / "o.sqlite")
    else:
        with postgres_schema() as url:
            yield url


@pytest.fixture(params=["sqlite", POSTGRES])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with _database_url(request.param, tmp_path) as url:
        engine = make_engine(url)
        upgrade_database(engine)
        try:
            yield Store(engine)
        finally:
            engine.dispose()


def _running_study(
    store: Store, *, rounds: int, kind: TaskKind = TaskKind.TRAIN, sites: tuple[str, ...] = ("a", "b")
) -> tuple[str, str]:
    """A running study whose open round (a training round 1, or its last round: an evaluation) has every
    task completed, ready to close; (study id, round id)."""
    for s in sites:
        if store.get_site_or_none(s) is None:
            store.create_site(s, T0)
    spec = breast_spec(list(sites), rounds=rounds, min_sites=1)
    first = NewRound(number=1, kind=kind, sites=list(sites), model_in_digest=DIGEST_IN, deadline_at=T0)
    study, r = store.create_study(spec=spec, model_digest=DIGEST_IN, state_digest=None, first=first, when=T0)
    assert r is not None
    for t in store.tasks_of_round(r.id):
        assert store.complete_task(
            t.id, digest=None, num_samples=10, metrics=SiteMetrics(num_samples=10), when=T0
        )
    return study.id, r.id


def _out(study_id: str) -> str:
    """The digest of the model a study's round 1 puts out (one per study: versions are keyed by digest)."""
    return sha256_hex(study_id.encode())


def _version(study_id: str) -> ModelVersion:
    return ModelVersion(
        digest=_out(study_id),
        study_id=study_id,
        round=1,
        parent_digest=DIGEST_IN,
        created_at=T0,
        num_sites=2,
        train_loss=0.5,
    )


def _next_round(study_id: str) -> NewRound:
    return NewRound(
        number=2,
        kind=TaskKind.TRAIN,
        sites=["a", "b"],
        model_in_digest=_out(study_id),
        deadline_at=T0 + timedelta(minutes=1),
    )


def test_a_round_closed_by_two_callers_at_once_closes_once_and_opens_one_next_round(store: Store) -> None:
    for _ in range(6):
        study_id, round_id = _running_study(store, rounds=3)

        def close() -> Any:
            return store.finish_round(
                round_id,
                status=RoundStatus.COMPLETED,
                reason=None,
                when=T0,
                model_out=_out(study_id),
                version=_version(study_id),
                next_round=_next_round(study_id),
            )

        outcomes = race([close, close, close])
        opened = [o for o in outcomes if o is not None and not isinstance(o, BaseException)]
        assert len(opened) == 1, outcomes
        assert all(isinstance(o, ConflictError) for o in outcomes if o is not opened[0]), outcomes
        rounds = store.rounds_of(study_id)
        assert [(r.number, r.status) for r in rounds] == [(1, RoundStatus.COMPLETED), (2, RoundStatus.OPEN)]
        assert rounds[1].id == opened[0].id
        assert len(store.tasks_of_round(rounds[1].id)) == 2
        assert [v.round for v in store.model_versions_of(study_id)] == [1]
        assert store.get_study(study_id).completed_rounds == 1


@pytest.mark.parametrize("which", ["last", "middle"])
def test_a_study_cancelled_as_its_round_closes_is_cancelled_or_completed_never_both_nor_an_error(
    store: Store, which: str
) -> None:
    """The round engine closes a round (the study's last: it completes; a middle one: round 2 opens) at the
    moment an operator cancels the study. Forced interleaving: the closing transaction is held just after it
    took the round, until the cancellation took the study (or a short window passes, where the store makes the
    cancellation wait). Each caller gets its documented answer (the cancellation True or False, the closing
    a round or ConflictError), never a database error, and the study ends in one coherent state."""
    for _ in range(4):
        if which == "last":
            study_id, round_id = _running_study(store, rounds=1, kind=TaskKind.EVALUATE)
        else:
            study_id, round_id = _running_study(store, rounds=3)
        round_taken, study_taken = threading.Event(), threading.Event()
        hook = StatementHook(store.engine)
        hook.after("closer", r"^\s*UPDATE rounds", signal=round_taken, wait=study_taken)
        hook.after("canceller", r"^\s*UPDATE studies", signal=study_taken, wait=None)
        out: dict[str, Any] = {}

        def close() -> None:
            try:
                if which == "last":
                    out["close"] = store.finish_round(
                        round_id,
                        status=RoundStatus.COMPLETED,
                        reason=None,
                        when=T0,
                        metrics={},
                        study_status=StudyStatus.COMPLETED,
                    )
                else:
                    out["close"] = store.finish_round(
                        round_id,
                        status=RoundStatus.COMPLETED,
                        reason=None,
                        when=T0,
                        model_out=_out(study_id),
                        version=_version(study_id),
                        next_round=_next_round(study_id),
                    )
            except BaseException as exc:
                out["close"] = exc

        def cancel() -> None:
            round_taken.wait(10)
            try:
                out["cancel"] = store.end_study(study_id, StudyStatus.CANCELLED, "cancelled by rx", T0)
            except BaseException as exc:
                out["cancel"] = exc

        threads = [
            threading.Thread(target=close, name="closer"),
            threading.Thread(target=cancel, name="canceller"),
        ]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        finally:
            hook.close()
        assert not any(t.is_alive() for t in threads), "a call hung"
        assert not isinstance(out["cancel"], BaseException), out
        assert not isinstance(out["close"], BaseException) or isinstance(out["close"], ConflictError), out
        study = store.get_study(study_id)
        rounds = store.rounds_of(study_id)
        open_tasks = [t for t in store.tasks_of_study(study_id) if t.is_open]
        if out["cancel"] is True:
            assert study.status is StudyStatus.CANCELLED
            assert [r for r in rounds if r.status is RoundStatus.OPEN] == []
            assert open_tasks == []
        else:
            assert which == "last", out  # a middle round's close leaves the study running: it cancels
            assert isinstance(out["close"], type(None)), out
            assert study.status is StudyStatus.COMPLETED
            assert [r.status for r in rounds] == [RoundStatus.COMPLETED]
        if isinstance(out["close"], ConflictError):
            assert out["cancel"] is True
            assert rounds[0].status is RoundStatus.FAILED


def test_a_study_started_by_its_last_approval_while_it_is_cancelled_keeps_no_open_round(store: Store) -> None:
    """docs/governance.md, "Study approval": the last approval opens round 1 (start_study) at the moment
    the owner cancels the waiting study (end_study): cancelled with nothing open, or started and then
    cancelled with its round 1 closed; never a running round of a cancelled study."""
    for s in ("a", "b"):
        store.create_site(s, T0)
    for _ in range(8):
        spec = breast_spec(["a", "b"], rounds=2, min_sites=1)
        study, _ = store.create_study(
            spec=spec, model_digest=DIGEST_IN, state_digest=None, first=None, when=T0, spec_hash="c" * 64
        )
        first = NewRound(
            number=1, kind=TaskKind.TRAIN, sites=["a", "b"], model_in_digest=DIGEST_IN, deadline_at=T0
        )
        started, cancelled = race(
            [
                lambda: store.start_study(study.id, first, T0),
                lambda: store.end_study(study.id, StudyStatus.CANCELLED, "cancelled by rx", T0),
            ]
        )
        assert not isinstance(started, BaseException), started
        assert cancelled is True
        assert store.get_study(study.id).status is StudyStatus.CANCELLED
        rounds = store.rounds_of(study.id)
        assert [r for r in rounds if r.status is RoundStatus.OPEN] == []
        assert [t for t in store.tasks_of_study(study.id) if t.is_open] == []
        assert len(rounds) == (0 if started is None else 1)


def test_one_site_reporting_two_decisions_at_once_keeps_one_row_and_no_error(store: Store) -> None:
    """The approval a site reports is recorded once per (site, spec hash): racing reports (the agent and the
    steward's `site approve --home` at the same moment) leave one row, holding one of the reported states."""
    store.create_site("a", T0)
    for i in range(8):
        digest = f"{i:x}".rjust(64, "d")
        states = [ApprovalState.APPROVED, ApprovalState.REJECTED] * 3
        outcomes = race([lambda s=s: store.record_approval("a", digest, s, T0) for s in states])
        assert outcomes == [None] * len(states), outcomes
        with store.engine.connect() as c:
            rows = c.execute(
                sa.text("SELECT state FROM site_approvals WHERE site = 'a' AND spec_hash = :h"), {"h": digest}
            ).all()
        assert len(rows) == 1
        assert ApprovalState(rows[0][0]) in (ApprovalState.APPROVED, ApprovalState.REJECTED)


# --- identity: the service's handlers, on both databases ----------------------------------------------


@pytest.fixture(params=["sqlite", POSTGRES])
def svc(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The orchestrator's service with the default extensions (its signed audit log included), started by
    its app in a test client; the handlers are then called from the test's own threads."""
    with contextlib.ExitStack() as stack:
        url = None if request.param == "sqlite" else stack.enter_context(postgres_schema())
        settings = OrchestratorSettings(
            state_dir=tmp_path / "state", signing_key=IdentityKey.generate(), rate_per_s=0, database_url=url
        )
        app = create_app(settings, extensions=default_extensions())
        client = stack.enter_context(
            TestClient(app, base_url="https://testserver", raise_server_exceptions=False)
        )
        service = app.state.services
        service.test_client = client
        yield service


ADMIN = operator_principal("root", Role.ADMIN)


def _audit(svc: Any, kind: AuditEventType) -> list[dict[str, Any]]:
    with svc.store.engine.connect() as c:
        rows = c.execute(
            sa.text("SELECT payload FROM gov_audit_entries WHERE type = :t ORDER BY seq"), {"t": kind.value}
        ).all()
    return [json.loads(p) for (p,) in rows]


def _enroll(svc: Any, site: str, token: str, key: IdentityKey) -> Any:
    return enroll_site(svc, EnrollRequest(site=site, token=token, public_key=key.public().raw.hex()))


def test_one_enrollment_token_raced_by_many_enrollments_enrolls_one_key_with_one_audit_entry(
    svc: Any,
) -> None:
    """docs/security.md, "Sites" item 2: the token is spent atomically with the registration, and its
    `enrollment` entry is written in the same transaction: one key, one entry, every other attempt a 401."""
    for i in range(4):
        site = f"hospital-{i}"
        token = register_site(svc, ADMIN, SiteCreate(name=site)).enrollment_token
        keys = [IdentityKey.generate() for _ in range(5)]
        outcomes = race([lambda k=k: _enroll(svc, site, token, k) for k in keys])
        won = [k for k, o in zip(keys, outcomes, strict=True) if not isinstance(o, BaseException)]
        assert len(won) == 1, outcomes
        assert all(isinstance(o, Unauthenticated) for o in outcomes if isinstance(o, BaseException)), outcomes
        assert svc.store.get_site(site).public_key == won[0].public().raw.hex()
        entries = [e for e in _audit(svc, AuditEventType.ENROLLMENT) if e["site"] == site]
        assert [e["public_key"] for e in entries] == [won[0].public().raw.hex()]


def test_an_enrollment_racing_the_reissue_of_its_token_never_leaves_an_enrolled_site_a_live_token(
    svc: Any,
) -> None:
    """docs/security.md, "Enrollment-token lifecycle": at most one token is alive per site, and only while
    it has no key. The site enrolls with its token at the moment an admin issues it a new one: either the
    enrollment won (the site is active, the re-issue is refused 409 and no token is left) or the re-issue
    won (the old token is refused 401, the site stays pending with the new one as its only token)."""
    for i in range(6):
        site = f"clinic-{i}"
        token = register_site(svc, ADMIN, SiteCreate(name=site)).enrollment_token
        key = IdentityKey.generate()
        enrolled, reissued = race(
            [lambda: _enroll(svc, site, token, key), lambda: reissue_enrollment_token(svc, ADMIN, site)]
        )
        with svc.store.engine.connect() as c:
            live = c.execute(
                sa.select(enrollment_tokens.c.token_hash).where(
                    enrollment_tokens.c.site == site, enrollment_tokens.c.used_at.is_(None)
                )
            ).all()
        row = svc.store.get_site(site)
        if isinstance(enrolled, BaseException):
            assert isinstance(enrolled, Unauthenticated), enrolled
            assert not isinstance(reissued, BaseException), reissued
            assert row.status is SiteStatus.PENDING
            assert row.public_key is None
            assert len(live) == 1
        else:
            assert isinstance(reissued, ConflictError), reissued
            assert row.status is SiteStatus.ACTIVE
            assert row.public_key == key.public().raw.hex()
            assert live == []


def test_one_login_challenge_signed_once_and_sent_many_times_at_once_yields_one_token(svc: Any) -> None:
    """docs/security.md, "Sites" item 3, on both databases: a challenge is spent before the signature is
    checked, so logins racing with one signed challenge get one token."""
    key, _ = agent_bearer(svc, "racer")
    for _ in range(5):
        challenge, _ = svc.auth.challenge("racer")
        signature = key.sign(canonical_json(agent_login_message("racer", challenge))).hex()
        outcomes = race(
            [lambda: svc.auth.agent_token(site="racer", challenge=challenge, signature_hex=signature)] * 6
        )
        tokens = [o for o in outcomes if isinstance(o, tuple)]
        assert len(tokens) == 1, outcomes
        assert all(isinstance(o, Unauthenticated) for o in outcomes if o is not tokens[0]), outcomes


def test_an_api_key_replaced_while_a_login_with_the_old_one_is_in_flight_leaves_no_working_old_token(
    svc: Any,
) -> None:
    """docs/security.md, "Access tokens are bound to the key they were issued for": a login with the old
    API key that races `user new-key` may get a token, but no such token opens the API once the new key is
    recorded; the new key logs in."""
    old_key = svc.auth.new_user("ana", Role.RESEARCHER)
    for _ in range(6):
        outcomes = race(
            [lambda: svc.auth.operator_token(user="ana", api_key=old_key)] * 3
            + [lambda: replace_api_key(svc, ADMIN, "ana")]
        )
        *logins, replaced = outcomes
        assert not isinstance(replaced, BaseException), replaced
        for login in logins:
            if isinstance(login, BaseException):
                assert isinstance(login, Unauthenticated), login
                continue
            with pytest.raises(Unauthenticated, match="replaced API key"):
                svc.auth.authenticate(f"Bearer {login[0]}", Audience.OPERATOR)
        with pytest.raises(Unauthenticated):
            svc.auth.operator_token(user="ana", api_key=old_key)
        token, _ = svc.auth.operator_token(user="ana", api_key=replaced.api_key)
        assert svc.auth.authenticate(f"Bearer {token}", Audience.OPERATOR).name == "ana"
        old_key = replaced.api_key


# --- an upload and a cancellation -----------------------------------------------------------------------


def test_an_upload_whose_study_is_cancelled_while_its_body_streams_is_refused_and_not_kept(svc: Any) -> None:
    """docs/security.md, "Limits and retries": one result per task, and the loser of a race for a task keeps
    no bytes. The study is cancelled after the upload's checks passed and while its body streams in; when
    the body ends the task is closed already: 409, the task stays failed and no update blob is left."""
    sites = ["up-a", "up-b"]
    for s in sites:
        agent_bearer(svc, s)
    rx = operator_principal("rx", Role.RESEARCHER)
    spec = StudySpec.model_validate(
        {
            "name": "race",
            "owner": "rx",
            "dataset": "none",
            "recipe": synthetic_recipe(16),
            "rounds": 2,
            "train_sites": sites,
            "min_sites": 1,
            "round_deadline_s": 600.0,
        }
    )
    portal = svc.test_client.portal
    for _ in range(3):
        info = portal.call(submit_study, svc, rx, spec)
        for s in sites:
            portal.call(svc.engine.approval_reported, s, info.spec_hash, ApprovalState.APPROVED)
        task = task_of(svc.store, open_round(svc.store, info.study_id).id, sites[0])
        metrics = SiteMetrics(num_samples=10)
        delta = {p.name: np.full(p.shape, 0.01, np.float32) for p in param_specs(spec.recipe)}
        body = encode_update(delta, ResultManifest(task_id=task.id, metrics=metrics))
        blobs = svc.settings.state_dir / "blobs"
        before = {p for p in blobs.rglob("*") if p.is_file()}

        async def attack() -> tuple[Any, Any]:
            streaming, go = asyncio.Event(), asyncio.Event()

            async def chunks() -> Any:
                yield body[: len(body) // 2]
                streaming.set()
                await go.wait()
                yield body[len(body) // 2 :]

            async def upload() -> Any:
                try:
                    return await accept_result(svc, sites[0], task.id, chunks())
                except ApiError as exc:
                    return exc

            running = asyncio.ensure_future(upload())
            await streaming.wait()
            cancelled = await cancel(svc, rx, info.study_id)
            go.set()
            return await running, cancelled

        uploaded, cancelled = portal.call(attack)
        assert isinstance(uploaded, ApiError), uploaded
        assert uploaded.status == 409
        assert cancelled.status is StudyStatus.CANCELLED
        row = svc.store.get_task(task.id)
        assert (row.status, row.result_digest) == (TaskStatus.FAILED, None)
        after = {p for p in blobs.rglob("*") if p.is_file()}
        assert after == before, "the refused upload's bytes were kept"


# --- the site: its privacy ledger and its unmask record, on both databases ------------------------------


@pytest.fixture(params=["sqlite", POSTGRES])
def site_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], sa.Engine]]:
    """A factory of engines on one site database: each racer gets its own, as two agent processes would."""
    engines: list[sa.Engine] = []
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            path = tmp_path / "site.sqlite"

            def new() -> sa.Engine:
                engines.append(sqlite_engine(path))
                return engines[-1]
        else:
            url = stack.enter_context(postgres_schema())

            def new() -> sa.Engine:
                engines.append(sa.create_engine(url))
                return engines[-1]

        try:
            yield new
        finally:
            for e in engines:
                e.dispose()


DATASET = "cohort"
DELTA = 1e-5


def _dp_task(study: str, task_id: str, dataset: str = DATASET) -> TaskContext:
    spec = StudySpec(
        name=study,
        dataset=dataset,
        recipe=logreg_recipe(2),
        rounds=1,
        train_sites=["site-a"],
        privacy=PrivacySpec(
            delta=DELTA, noise_multiplier=1.2, max_grad_norm=1.0, sample_rate=0.1, steps_per_round=8
        ),
    )
    task = Task(
        task_id=task_id,
        study_id=f"st-{study}",
        round=1,
        kind=TaskKind.TRAIN,
        dataset=dataset,
        recipe=spec.recipe,
        model_digest="0" * 64,
        seed=0,
        deadline=datetime.now(UTC),
        spec=spec,
    )
    return TaskContext(task=task, site="site-a")


def test_two_tasks_of_two_studies_charging_the_last_of_a_budget_at_once_charge_it_once(
    site_db: Callable[[], sa.Engine],
) -> None:
    """docs/privacy.md, step 3: the reservation composes, in one locked transaction, with everything spent or
    reserved on the dataset. Two agents on one site database run a task each, of two studies, at once
    (reserve, read, train, commit); the budget has room for one round: one is charged, the other refused
    with budget_exceeded, and the ledger never passes the budget."""
    plan = task_plan(_dp_task("s", "t").task.spec, TaskKind.TRAIN, "site-a")
    one, two = epsilon(plan, delta=DELTA), epsilon(plan + plan, delta=DELTA)
    ledger = BudgetLedger(site_db())
    BudgetLedger.create_schema(ledger._engine)
    for i in range(3):
        dataset = f"cohort-{i}"
        ledger.set_budget(dataset, (one + two) / 2, DELTA)  # room for one round, not two
        gates = [PrivacyGate(site_db()) for _ in range(2)]
        tasks = [_dp_task(f"study-{i}-{j}", f"task-{i}-{j}", dataset) for j in range(2)]

        def run(gate: PrivacyGate, c: TaskContext) -> str:
            try:
                gate.before_data(c)
            except TaskRefused as refused:
                return refused.code
            c.data_read = True
            gate.after_training(c)
            return "charged"

        outcomes = race([lambda g=g, c=c: run(g, c) for g, c in zip(gates, tasks, strict=True)])
        assert sorted(outcomes) == ["budget_exceeded", "charged"], outcomes
        statement = ledger.statement(dataset)
        assert statement.spent_epsilon <= statement.budget_epsilon
        assert [
            (s.committed_tasks, s.reserved_tasks)
            for s in statement.studies
            if s.study_id.startswith(f"st-study-{i}-")
        ] == [(1, 0)]
        assert ledger.pending() == []


def test_one_reservation_committed_and_released_at_once_settles_once(
    site_db: Callable[[], sa.Engine],
) -> None:
    """A reservation settles once: a commit (the task trained) and a release (it never read data) racing
    for it, from two connections, leave exactly one outcome on the ledger and refuse the other."""
    ledger = BudgetLedger(site_db())
    BudgetLedger.create_schema(ledger._engine)
    ledger.set_budget(DATASET, 50.0, DELTA)
    plan = task_plan(_dp_task("s", "t").task.spec, TaskKind.TRAIN, "site-a")
    for i in range(6):
        held = ledger.reserve(DATASET, "st-s", f"settle-{i}", plan)
        a, b = BudgetLedger(site_db()), BudgetLedger(site_db())
        committed, released = race([lambda: a.commit(held, plan), lambda: b.release(held)])
        assert [isinstance(o, ReservationStateError) for o in (committed, released)].count(True) == 1, (
            committed,
            released,
        )
        assert not any(
            isinstance(o, BaseException) and not isinstance(o, ReservationStateError)
            for o in (committed, released)
        )
        assert ledger.pending() == []


def test_one_secure_round_claimed_for_unmasking_by_two_agents_at_once_is_unmasked_once(
    site_db: Callable[[], sa.Engine],
) -> None:
    """docs/security.md, threat model: a site unmasks a (spec, round, kind) once, durably. Two agent
    processes on one site database (each with its own record) claim the same round at once, under two
    attempts of the orchestrator: one claims it, the other is refused already_unmasked."""
    for r in range(1, 5):
        task = _dp_task("secure", f"sec-{r}").task.model_copy(update={"round": r})
        records = [UnmaskRecord(site_db()) for _ in range(3)]
        outcomes = race(
            [lambda rec=rec, i=i: rec.claim(task, f"attempt-{i}") for i, rec in enumerate(records)]
        )
        assert outcomes.count(None) == 1, outcomes
        refused = [o for o in outcomes if o is not None]
        assert all(isinstance(o, TaskRefused) and o.code == "already_unmasked" for o in refused), outcomes
