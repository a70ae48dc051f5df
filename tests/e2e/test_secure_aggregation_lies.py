"""A malicious orchestrator against real site agents (issue 10, findings 2 and 3).

The agents reach the orchestrator through :class:`support.LyingOrchestrator`, an HTTPS proxy serving the
orchestrator's own certificate, which rewrites the tasks they receive: it strips the secure round from a
secure study's task (a downgrade to plaintext), lowers the threshold, adds a sybil site with its own key,
or substitutes a peer's key. Each time every site refuses before it advertises a key, reads data or sends
anything in clear, says why in a failure code, and pins nothing it was not approved to pin.
"""

from __future__ import annotations

import json

import pytest

from fedhealth.crypto import IdentityKey
from fedhealth.protocol import SecureAggregationSpec, StudyStatus, Task, TaskKind, TaskStatus
from fedhealth.sim import LocalFederation
from support import BREAST_SITES, LyingOrchestrator, breast_spec

pytestmark = pytest.mark.e2e
SITES = ["hospital-a", "hospital-b", "hospital-c"]
SYBIL = IdentityKey.generate()  # a key the orchestrator holds: a site it enrolled itself


@pytest.fixture(scope="module")
def lying(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("lies")) as fed:
        fed.start_orchestrator()
        with LyingOrchestrator(fed) as proxy:
            for site in SITES:
                fed.add_site(site)
                fed.start_agent(site, {"breast-cancer": BREAST_SITES[site]}, orchestrator_url=proxy.url)
            fed.wait_for_sites(SITES)
            yield fed, proxy


def _spec(fed, name, **kwargs):
    return breast_spec(
        SITES,
        rounds=1,
        name=name,
        min_sites=2,
        round_deadline_s=60,
        secure_aggregation=SecureAggregationSpec(stage_timeout_s=30.0, site_keys=fed.site_keys(SITES)),
        **kwargs,
    )


def _run(fed, proxy, name, rewrite, *, kind=TaskKind.TRAIN):
    """Run a one-round study with ``rewrite`` applied to its tasks of ``kind``; the study's final state."""
    spec = _spec(fed, name)

    def lie(task: Task) -> Task:
        return rewrite(task) if task.spec.name == name and task.kind is kind else task

    before = len(proxy.requests)
    proxy.rewrite_task = lie  # before the study exists: its first task may reach a site at once
    try:
        study = fed.create_study(spec)
        final = fed.wait_for_study(study.study_id, timeout=120)
    finally:
        proxy.rewrite_task = None
    return final, proxy.requests[before:]


def _lied_round(final, kind):
    return next(r for r in final.rounds if r.kind is kind)


def _with_config(task: Task, **changes: object) -> Task:
    info = task.secure_round
    assert info is not None
    return task.model_copy(
        update={"secure_round": info.model_copy(update={"config": {**info.config, **changes}})}
    )


@pytest.mark.parametrize("kind", [TaskKind.TRAIN, TaskKind.EVALUATE])
def test_a_secure_studys_task_stripped_of_its_secure_round_gets_nothing_in_clear(lying, kind):
    fed, proxy = lying
    final, requests = _run(
        fed,
        proxy,
        f"downgrade-{kind.value}",
        lambda task: task.model_copy(update={"secure_round": None}),
        kind=kind,
    )
    assert final.status is StudyStatus.FAILED
    lied = _lied_round(final, kind)
    assert [t.status for t in lied.tasks] == [TaskStatus.FAILED] * len(SITES)
    assert all(t.reason.startswith("secure_round_missing: ") for t in lied.tasks), [
        t.reason for t in lied.tasks
    ]
    # nothing was uploaded in clear: no result, no evaluation, no metric, by any site
    sent = {(m, p.rsplit("/", 1)[-1]) for m, p in requests if m == "POST"}
    assert ("POST", "result") not in sent
    assert ("POST", "evaluation") not in sent
    assert all(t.metrics is None for r in final.rounds for t in r.tasks)
    if kind is TaskKind.EVALUATE:  # the training round before it ran securely, through the same proxy
        assert final.rounds[0].status.value == "completed"


def test_a_round_with_a_lowered_threshold_is_refused_by_every_site(lying):
    fed, proxy = lying
    # 3 sites, c = 1: the spec's threshold is 3; the orchestrator says 2 with no colluders (2t > n + c holds
    # for that configuration, so only the comparison with the approved spec catches it)
    final, requests = _run(
        fed, proxy, "low-threshold", lambda task: _with_config(task, threshold=2, collusion=0)
    )
    assert final.status is StudyStatus.FAILED
    tasks = _lied_round(final, TaskKind.TRAIN).tasks
    assert all(t.reason.startswith("secure_round_mismatch: ") for t in tasks), [t.reason for t in tasks]
    assert not [p for m, p in requests if "/secagg/" in p]  # no key was advertised


def test_a_sybil_site_added_to_the_round_is_refused_and_never_pinned(lying):
    fed, proxy = lying

    def add_sybil(task: Task) -> Task:
        info = task.secure_round
        assert info is not None
        sites = sorted([*info.config["sites"], "sybil"])
        keys = {**info.peer_keys, "sybil": SYBIL.public().raw.hex()}
        return task.model_copy(
            update={
                "secure_round": info.model_copy(
                    update={"config": {**info.config, "sites": sites}, "peer_keys": keys}
                )
            }
        )

    final, requests = _run(fed, proxy, "sybil", add_sybil)
    tasks = _lied_round(final, TaskKind.TRAIN).tasks
    assert all(t.reason.startswith("secure_round_mismatch: ") for t in tasks), [t.reason for t in tasks]
    assert not [p for m, p in requests if "/secagg/" in p]
    for site in SITES:
        pins = fed.site_home(site).root / "peers.json"
        assert not pins.exists() or "sybil" not in json.loads(pins.read_text())


def test_a_peer_key_substituted_by_the_orchestrator_is_refused(lying):
    fed, proxy = lying

    def substitute(task: Task) -> Task:
        info = task.secure_round
        assert info is not None
        keys = {**info.peer_keys, "hospital-c": SYBIL.public().raw.hex()}
        return task.model_copy(update={"secure_round": info.model_copy(update={"peer_keys": keys})})

    final, requests = _run(fed, proxy, "substituted-key", substitute)
    tasks = {t.site: t for t in _lied_round(final, TaskKind.TRAIN).tasks}
    assert tasks["hospital-a"].reason.startswith("peer_key_mismatch: ")
    assert tasks["hospital-b"].reason.startswith("peer_key_mismatch: ")
    assert tasks["hospital-c"].reason.startswith("peer_key_mismatch: ")  # its own key is not its own
    assert not [p for m, p in requests if "/secagg/" in p]


def test_through_an_honest_proxy_the_secure_study_completes(lying):
    fed, proxy = lying
    study = fed.create_study(_spec(fed, "honest"))
    final = fed.wait_for_study(study.study_id, timeout=120)
    assert final.status is StudyStatus.COMPLETED, final.reason
    assert proxy.paths("POST", "/secagg/unmask")  # the stages went through the proxy
    assert not proxy.paths("POST", "/result")
