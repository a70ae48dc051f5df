"""The site's own checks of a secure round against the approved spec (issue 10, findings 2, 3 and 5): no
downgrade to plaintext, a round set-up bound to what the stewards approved (participants, key fingerprints,
threshold, neighbourhood), peers pinned only when the approved spec names them, and the unmask stage
answered at most once per round, durably, across attempts and restarts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from fedhealth.agent import AgentSettings, SiteAgent, SiteHome
from fedhealth.agent._governance import GovernanceGate
from fedhealth.agent._pipeline import TaskRefused
from fedhealth.agent._secure import (
    ALREADY_UNMASKED,
    PEER_KEY_CHANGED,
    PEER_KEY_MISMATCH,
    SECURE_ROUND_MISMATCH,
    SECURE_ROUND_MISSING,
    PeerPins,
    UnmaskRecord,
    check_secure_round,
)
from fedhealth.core import sha256_hex
from fedhealth.crypto import IdentityKey
from fedhealth.orchestrator._secure import round_config
from fedhealth.protocol import (
    SecureAggregationSpec,
    SecureRoundInfo,
    StudySpec,
    Task,
    TaskFailure,
    TaskKind,
    TaskPoll,
    secure_round_plan,
)
from support import synthetic_recipe

SITES = ["site-a", "site-b", "site-c", "site-d", "site-e", "site-f"]
ME = "site-a"
KEYS = {s: IdentityKey.generate() for s in [*SITES, "sybil"]}


def _hex(site: str) -> str:
    return KEYS[site].public().raw.hex()


def _spec(**secure: object) -> StudySpec:
    fields: dict[str, object] = {"site_keys": {s: KEYS[s].public().fingerprint for s in SITES}}
    fields.update(secure)
    return StudySpec(
        name="secure",
        dataset="none",
        recipe=synthetic_recipe(10),
        rounds=2,
        train_sites=SITES,
        min_sites=2,
        secure_aggregation=SecureAggregationSpec.model_validate(fields),
    )


def _task(
    spec: StudySpec,
    *,
    kind: TaskKind = TaskKind.TRAIN,
    round_number: int = 1,
    config: dict | None = None,
    peers: dict[str, str] | None = None,
    secure: bool = True,
    study_id: str = "study-1",
    attempt: str = "a1",
) -> Task:
    """The task an honest orchestrator sends (``round_config``, the enrolled keys), unless overridden."""
    info = None
    if secure:
        honest = round_config(
            spec, kind, study_id=study_id, number=round_number, attempt=attempt, sites=SITES
        ).to_json()
        info = SecureRoundInfo(
            config={**honest, **(config or {})},
            peer_keys=peers if peers is not None else {s: _hex(s) for s in SITES},
            attempt=attempt,
        )
    return Task(
        task_id=f"t-{kind.value}-{round_number}",
        study_id=study_id,
        round=round_number,
        kind=kind,
        dataset="none",
        recipe=spec.recipe,
        model_digest="0" * 64,
        seed=spec.seed,
        deadline=datetime.now(UTC) + timedelta(minutes=5),
        spec=spec,
        secure_round=info,
    )


def _refusal(task: Task, pins: PeerPins | None = None) -> TaskRefused:
    with pytest.raises(TaskRefused) as caught:
        check_secure_round(task, ME, KEYS[ME], pins or PeerPins(None))
    return caught.value


# --- the round the orchestrator sets up -------------------------------------------------------------------


def test_the_honest_orchestrators_round_passes_the_checks_and_follows_the_spec():
    spec = _spec()
    checked = check_secure_round(_task(spec), ME, KEYS[ME], PeerPins(None))
    assert checked is not None
    plan = secure_round_plan(spec, TaskKind.TRAIN)
    assert checked.config.sites == tuple(SITES)
    assert (checked.config.threshold, plan.threshold, plan.collusion) == (5, 5, 2)  # 2t > n + c: 10 > 8
    assert set(checked.peers) == set(SITES)


def test_a_round_over_fewer_sites_keeps_the_threshold_of_the_spec_site_list():
    spec = _spec()
    config = round_config(spec, TaskKind.TRAIN, study_id="study-1", number=1, attempt="a1", sites=SITES[:5])
    assert config.threshold == secure_round_plan(spec, TaskKind.TRAIN).threshold == 5
    # the threshold stays 5 of the spec's 6 sites, not 4 of 5
    task = _task(spec, config={"sites": SITES[:5]}, peers={s: _hex(s) for s in SITES[:5]})
    assert check_secure_round(task, ME, KEYS[ME], PeerPins(None)) is not None


@pytest.mark.parametrize(
    ("config", "what"),
    [
        # a lower threshold (with a collusion bound low enough for SecAggConfig to accept it): fewer sites
        # would suffice to unmask
        ({"threshold": 4, "collusion": 0}, "threshold"),
        ({"threshold": 4}, "configuration"),  # 2t > n + c fails: SecAggConfig itself refuses
        ({"threshold": 6}, "threshold"),  # the site accepts only the spec's, whatever the direction
        ({"full_graph_max_sites": 2, "neighbourhood_size": 4}, "neighbourhood size"),
        ({"graph_seed": "11" * 32}, "configuration"),  # the sites' adverts seed the graph, not the server
        ({"collusion": 0}, "collusion bound"),
        ({"round": 2}, "study or round"),
        ({"study_id": "another-study/a1"}, "study or round"),
        ({"vector_length": 11}, "vector length"),
    ],
)
def test_a_round_whose_settings_differ_from_the_approved_spec_is_refused_before_any_key(config, what):
    refusal = _refusal(_task(_spec(), config=config))
    assert refusal.code == SECURE_ROUND_MISMATCH
    assert what in refusal.reason


def test_a_sybil_site_added_to_the_round_is_refused_and_never_pinned(tmp_path):
    spec = _spec()
    pins = PeerPins(tmp_path / "peers.json")
    sites = sorted([*SITES, "sybil"])
    task = _task(spec, config={"sites": sites}, peers={s: _hex(s) for s in sites})
    refusal = _refusal(task, pins)
    assert refusal.code == SECURE_ROUND_MISMATCH
    assert "participant" in refusal.reason
    assert not (tmp_path / "peers.json").exists()
    # handed to the pins directly, an unknown peer is refused there too, and nothing is written
    with pytest.raises(TaskRefused) as caught:
        pins.check({"sybil": _hex("sybil")}, spec.secure_aggregation.site_keys)
    assert caught.value.code == PEER_KEY_MISMATCH
    assert pins.fingerprints() == {}


def test_a_peer_key_substituted_by_the_orchestrator_is_refused():
    peers = {s: _hex(s) for s in SITES}
    peers["site-c"] = _hex("sybil")  # the orchestrator's own key in site-c's place
    refusal = _refusal(_task(_spec(), peers=peers))
    assert refusal.code == PEER_KEY_MISMATCH
    assert "site-c" in refusal.reason


def test_a_spec_naming_another_key_for_this_site_is_refused():
    keys = {s: KEYS[s].public().fingerprint for s in SITES}
    keys[ME] = sha256_hex(b"not my key")
    refusal = _refusal(_task(_spec(site_keys=keys)))
    assert refusal.code == PEER_KEY_MISMATCH


def test_a_malformed_configuration_is_refused_as_a_mismatch():
    refusal = _refusal(_task(_spec(), config={"threshold": "three"}))
    assert refusal.code == SECURE_ROUND_MISMATCH


# --- finding 2: no downgrade ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [TaskKind.TRAIN, TaskKind.EVALUATE])
def test_a_secure_studys_task_without_its_secure_round_is_refused(kind):
    refusal = _refusal(_task(_spec(), kind=kind, secure=False))
    assert refusal.code == SECURE_ROUND_MISSING


class RecordingClient:
    """Stands in for the orchestrator: records whatever the agent sends."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.failures: list[TaskFailure] = []

    def get_model(
        self, digest: str, *, max_elapsed_s: float | None = None, max_bytes: int | None = None
    ) -> bytes:
        self.sent.append("model download")
        raise AssertionError("the model must not be fetched for a refused task")

    def upload_result(self, task_id: str, body: bytes, *, max_elapsed_s: float | None = None) -> None:
        self.sent.append("result")

    def upload_evaluation(
        self, task_id: str, manifest: object, *, max_elapsed_s: float | None = None
    ) -> None:
        self.sent.append("evaluation")

    def report_failure(
        self, task_id: str, failure: TaskFailure, *, max_elapsed_s: float | None = None
    ) -> None:
        self.failures.append(failure)

    def next_task(self, wait: float) -> TaskPoll:  # pragma: no cover - the tests call handle() directly
        raise AssertionError("not polled")

    def close(self) -> None:
        pass


