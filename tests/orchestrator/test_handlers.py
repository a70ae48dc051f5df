"""The orchestrator's route handlers called as plain functions of an :class:`OrchestratorService`, without
HTTP: the real store (SQLite), blob store and round engine, the default extensions, and bad input (an unknown
task, another site's task, a malformed update, a replayed or changed result, a wrong role) refused with the
status the API answers and nothing lost. The same routes over real HTTPS are in tests/e2e."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from fastapi import APIRouter

from fedhealth.core import ConflictError, InputError, NotFoundError
from fedhealth.crypto import IdentityKey
from fedhealth.governance import SignedSpec
from fedhealth.orchestrator import (
    ExtensionContext,
    NullObserver,
    OrchestratorService,
    OrchestratorSettings,
    Registration,
    StudyRow,
    create_app,
    default_extensions,
    start_service,
)
from fedhealth.orchestrator._auth import Forbidden
from fedhealth.orchestrator._governance import (
    GovernanceExtension,
    OwnerKeyBody,
    SignedStudyBody,
    register_signing_key,
    submit_signed_study,
)
from fedhealth.orchestrator._http import ApiError
from fedhealth.orchestrator._routes_admin import add_user, register_site, revoke, revoke_account, rotate
from fedhealth.orchestrator._routes_auth import enroll_site
from fedhealth.orchestrator._routes_models import released_model, study_model, task_model
from fedhealth.orchestrator._routes_secure import accept_secagg_message
from fedhealth.orchestrator._routes_sites import accept_approval, accept_readiness, pending_specs
from fedhealth.orchestrator._routes_studies import cancel, submit_study
from fedhealth.orchestrator._routes_tasks import accept_evaluation, accept_failure, accept_result, poll_task
from fedhealth.protocol import (
    Ack,
    ApprovalReport,
    ApprovalState,
    EnrollRequest,
    FailureCode,
    ResultManifest,
    Role,
    SecureAggregationSpec,
    SiteCreate,
    SiteMetrics,
    SiteReadiness,
    StudyInfo,
    StudySpec,
    StudyStatus,
    Task,
    TaskFailure,
    TaskStatus,
    UserCreate,
)
from fedhealth.runtime import encode_update, param_specs
from support import operator_principal, running_service, synthetic_recipe

SITES = ["site-a", "site-b"]


ADMIN = operator_principal("admin", Role.ADMIN)
RESEARCHER = operator_principal("alice", Role.RESEARCHER)
OTHER_RESEARCHER = operator_principal("bob", Role.RESEARCHER)


def _spec(owner: str = "alice", min_sites: int = 1) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "handlers",
            "owner": owner,
            "dataset": "none",
            "recipe": synthetic_recipe(16),
            "rounds": 2,
            "train_sites": SITES,
            "min_sites": min_sites,
            "round_deadline_s": 600.0,
            "seed": 3,
        }
    )


def _update(task: Task, fill: float = 0.01, task_id: str | None = None) -> bytes:
    delta = {s.name: np.full(s.shape, fill, dtype=np.float32) for s in param_specs(task.recipe)}
    manifest = ResultManifest(task_id=task_id or task.task_id, metrics=SiteMetrics(num_samples=10))
    return encode_update(delta, manifest)


async def _running_study(
    svc: OrchestratorService, spec: StudySpec | None = None
) -> tuple[StudyInfo, dict[str, Task]]:
    """A study both sites approved, and each site's first task."""
    info = await submit_study(svc, RESEARCHER, spec or _spec())
    assert info.status is StudyStatus.AWAITING_APPROVAL
    assert info.spec_hash is not None
    for site in SITES:
        assert [p.study_id for p in pending_specs(svc, site).specs] == [info.study_id]
        assert (
            await accept_approval(
                svc, site, ApprovalReport(spec_hash=info.spec_hash, state=ApprovalState.APPROVED)
            )
            == Ack()
        )
    tasks = {}
    for site in SITES:
        polled = await poll_task(svc, site, wait=0)
        assert polled.task is not None
        tasks[site] = polled.task
    return info, tasks


def _run(tmp_path: Path, body: Callable[[OrchestratorService], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running_service(tmp_path, SITES) as svc:
            await body(svc)

    asyncio.run(main())


def test_a_round_runs_through_the_handlers_alone(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        info, tasks = await _running_study(svc)
        assert svc.store.get_study(info.study_id).status is StudyStatus.RUNNING
        for site, task in tasks.items():
            assert await accept_result(svc, site, task.task_id, _update(task)) == Ack()
        # both results in: round 1 closed, round 2 open, each site polls its next task
        study = svc.store.get_study(info.study_id)
        assert study.completed_rounds == 1
        nxt = await poll_task(svc, "site-a", wait=0)
        assert nxt.task is not None
        assert nxt.task.round == 2
        model = study_model(svc, RESEARCHER, info.study_id)
        assert released_model(svc, ADMIN, model.digest) == model
        assert task_model(svc, "site-a", nxt.task.model_digest) == model.data

    _run(tmp_path, body)


def test_an_unknown_task_is_404_for_every_task_handler(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        await _running_study(svc)
        with pytest.raises(NotFoundError, match="does not exist"):
            await accept_result(svc, "site-a", "no-such-task", b"anything")
        manifest = ResultManifest(task_id="no-such-task", metrics=SiteMetrics(num_samples=1))
        with pytest.raises(NotFoundError):
            await accept_evaluation(svc, "site-a", "no-such-task", manifest)
        with pytest.raises(NotFoundError):
            await accept_failure(svc, "site-a", "no-such-task", TaskFailure(code=FailureCode.INVALID_TASK))

    _run(tmp_path, body)


def test_another_sites_task_is_refused_and_left_open(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        _, tasks = await _running_study(svc)
        theirs = tasks["site-b"]
        for attempt in (
            accept_result(svc, "site-a", theirs.task_id, _update(theirs)),
            accept_failure(svc, "site-a", theirs.task_id, TaskFailure(code=FailureCode.INVALID_TASK)),
        ):
            with pytest.raises(ApiError) as refused:
                await attempt
            assert (refused.value.status, refused.value.error) == (403, "this task belongs to another site")
        with pytest.raises(ApiError) as refused:
            accept_secagg_message(svc, "site-a", theirs.task_id, "advertise_keys", b"x", None)
        assert refused.value.status == 403
        assert svc.store.get_task(theirs.task_id).is_open  # nothing another site sent touched it
        # the model of a task is the site's own to read, with the same 404 as for no model at all
        with pytest.raises(ApiError) as hidden:
            task_model(svc, "site-a", "0" * 64)
        assert hidden.value.status == 404

    _run(tmp_path, body)


def test_a_malformed_update_rejects_the_task_and_the_round_goes_on(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        info, tasks = await _running_study(svc)
        task = tasks["site-a"]
        with pytest.raises(ApiError) as refused:
            await accept_result(svc, "site-a", task.task_id, b"not a safetensors file")
        assert (refused.value.status, refused.value.error) == (422, "invalid update")
        row = svc.store.get_task(task.task_id)
        assert row.status is TaskStatus.REJECTED
        assert row.reason
        # a rejected task takes no second upload; the other site's result still completes the round
        with pytest.raises(ApiError) as closed:
            await accept_result(svc, "site-a", task.task_id, _update(task))
        assert closed.value.status == 409
        other = tasks["site-b"]
        assert await accept_result(svc, "site-b", other.task_id, _update(other)) == Ack()
        assert svc.store.get_study(info.study_id).completed_rounds == 1

    _run(tmp_path, body)


def test_an_update_naming_another_task_is_rejected(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        _, tasks = await _running_study(svc)
        task = tasks["site-a"]
        with pytest.raises(ApiError) as refused:
            await accept_result(svc, "site-a", task.task_id, _update(task, task_id=tasks["site-b"].task_id))
        assert refused.value.detail == "the result manifest names another task"
        assert svc.store.get_task(task.task_id).status is TaskStatus.REJECTED

    _run(tmp_path, body)


def test_a_replayed_result_is_acknowledged_once_and_a_changed_one_refused(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        _, tasks = await _running_study(svc)
        task = tasks["site-a"]
        update = _update(task)

        async def chunks() -> AsyncIterator[bytes]:  # as a body arrives over HTTP, in pieces
            for start in range(0, len(update), 1000):
                yield update[start : start + 1000]

        assert await accept_result(svc, "site-a", task.task_id, chunks()) == Ack()
        stored = svc.store.get_task(task.task_id)
        assert await accept_result(svc, "site-a", task.task_id, update) == Ack(detail="already stored")
        with pytest.raises(ApiError) as changed:
            await accept_result(svc, "site-a", task.task_id, _update(task, fill=0.5))
        assert (changed.value.status, changed.value.error) == (
            409,
            "a different result was already stored for this task",
        )
        assert svc.store.get_task(task.task_id).result_digest == stored.result_digest

    _run(tmp_path, body)


def test_an_evaluation_for_a_training_task_and_a_late_failure_change_nothing(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        _, tasks = await _running_study(svc)
        task = tasks["site-a"]
        manifest = ResultManifest(task_id=task.task_id, metrics=SiteMetrics(num_samples=1))
        with pytest.raises(ApiError) as wrong_kind:
            await accept_evaluation(svc, "site-a", task.task_id, manifest)
        assert wrong_kind.value.status == 409
        assert await accept_result(svc, "site-a", task.task_id, _update(task)) == Ack()
        # a failure reported after the result is acknowledged and ignored: the result stays
        assert (
            await accept_failure(svc, "site-a", task.task_id, TaskFailure(code=FailureCode.INVALID_TASK))
            == Ack()
        )
        assert svc.store.get_task(task.task_id).status is TaskStatus.COMPLETED

    _run(tmp_path, body)


def test_a_secure_message_for_a_plain_round_is_gone(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        _, tasks = await _running_study(svc)
        with pytest.raises(ApiError) as gone:
            accept_secagg_message(svc, "site-a", tasks["site-a"].task_id, "advertise_keys", b"x", None)
        assert (gone.value.status, gone.value.error) == (410, "no secure round is running for this task")

    _run(tmp_path, body)


def test_a_secure_rounds_messages_follow_its_open_tasks_without_a_database_read(tmp_path: Path) -> None:
    sites = ["site-a", "site-b", "site-c"]

    async def main() -> None:
        settings = OrchestratorSettings(state_dir=tmp_path / "state", signing_key=IdentityKey.generate())
        svc = await start_service(settings, default_extensions())
        try:
            keys = {}
            for site in sites:
                created = register_site(svc, ADMIN, SiteCreate(name=site))
                identity = IdentityKey.generate().public()
                token = created.enrollment_token
                enroll_site(svc, EnrollRequest(site=site, token=token, public_key=identity.raw.hex()))
                keys[site] = identity.fingerprint
            spec = _spec().model_copy(
                update={
                    "train_sites": sites,
                    "min_sites": 2,
                    "secure_aggregation": SecureAggregationSpec(site_keys=keys, collusion=0, threshold=2),
                }
            )
            info = await submit_study(svc, RESEARCHER, spec)
            assert info.spec_hash is not None
            for site in sites:
                report = ApprovalReport(spec_hash=info.spec_hash, state=ApprovalState.APPROVED)
                await accept_approval(svc, site, report)
            tasks = {}
            for site in sites:
                polled = await poll_task(svc, site, wait=0)
                assert polled.task is not None
                assert polled.task.secure_round is not None
                tasks[site] = polled.task.task_id
            # while the round runs, its driver answers who owns a task: no task is read per message
            real_get_task = svc.store.get_task
            svc.store.get_task = lambda task_id: pytest.fail(f"read task {task_id}")  # type: ignore[method-assign]
            with pytest.raises(ApiError) as theirs:
                accept_secagg_message(svc, "site-b", tasks["site-a"], "advertise_keys", b"x", None)
            assert theirs.value.status == 403
            with pytest.raises(InputError):  # the round's server saw it: a malformed message
                accept_secagg_message(svc, "site-b", tasks["site-b"], "advertise_keys", b"x", None)
            svc.store.get_task = real_get_task  # type: ignore[method-assign]
            # a task closed mid-round (its site reported a failure) is gone; the round goes on for the others
            failure = TaskFailure(code=FailureCode.INVALID_TASK)
            assert await accept_failure(svc, "site-a", tasks["site-a"], failure) == Ack()
            with pytest.raises(ApiError) as gone:
                accept_secagg_message(svc, "site-a", tasks["site-a"], "advertise_keys", b"x", None)
            assert (gone.value.status, gone.value.error) == (410, "no secure round is running for this task")
            assert svc.engine.secure.by_task(tasks["site-c"]) is not None
        finally:
            await svc.close()

    asyncio.run(main())


def test_operator_handlers_refuse_wrong_principals_and_bad_input(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        with pytest.raises(ApiError) as not_owner:
            await submit_study(svc, OTHER_RESEARCHER, _spec(owner="alice"))
        assert not_owner.value.status == 422
        info, _ = await _running_study(svc)
        with pytest.raises(Forbidden):
            await cancel(svc, OTHER_RESEARCHER, info.study_id)
        with pytest.raises(Forbidden):
            study_model(svc, OTHER_RESEARCHER, info.study_id)
        with pytest.raises(ApiError) as unreleased:
            study_model(svc, RESEARCHER, info.study_id)
        assert unreleased.value.status == 404
        with pytest.raises(InputError):
            released_model(svc, ADMIN, "../../etc/passwd")
        with pytest.raises(ApiError) as site_user:
            add_user(svc, ADMIN, UserCreate(name="s", role=Role.SITE))
        assert site_user.value.status == 422
        add_user(svc, ADMIN, UserCreate(name="root", role=Role.ADMIN))
        with pytest.raises(ApiError) as self_revoke:
            revoke_account(svc, operator_principal("root", Role.ADMIN), "root")
        assert (self_revoke.value.status, self_revoke.value.error) == (
            409,
            "an admin cannot revoke their own account",
        )
        assert svc.store.get_user("root").revoked_at is None
        with pytest.raises(ApiError) as nobody:
            revoke_account(svc, ADMIN, "nobody")
        assert nobody.value.status == 404
        with pytest.raises(ConflictError):
            register_site(svc, ADMIN, SiteCreate(name="site-a"))
        cancelled = await cancel(svc, RESEARCHER, info.study_id)
        assert cancelled.status is StudyStatus.CANCELLED
        with pytest.raises(ApiError) as again:
            await cancel(svc, RESEARCHER, info.study_id)
        assert again.value.status == 409

    _run(tmp_path, body)


def test_a_site_reports_its_own_readiness_only(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        report = SiteReadiness(
            site="site-b",
            checked_at=datetime.now(UTC),
            software_version="1",
            protocol_version=1,
            ready=True,
            checks=[],
        )
        with pytest.raises(ApiError) as refused:
            accept_readiness(svc, "site-a", report)
        assert refused.value.status == 403
        assert svc.store.readiness().get("site-a") is None

    _run(tmp_path, body)


# --- extensions: registered explicitly, owning their routes and state ------------------------------------


class _Recorder(NullObserver):
    def __init__(self) -> None:
        self.created: list[str] = []

    def study_created(self, study: StudyRow, owner: str) -> None:
        self.created.append(study.id)


class _SigningExtension:
    """A test extension: an observer, a signature source and a route of its own."""

    def __init__(self) -> None:
        self.recorder: _Recorder | None = None
        self.started_with: ExtensionContext | None = None

    def start(self, context: ExtensionContext) -> Registration:
        self.started_with = context
        self.recorder = _Recorder()
        return Registration(observer=self.recorder, spec_signatures=lambda study_id: ("ab" * 32, "cd" * 32))

    def routers(self) -> list[APIRouter]:
        router = APIRouter()

        @router.get("/api/v1/test-extension")
        async def hello() -> dict[str, str]:
            return {"hello": "extension"}

        return [router]


def test_an_extension_registers_its_observer_signatures_and_routes(tmp_path: Path) -> None:
    extension = _SigningExtension()

    async def main() -> None:
        async with running_service(tmp_path, SITES, [extension]) as svc:
            assert extension.started_with is not None
            assert extension.started_with.store is svc.store
            assert extension.recorder in svc.engine.observers
            info = await submit_study(svc, RESEARCHER, _spec())
            assert extension.recorder is not None
            assert extension.recorder.created == [info.study_id]
            (pending,) = pending_specs(svc, "site-a").specs
            assert (pending.spec_signature, pending.owner_public_key) == ("ab" * 32, "cd" * 32)

    asyncio.run(main())
    settings = OrchestratorSettings(state_dir=tmp_path / "app", signing_key=IdentityKey.generate())
    paths = create_app(settings, extensions=[extension]).openapi()["paths"]
    assert "/api/v1/test-extension" in paths
    assert "/api/v1/agent/tasks/{task_id}/result" in paths  # beside the core routes


def test_without_governance_specs_go_unsigned_and_its_routes_say_it_is_off(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_service(tmp_path, SITES, []) as svc:
            info = await submit_study(svc, RESEARCHER, _spec())
            (pending,) = pending_specs(svc, "site-a").specs
            assert pending.study_id == info.study_id
            assert pending.spec_signature is None

    asyncio.run(main())
    with pytest.raises(ApiError) as off:
        _ = GovernanceExtension().observer  # never started: its routes answer 404, not a crash
    assert off.value.status == 404


def test_a_signed_study_is_checked_against_the_owners_key_and_its_signature_reaches_the_sites(
    tmp_path: Path,
) -> None:
    governance = GovernanceExtension()
    key, other = IdentityKey.generate(), IdentityKey.generate()
    spec = _spec()
    signed = SignedSpec.sign(spec.model_dump(mode="json"), owner="alice", key=key)
    good = SignedStudyBody(spec=spec, signature=signed.signature.hex())
    by_another_key = SignedSpec.sign(spec.model_dump(mode="json"), owner="alice", key=other)
    forged = SignedStudyBody(spec=spec, signature=by_another_key.signature.hex())

    async def main() -> None:
        async with running_service(tmp_path, SITES, [governance]) as svc:
            observer = governance.observer
            with pytest.raises(ApiError) as no_key:
                await submit_signed_study(svc, observer, RESEARCHER, good)
            assert no_key.value.status == 409
            mine = OwnerKeyBody(public_key=key.public().raw.hex())
            assert register_signing_key(observer, RESEARCHER, mine)["fingerprint"] == key.public().fingerprint
            with pytest.raises(ApiError) as second:
                register_signing_key(observer, RESEARCHER, OwnerKeyBody(public_key=other.public().raw.hex()))
            assert second.value.status == 409
            with pytest.raises(ApiError) as bad:
                await submit_signed_study(svc, observer, RESEARCHER, forged)
            assert (bad.value.status, bad.value.error) == (422, "invalid study signature")
            with pytest.raises(ApiError) as not_owner:
                await submit_signed_study(svc, observer, OTHER_RESEARCHER, good)
            assert not_owner.value.status == 422
            assert svc.store.list_studies(None) == []  # nothing refused was stored
            info = await submit_signed_study(svc, observer, RESEARCHER, good)
            (pending,) = pending_specs(svc, "site-b").specs
            assert pending.study_id == info.study_id
            assert pending.spec_signature == good.signature
            assert pending.owner_public_key == key.public().raw.hex()

    asyncio.run(main())


async def _closed(svc: OrchestratorService, task_id: str) -> TaskStatus:
    """The task's status once it closed (a round opened over a revoked site closes its task just after)."""
    for _ in range(200):
        task = svc.store.get_task(task_id)
        if not task.is_open:
            return task.status
        await asyncio.sleep(0.01)
    raise AssertionError(f"task {task_id} is still open")


def test_a_revoked_site_fails_its_open_tasks_at_once_and_later_rounds_go_on_without_it(
    tmp_path: Path,
) -> None:
    # docs/security.md, Sites item 4: a revoked site never answers again, so its rounds must not wait for it
    # until their deadline (600 s here) in this round and in every later one its spec still names it
    async def body(svc: OrchestratorService) -> None:
        info, tasks = await _running_study(svc)
        assert await accept_result(svc, "site-a", tasks["site-a"].task_id, _update(tasks["site-a"])) == Ack()
        assert svc.store.get_study(info.study_id).completed_rounds == 0  # waiting for site-b
        await revoke(svc, ADMIN, "site-b")
        first = svc.store.get_task(tasks["site-b"].task_id)
        assert first.status is TaskStatus.FAILED
        assert first.reason == "site_revoked: the site was revoked by an admin"
        assert svc.store.get_study(info.study_id).completed_rounds == 1  # closed at once, without site-b
        for number in (2, 3):  # round 2 (training), round 3 (evaluation): site-b's task fails as it opens
            (r,) = [x for x in svc.store.open_rounds() if x.study_id == info.study_id]
            assert r.number == number
            (b_task,) = [t for t in svc.store.tasks_of_round(r.id) if t.site == "site-b"]
            assert await _closed(svc, b_task.id) is TaskStatus.FAILED
            polled = await poll_task(svc, "site-a", wait=0)
            assert polled.task is not None
            if number == 2:
                assert await accept_result(svc, "site-a", polled.task.task_id, _update(polled.task)) == Ack()
            else:
                manifest = ResultManifest(task_id=polled.task.task_id, metrics=SiteMetrics(num_samples=10))
                assert await accept_evaluation(svc, "site-a", polled.task.task_id, manifest) == Ack()
        study = svc.store.get_study(info.study_id)
        assert study.status is StudyStatus.COMPLETED, study.reason
        assert study.completed_rounds == 2

    _run(tmp_path, body)


def test_a_re_keyed_site_keeps_its_open_task_which_it_may_still_finish(tmp_path: Path) -> None:
    # control: a rotation is not a revocation (the site enrolls its new key and goes on)
    async def body(svc: OrchestratorService) -> None:
        info, tasks = await _running_study(svc)
        rotate(svc, ADMIN, "site-b")
        await asyncio.sleep(0.2)
        assert svc.store.get_task(tasks["site-b"].task_id).is_open
        assert svc.store.get_study(info.study_id).completed_rounds == 0

    _run(tmp_path, body)


def test_revoking_a_site_the_quorum_needs_fails_the_study_at_once_naming_it(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        info, tasks = await _running_study(svc, _spec(min_sites=2))
        assert await accept_result(svc, "site-a", tasks["site-a"].task_id, _update(tasks["site-a"])) == Ack()
        await revoke(svc, ADMIN, "site-b")
        study = svc.store.get_study(info.study_id)
        assert study.status is StudyStatus.FAILED
        assert study.reason is not None
        assert "quorum not met" in study.reason
        assert "site-b: failed (site_revoked: the site was revoked by an admin)" in study.reason

    _run(tmp_path, body)