@pytest.mark.parametrize("kind", [TaskKind.TRAIN, TaskKind.EVALUATE])
def test_the_agent_sends_nothing_in_clear_for_a_secure_study_whose_task_lost_its_round(kind, tmp_path):
    client = RecordingClient()
    agent = SiteAgent(AgentSettings(orchestrator_url="https://x", site=ME, identity=KEYS[ME]), client=client)
    agent.handle(_task(_spec(), kind=kind, secure=False))
    assert client.sent == []  # no upload, no evaluation in clear, not even the model fetched
    assert [f.code for f in client.failures] == [SECURE_ROUND_MISSING]
    assert "sends nothing in clear" in client.failures[0].reason


# --- peer pinning -----------------------------------------------------------------------------------------


def test_pins_are_kept_in_the_site_home_and_a_changed_key_is_refused_even_if_a_spec_approves_it(tmp_path):
    path = tmp_path / "peers.json"
    approved = {s: KEYS[s].public().fingerprint for s in SITES}
    PeerPins(path).check({s: _hex(s) for s in SITES}, approved)
    assert json.loads(path.read_text()) == {s: _hex(s) for s in SITES}
    reopened = PeerPins(path)  # after an agent restart
    assert reopened.fingerprints() == approved
    rekeyed = {**approved, "site-b": KEYS["sybil"].public().fingerprint}  # a later spec with a new key
    with pytest.raises(TaskRefused) as caught:
        reopened.check({"site-b": _hex("sybil")}, rekeyed)
    assert caught.value.code == PEER_KEY_CHANGED
    assert json.loads(path.read_text())["site-b"] == _hex("site-b")  # the pin is untouched


def test_pins_refuse_a_key_that_does_not_hash_to_the_approved_fingerprint_and_pin_nothing(tmp_path):
    pins = PeerPins(tmp_path / "peers.json")
    approved = {s: KEYS[s].public().fingerprint for s in SITES}
    with pytest.raises(TaskRefused) as caught:
        pins.check({"site-a": _hex("site-a"), "site-b": _hex("sybil")}, approved)
    assert caught.value.code == PEER_KEY_MISMATCH
    assert pins.fingerprints() == {}
    with pytest.raises(TaskRefused):
        pins.check({"site-a": "zz"}, approved)  # not even a key


# --- finding 5: unmask once -------------------------------------------------------------------------------


def test_a_round_is_unmasked_at_most_once_across_attempts_and_restarts(tmp_path):
    database = tmp_path / "site.sqlite"
    spec = _spec()
    record = UnmaskRecord.at(database)
    record.claim(_task(spec, attempt="a1"), "a1")
    with pytest.raises(TaskRefused) as caught:  # attempt B of the same round, same process
        record.claim(_task(spec, attempt="b2"), "b2")
    assert caught.value.code == ALREADY_UNMASKED
    record.close()
    restarted = UnmaskRecord.at(database)  # the agent restarted: the record is on disk
    with pytest.raises(TaskRefused):
        restarted.claim(_task(spec, attempt="c3"), "c3")
    # a second study id for the same approved spec is the same computation to the site
    with pytest.raises(TaskRefused):
        restarted.claim(_task(spec, study_id="study-2"), "d4")
    # the next round and the evaluation round are other rounds
    restarted.claim(_task(spec, round_number=2), "a1")
    restarted.claim(_task(spec, kind=TaskKind.EVALUATE, round_number=3), "a1")
    restarted.close()


def test_without_a_site_home_the_unmask_record_still_holds_for_the_process():
    record = UnmaskRecord.at(None)
    record.claim(_task(_spec()), "a1")
    with pytest.raises(TaskRefused):
        record.claim(_task(_spec(), attempt="b2"), "b2")


@pytest.mark.parametrize(
    ("policy", "code"),
    [("require_secure_aggregation = true\n", "require_secure_aggregation"), ("", SECURE_ROUND_MISSING)],
)
def test_the_site_policy_counts_a_task_without_its_secure_round_as_not_secure(tmp_path, policy, code):
    home = SiteHome(tmp_path / "home")
    home.root.mkdir()
    KEYS[ME].save(home.identity_path)
    home.settings_path.write_text(
        json.dumps({"site": ME, "orchestrator": "https://x", "enrolled_at": "2026-01-01"})
    )
    home.policy_path.write_text(policy)
    gate = GovernanceGate.from_home(home)
    spec = _spec()
    gate.governance.approve(spec, reason="approved", steward="steward")
    client = RecordingClient()
    agent = SiteAgent(
        AgentSettings(orchestrator_url="https://x", site=ME, identity=KEYS[ME], home=home.root),
        client=client,
        gates=[gate],
    )
    agent.handle(_task(spec, secure=False))
    assert client.sent == []
    assert [f.code for f in client.failures] == [code]
    gate.governance.close()
