"""Crash consistency of a site's own state: the agent is killed (power loss, OOM kill, Ctrl-C) at a chosen
step, then a new agent starts on the same home, as a restart would, and the site's guarantees still hold.

A crash is simulated by raising ``KeyboardInterrupt`` or ``SystemExit`` (never a ``FedHealthError``) at that
step, so the agent's own error handling for a failed task does not run; where only a dead process shows it
(a transaction cut by SIGKILL), a child process kills itself mid-write.

- the privacy budget (docs/privacy.md, "Crashes never under-count"): a reservation left by a crash counts in
  full and is listed at start-up, the task is never run again under its id, a crash after the commit is not
  charged twice, a crash inside the reservation's transaction writes nothing, and no sequence of crashes
  spends beyond the budget;
- unmask once (docs/secure-aggregation.md): the record is durable before the shares leave, so a site killed
  while revealing refuses the unmask stage of the same round's next attempt;
- peers.json: a crash while pinning leaves the previous pins whole, and a torn pin file is refused at start,
  never read as "no pins";
- the site's audit log (docs/governance.md): a crash mid-append leaves a chain that verifies, and the next
  entry continues it;
- SCAFFOLD's site state and results.jsonl: a crash mid-write leaves the previous state, and a torn record
  neither swallows the next record nor lets the federated-scaling check pass unchecked.
- a power cut right after an atomic rename (pins, SCAFFOLD's state, every private file): the folder is
  synced after the rename, so the new version is the one on disk.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from site_fixtures import SITE, agent, approve, make_home, task
from test_federated_scaling_site import DATASETS as SCALING_DATASETS
from test_federated_scaling_site import SCALING
from test_federated_scaling_site import spec_of as scaling_spec_of

import fedhealth.agent._agent as agent_module
import fedhealth.core._files as files_module
import fedhealth.privacy._ledger as ledger_module
from fedhealth.agent import AgentSettings, SiteAgent
from fedhealth.agent._governance import SiteGovernance
from fedhealth.agent._pipeline import TaskRefused
from fedhealth.agent._secure import PEER_KEY_CHANGED, PeerPins, UnmaskRecord
from fedhealth.agent._site_state import SiteStateStore
from fedhealth.core import encode_tensors, sha256_hex
from fedhealth.crypto import IdentityKey
from fedhealth.governance import AuditEventType, AuditLog
from fedhealth.orchestrator._secure import round_config
from fedhealth.privacy import BudgetLedger, DpPlan, DpSgdRelease, epsilon, sqlite_engine
from fedhealth.protocol import (
    FailureCode,
    PrivacySpec,
    SecureAggregationSpec,
    SecureRoundInfo,
    StudySpec,
    Task,
    TaskFailure,
    TaskKind,
    TaskPoll,
)
from fedhealth.runtime import initial_model
from fedhealth.secagg import SecAggClient, SecAggConfig, SecAggServer, decode_message
from support import logreg_recipe, synthetic_recipe

DELTA = 1e-5
SIGMA, Q, STEPS = 1.0, 0.2, 3
ONE_ROUND = DpPlan.of(DpSgdRelease(noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS))


def one_round_epsilon(k: int = 1) -> float:
    return epsilon(DpPlan(releases=ONE_ROUND.releases * k), delta=DELTA)


def write_csv(path: Path) -> Path:
    rows = [f"p{i:04d},{i % 7 / 3:.3f},{i % 5 - 2},{i % 2}" for i in range(200)]
    path.write_text("patient_id,age,marker,label\n" + "\n".join(rows) + "\n")
    return path


def dp_spec(name: str = "dp-study", rounds: int = 1) -> StudySpec:
    return StudySpec(
        name=name,
        dataset="cohort",
        recipe=logreg_recipe(2, learning_rate=0.5),
        rounds=rounds,
        train_sites=[SITE],
        privacy=PrivacySpec(
            delta=DELTA, noise_multiplier=SIGMA, max_grad_norm=1.0, sample_rate=Q, steps_per_round=STEPS
        ),
    )


def ledger(home) -> BudgetLedger:
    engine = sqlite_engine(home.database_path)
    BudgetLedger.create_schema(engine)
    return BudgetLedger(engine)


def audit_verifies(home) -> None:
    with SiteGovernance(home) as governance:
        report = governance.log.verify()
        assert report.ok, report.summary()


@pytest.fixture
def site(tmp_path):
    home = make_home(tmp_path / "site")
    ledger(home).set_budget("cohort", 5.0, DELTA)
    return home


@pytest.fixture
def cohort(tmp_path) -> dict[str, str]:
    return {"cohort": f"file://{write_csv(tmp_path / 'cohort.csv')}?label=label&id=patient_id"}


class Killed(KeyboardInterrupt):
    """The agent process dies here (an operator's Ctrl-C, or any kill the agent's handlers do not see)."""


def kill(*_args: object, **_kwargs: object) -> None:
    raise Killed


def exit_now(*_args: object, **_kwargs: object) -> None:
    raise SystemExit(1)  # sys.exit from a signal handler, say: not an error the agent handles


# --- the privacy budget -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    ["model", "training"],
    ids=["killed-before-the-data-was-read", "killed-while-training-on-the-rows"],
)
def test_a_reservation_left_by_a_crash_counts_in_full_is_listed_at_restart_and_never_runs_again(
    site, cohort, where, monkeypatch, caplog
):
    spec = dp_spec()
    approve(site, spec)
    first, client = agent(site, cohort)
    with monkeypatch.context() as m:
        if where == "model":
            m.setattr(SiteAgent, "_model", kill)
        else:
            m.setattr(agent_module, "train_on_site", kill)
        with pytest.raises(Killed):
            first.handle(task(spec))
    assert client.failures == []  # the process died: nothing reported
    assert client.results == []
    [pending] = ledger(site).pending("cohort")
    assert pending.task_id == "tk-1"
    # the restart lists the reservation, counts it in full, and never runs the task under its id again
    caplog.set_level(logging.WARNING, logger="fedhealth.agent")
    restarted, client = agent(site, cohort)
    assert "never settled" in caplog.text
    assert pending.reservation_id in caplog.text
    restarted.handle(task(spec))
    assert [f.code for f in client.failures] == [FailureCode.BUDGET_ALREADY_CHARGED]
    assert client.results == []
    statement = ledger(site).statement("cohort")
    assert statement.spent_epsilon == pytest.approx(one_round_epsilon(1))
    assert [(s.committed_tasks, s.reserved_tasks) for s in statement.studies] == [(0, 1)]
    # the orchestrator's rerun under a new id is charged on top of the attempt that never settled
    restarted.handle(task(spec, task_id="tk-2"))
    assert [r.task_id for r in client.results] == ["tk-2"]
    assert ledger(site).spent("cohort") == pytest.approx(one_round_epsilon(2))
    audit_verifies(site)


def test_no_sequence_of_crashes_and_restarts_spends_beyond_the_budget(tmp_path, cohort, monkeypatch):
    home = make_home(tmp_path / "site")
    # exactly two rounds fit
    ledger(home).set_budget("cohort", (one_round_epsilon(2) + one_round_epsilon(3)) / 2, DELTA)
    spec = dp_spec()
    approve(home, spec)
    trained: list[str] = []

    def train_then_die(t: Task, *_args: object, **_kwargs: object) -> None:
        trained.append(t.task_id)
        raise Killed

    monkeypatch.setattr(agent_module, "train_on_site", train_then_die)
    refused: list[FailureCode] = []
    for attempt in range(4):  # the orchestrator re-runs the round under a new id after each crash
        site_agent, client = agent(home, cohort)
        try:
            site_agent.handle(task(spec, task_id=f"tk-{attempt}"))
        except Killed:
            continue
        refused += [f.code for f in client.failures]
    assert trained == ["tk-0", "tk-1"]  # the rows were trained on twice; the third attempt never got them
    assert refused == [FailureCode.BUDGET_EXCEEDED, FailureCode.BUDGET_EXCEEDED]
    statement = ledger(home).statement("cohort")
    assert statement.spent_epsilon == pytest.approx(one_round_epsilon(2))
    assert statement.spent_epsilon <= statement.budget_epsilon


def test_a_crash_after_the_commit_while_uploading_is_not_charged_twice_nor_released_twice(
    site, cohort, monkeypatch
):
    spec = dp_spec()
    approve(site, spec)
    first, client = agent(site, cohort)
    monkeypatch.setattr(client, "upload_result", kill)
    with pytest.raises(Killed):
        first.handle(task(spec))
    assert ledger(site).pending("cohort") == []  # committed before the update left
    assert ledger(site).spent("cohort") == pytest.approx(one_round_epsilon(1))
    restarted, client = agent(site, cohort)
    restarted.handle(task(spec))  # the orchestrator hands the same task out again
    assert [f.code for f in client.failures] == [FailureCode.BUDGET_ALREADY_CHARGED]
    assert client.results == []  # no second release of the rows with fresh noise
    statement = ledger(site).statement("cohort")
    assert statement.spent_epsilon == pytest.approx(one_round_epsilon(1))
    assert [(s.committed_tasks, s.reserved_tasks) for s in statement.studies] == [(1, 0)]
    audit_verifies(site)


def test_a_crash_inside_the_reservations_transaction_writes_nothing_and_leaves_no_lock(
    site, cohort, monkeypatch
):
    spec = dp_spec()
    approve(site, spec)
    first, client = agent(site, cohort)
    with monkeypatch.context() as m:
        m.setattr(ledger_module, "_in_reservation_window", exit_now)
        with pytest.raises(SystemExit):
            first.handle(task(spec))
    # nothing was reserved (the transaction rolled back), so nothing is pending and nothing is spent
    assert ledger(site).pending("cohort") == []
    assert ledger(site).spent("cohort") == 0.0
    restarted, client = agent(site, cohort)  # the database is not left locked
    restarted.handle(task(spec))
    assert [r.task_id for r in client.results] == ["tk-1"]
    statement = ledger(site).statement("cohort")
    assert [(s.committed_tasks, s.reserved_tasks) for s in statement.studies] == [(1, 0)]
    assert statement.spent_epsilon == pytest.approx(one_round_epsilon(1))


# --- unmask once ------------------------------------------------------------------------------------------

ME = "site-a"
PEERS = ["site-b", "site-c"]
KEYS = {s: IdentityKey.generate() for s in [ME, *PEERS]}


def secure_spec() -> StudySpec:
    return StudySpec(
        name="secure",
        dataset="none",
        recipe=synthetic_recipe(10),
        rounds=3,
        train_sites=[ME, *PEERS],
        min_sites=2,
        secure_aggregation=SecureAggregationSpec(
            site_keys={s: k.public().fingerprint for s, k in KEYS.items()}
        ),
    )


def secure_task(spec: StudySpec, *, round_number: int, attempt: str) -> Task:
    config = round_config(
        spec, TaskKind.TRAIN, study_id="study-1", number=round_number, attempt=attempt, sites=[ME, *PEERS]
    )
    blob = encode_tensors(initial_model(spec.recipe, spec.seed))
    return Task(
        task_id=f"t-{round_number}-{attempt}",
        study_id="study-1",
        round=round_number,
        kind=TaskKind.TRAIN,
        dataset="none",
        recipe=spec.recipe,
        model_digest=sha256_hex(blob),
        model_inline=base64.b64encode(blob).decode(),
        seed=spec.seed,
        deadline=datetime.now(UTC) + timedelta(minutes=5),
        spec=spec,
        secure_round=SecureRoundInfo(
            config=config.to_json(),
            peer_keys={s: k.public().raw.hex() for s, k in KEYS.items()},
            attempt=attempt,
        ),
    )


class SecureRoundOrchestrator:
    """Stands in for the orchestrator in one attempt of a secure round: a real ``SecAggServer`` and the two
    peers' real clients, in memory; ``die_at`` kills the site's process when it sends that stage."""

    def __init__(self, t: Task, *, die_at: str | None = None) -> None:
        assert t.secure_round is not None
        self.config = SecAggConfig.from_json(t.secure_round.config)
        publics = {s: k.public() for s, k in KEYS.items()}
        self.server = SecAggServer(self.config)
        self.peers = {s: SecAggClient(self.config, s, KEYS[s], publics) for s in PEERS}
        self.answers: dict[str, object] = {}
        self.received: list[str] = []  # the stages the site under test got through to the orchestrator
        self.failures: list[TaskFailure] = []
        self.die_at = die_at

    def secagg_send(self, task_id: str, stage: str, body: bytes, **_kwargs: object) -> bytes | None:
        if stage == self.die_at:
            raise Killed  # the process dies while the message is on its way: it may or may not have left
        self.server.receive(decode_message(body))  # type: ignore[arg-type]
        self.received.append(stage)
        for s, peer in self.peers.items():
            if stage == "advertise_keys":
                message = peer.advertise_keys()
            elif stage == "share_keys":
                message = peer.share_keys(self.answers[s])  # type: ignore[arg-type]
            elif stage == "masked_input":
                zeros = np.zeros(self.config.vector_length, dtype=np.uint32)
                message = peer.masked_input(self.answers[s], zeros)  # type: ignore[arg-type]
            elif stage == "consistency":
                message = peer.consistency(self.answers[s])  # type: ignore[arg-type]
            else:
                message = peer.unmask(self.answers[s])  # type: ignore[arg-type]
            self.server.receive(message)
        self.answers = self.server.close_stage()  # type: ignore[assignment]
        if stage == "unmask":
            return None
        return self.answers[ME].to_bytes()  # type: ignore[attr-defined]

    def report_failure(self, task_id: str, failure: TaskFailure, **_kwargs: object) -> None:
        self.failures.append(failure)

    def next_task(self, wait: float) -> TaskPoll:  # pragma: no cover - the tests call handle() directly
        raise AssertionError("not polled")

    def close(self) -> None:
        pass


def secure_agent(home: Path, orchestrator: SecureRoundOrchestrator) -> SiteAgent:
    settings = AgentSettings(orchestrator_url="https://x.invalid", site=ME, identity=KEYS[ME], home=home)
    return SiteAgent(settings, client=orchestrator)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "die", ["after-the-record", "while-sending-the-shares"], ids=["killed-after-recording", "killed-sending"]
)
def test_a_site_killed_while_unmasking_refuses_the_unmask_stage_of_the_rounds_next_attempt(
    tmp_path, die, monkeypatch
):
    home = tmp_path / "site"
    home.mkdir(mode=0o700)
    spec = secure_spec()
    first = secure_task(spec, round_number=1, attempt="a1")
    orchestrator = SecureRoundOrchestrator(
        first, die_at="unmask" if die == "while-sending-the-shares" else None
    )
    if die == "after-the-record":
        claim = UnmaskRecord.claim

        def claim_then_die(self: UnmaskRecord, t: Task, attempt: str) -> None:
            claim(self, t, attempt)
            raise Killed  # the record is committed; the shares were about to be built and sent

        monkeypatch.setattr(UnmaskRecord, "claim", claim_then_die)
    with pytest.raises(Killed):
        secure_agent(home, orchestrator).handle(first)
    assert "unmask" not in orchestrator.received
    monkeypatch.undo()
    # the orchestrator restarts the round (a new attempt, fresh keys) over the same sites; the agent restarts
    retry = secure_task(spec, round_number=1, attempt="a2")
    orchestrator = SecureRoundOrchestrator(retry)
    secure_agent(home, orchestrator).handle(retry)
    assert [f.code for f in orchestrator.failures] == [FailureCode.ALREADY_UNMASKED]
    assert "unmask" not in orchestrator.received  # no share of this round left the site a second time
    assert "consistency" in orchestrator.received  # (it got that far: the refusal is the unmask record's)
    # the control: a round the site never unmasked goes through to its unmask stage
    other = secure_task(spec, round_number=2, attempt="a2")
    orchestrator = SecureRoundOrchestrator(other)
    secure_agent(home, orchestrator).handle(other)
    assert orchestrator.failures == []
    assert orchestrator.received[-1] == "unmask"


# --- peers.json -------------------------------------------------------------------------------------------


def _pin_args(*sites: str) -> tuple[dict[str, str], dict[str, str]]:
    return (
        {s: KEYS[s].public().raw.hex() for s in sites},
        {s: KEYS[s].public().fingerprint for s in KEYS},
    )


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_crash_while_pinning_a_new_peer_leaves_the_previous_pins_whole(tmp_path, step, monkeypatch):
    path = tmp_path / "peers.json"
    PeerPins(path).check(*_pin_args("site-b"))
    before = path.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(files_module.os, step, kill)
        with pytest.raises(Killed):
            PeerPins(path).check(*_pin_args("site-b", "site-c"))
    assert path.read_bytes() == before
    # a kill the process could not clean up after leaves its temporary file too: it is not the pin file
    (tmp_path / ".peers.json.abc123.tmp").write_text('{"site-b": "')
    restarted = PeerPins(path)
    assert restarted.fingerprints() == {"site-b": KEYS["site-b"].public().fingerprint}
    # the pin survived: a swapped key for site-b is refused, even under a spec that approves the new key
    swapped = IdentityKey.generate()
    with pytest.raises(TaskRefused) as refused:
        restarted.check({"site-b": swapped.public().raw.hex()}, {"site-b": swapped.public().fingerprint})
    assert refused.value.code == PEER_KEY_CHANGED


@pytest.mark.parametrize("torn", ["", '{"site-b": "ab', "\x00" * 64], ids=["empty", "cut", "zeroed"])
def test_a_torn_pin_file_stops_the_agent_at_start_and_is_never_read_as_no_pins(tmp_path, torn):
    home = tmp_path / "site"
    home.mkdir(mode=0o700)
    (home / "peers.json").write_text(torn)
    settings = AgentSettings(orchestrator_url="https://x.invalid", site=ME, identity=KEYS[ME], home=home)
    with pytest.raises(ValueError):
        SiteAgent(
            settings, client=SecureRoundOrchestrator(secure_task(secure_spec(), round_number=1, attempt="a"))
        )  # type: ignore[arg-type]


# --- the site's audit log ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True], ids=["single-append", "inside-a-batch"])
def test_a_crash_mid_append_leaves_a_log_that_verifies_and_the_next_entry_continues_it(
    tmp_path, batched, monkeypatch
):
    home = make_home(tmp_path / "site")
    with SiteGovernance(home) as governance:
        governance.log.append(AuditEventType.TASK_RECEIVED, {"task_id": "t0", "study_id": "s"})
        head = governance.log.head()
        append_on = AuditLog._append_on

        def insert_then_die(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            append_on(self, *args, **kwargs)
            raise Killed  # the row is inserted, the transaction not committed

        monkeypatch.setattr(AuditLog, "_append_on", insert_then_die)

        def append() -> None:
            if batched:
                with governance.log.batch():
                    governance.log.append(AuditEventType.TASK_RECEIVED, {"task_id": "t1", "study_id": "s"})
            else:
                governance.log.append(AuditEventType.TASK_RECEIVED, {"task_id": "t1", "study_id": "s"})

        with pytest.raises(Killed):
            append()
        monkeypatch.undo()
    with SiteGovernance(home) as restarted:
        report = restarted.log.verify()
        assert report.ok, report.summary()
        assert report.head.seq in (head.seq, head.seq + 1)  # the entry is whole or absent, never half
        entry = restarted.log.append(AuditEventType.TASK_RECEIVED, {"task_id": "t2", "study_id": "s"})
        assert entry.seq == report.head.seq + 1
        assert entry.prev_hash == report.head.entry_hash
        assert restarted.log.verify().ok


_KILLED_MID_APPEND = """
import os, signal, sys
from pathlib import Path
from fedhealth.agent import SiteHome
from fedhealth.agent._governance import SiteGovernance
from fedhealth.governance import AuditEventType, AuditLog

append_on = AuditLog._append_on

def insert_then_die(self, *args, **kwargs):
    append_on(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # no handler, no rollback, no close: the process is gone

governance = SiteGovernance(SiteHome(Path(sys.argv[1])))
AuditLog._append_on = insert_then_die
with governance.log.batch():
    governance.log.append(AuditEventType.TASK_RECEIVED, {"task_id": "t1", "study_id": "s"})
    governance.log.append(AuditEventType.TASK_RECEIVED, {"task_id": "t2", "study_id": "s"})
"""


def test_an_agent_process_killed_mid_append_leaves_a_log_that_verifies(tmp_path):
    home = make_home(tmp_path / "site")
    with SiteGovernance(home) as governance:
        head = governance.log.head()
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_APPEND, str(home.root)], capture_output=True, timeout=120
    )
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    with SiteGovernance(home) as restarted:
        report = restarted.log.verify()
        assert report.ok, report.summary()
        assert report.head == head  # the uncommitted entry is gone whole
        entry = restarted.log.append(AuditEventType.TASK_RECEIVED, {"task_id": "t3", "study_id": "s"})
        assert entry.seq == head.seq + 1
        assert restarted.log.verify().ok


def test_the_sites_audit_entries_are_on_disk_before_their_head_leaves_for_the_orchestrator(tmp_path):
    """A power cut cannot be simulated in a process; what decides it is SQLite's ``synchronous`` setting. In
    WAL mode ``NORMAL`` commits without syncing the WAL, so a power cut can take back the last entries after
    their head went out in an attestation: the restarted site writes other entries under the same numbers, a
    fork of the head the orchestrator anchored. ``FULL`` syncs every commit, as the ledger's and the unmask
    record's connections to the same file already do."""
    home = make_home(tmp_path / "site")
    with SiteGovernance(home) as governance, governance.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    engine = sqlite_engine(home.database_path)  # the ledger's and the unmask record's connections
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    engine.dispose()


# --- SCAFFOLD's site state --------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_crash_while_saving_the_site_state_leaves_the_previous_rounds_state(tmp_path, step, monkeypatch):
    root = tmp_path / "recipe-state"
    before = {"c": np.full(4, 1.0, dtype=np.float32)}
    after = {"c": np.full(4, 2.0, dtype=np.float32)}
    SiteStateStore(root).save("study-1", 1, before)
    with monkeypatch.context() as m:
        m.setattr(os, step, kill)
        with pytest.raises(Killed):
            SiteStateStore(root).save("study-1", 2, after)
    # and a kill mid-write leaves a torn partial file behind, which is not a state
    [folder] = root.iterdir()
    (folder / ".round-2.partial").write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"c": {')
    restarted = SiteStateStore(root)
    loaded = restarted.load("study-1", 2)
    assert loaded is not None
    assert np.array_equal(loaded["c"], before["c"])
    loaded = restarted.load("study-1", 3)  # the next round starts from the last state written whole
    assert loaded is not None
    assert np.array_equal(loaded["c"], before["c"])
    restarted.save("study-1", 2, after)  # the rerun writes its state over the torn file
    loaded = SiteStateStore(root).load("study-1", 3)
    assert loaded is not None
    assert np.array_equal(loaded["c"], after["c"])


# --- a power cut after a rename ---------------------------------------------------------------------------


class DiskWrites:
    """Records the renames and the fsyncs (of files and of folders) that a write makes, in order: what a
    power cut keeps is what was fsynced, and a renamed file's new name is kept only once its folder is."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[tuple[str, str]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            target = os.readlink(f"/proc/self/fd/{fd}")
            self.events.append(("fsync-folder" if os.path.isdir(target) else "fsync-file", target))
            real_fsync(fd)

        def replace(src, dst) -> None:
            real_replace(src, dst)
            self.events.append(("rename", os.path.realpath(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def synced_after_rename(self, path: Path) -> bool:
        """Whether ``path``'s folder was fsynced after the last rename onto ``path``."""
        target = os.path.realpath(path)
        renames = [i for i, event in enumerate(self.events) if event == ("rename", target)]
        assert renames, f"no rename onto {path}: {self.events}"
        folder = os.path.dirname(target)
        return ("fsync-folder", folder) in self.events[renames[-1] + 1 :]


def test_a_new_pin_and_a_new_site_state_outlive_a_power_cut_after_their_rename(tmp_path, monkeypatch):
    """The pin of a new peer and a SCAFFOLD round's state are written beside the file and renamed over it;
    without an fsync of the folder after the rename the new name may not be on disk at a power cut, and the
    restarted site finds the previous pins (the new peer unpinned, its key taken afresh under the next spec)
    or the previous round's state."""
    disk = DiskWrites(monkeypatch)
    pins = tmp_path / "peers.json"
    PeerPins(pins).check(*_pin_args("site-b"))
    assert disk.synced_after_rename(pins)

    root = tmp_path / "recipe-state"
    SiteStateStore(root).save("study-1", 1, {"c": np.full(4, 1.0, dtype=np.float32)})
    [state] = root.rglob("round-1.safetensors")
    assert disk.synced_after_rename(state)


def test_every_private_file_written_atomically_has_its_name_synced(tmp_path, monkeypatch):
    """`write_private_file` (pins, the site's private exports, model cards, onboarding packs) makes the
    rename durable too, both when it replaces a file and when it places a new one beside others."""
    disk = DiskWrites(monkeypatch)
    target = tmp_path / "out.json"
    target.write_text("old")
    files_module.write_private_file(target, b"new")
    assert disk.synced_after_rename(target)
    assert target.read_bytes() == b"new"
    linked = tmp_path / "fresh.json"
    files_module.write_private_file(linked, b"fresh", overwrite=False)
    assert linked.read_bytes() == b"fresh"
    assert ("fsync-folder", os.path.realpath(tmp_path)) == disk.events[-1]


# --- results.jsonl ----------------------------------------------------------------------------------------


def test_the_first_results_record_is_durable_with_its_name(tmp_path, monkeypatch):
    """results.jsonl holds the pre-step's "joined" mark and release: created by its first record, its name
    must reach the disk with the data, or a power cut loses the whole file and the restarted site finds no
    record of a session it took part in."""
    home = make_home(tmp_path / "home")
    spec = scaling_spec_of(home)
    site, _ = agent(home, SCALING_DATASETS)
    disk = DiskWrites(monkeypatch)
    site._record(task(spec, kind=TaskKind.COLLECTIVE, round=0), {"collective_calls": 1})
    results = os.path.realpath(home.root / "results.jsonl")
    assert disk.events.index(("fsync-file", results)) < disk.events.index(
        ("fsync-folder", os.path.realpath(home.root))
    )
    disk.events.clear()
    site._record(task(spec, kind=TaskKind.COLLECTIVE, round=0), {"collective_calls": 2})
    assert disk.events == [("fsync-file", results)]  # an append to a known file syncs the file alone


def torn_record(home) -> str:
    """What a crash mid-append leaves at the end of results.jsonl: the start of a record, no newline."""
    whole = json.dumps(
        {
            "time": "2026-01-01T00:00:00+00:00",
            "study_id": "st-1",
            "study": "hd-federated",
            "round": 0,
            "kind": "collective",
            "metrics": {"federated_scaling": {"kind": "federated-scaling", "mean": [0.5] * 13}},
        }
    )
    torn = whole[: len(whole) // 2]
    with open(home.root / "results.jsonl", "a") as f:
        f.write(torn)
    return torn


def test_a_record_torn_by_a_crash_does_not_swallow_the_next_one_nor_the_scaling_check(tmp_path):
    home = make_home(tmp_path / "home")
    spec = scaling_spec_of(home)
    approve(home, spec)
    torn_record(home)
    # the agent restarts and its pre-step session releases the scaling (what it writes: the agent's record)
    restarted, _ = agent(home, SCALING_DATASETS)
    release = {"kind": "federated-scaling", "mean": [0.5] * 13, "scale": [2.0] * 13, "rows": 500}
    restarted._record(task(spec, kind=TaskKind.COLLECTIVE, round=0), {"federated_scaling": release})
    lines = (home.root / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["metrics"]["federated_scaling"] == release  # a line of its own, whole
    # a second restart reads the release back: a lying orchestrator's scaling is refused, the honest one taken
    again, client = agent(home, SCALING_DATASETS)
    lied = SCALING.model_copy(update={"mean": [0.5] * 12 + [9.0]})
    again.handle(task(spec, task_id="tk-lied", scaling=lied))
    assert [f.code for f in client.failures] == [FailureCode.INVALID_TASK]
    again.handle(task(spec, task_id="tk-honest", scaling=SCALING))
    assert client.failures[-1].code is FailureCode.SECURE_ROUND_MISSING  # past the scaling check
    assert client.results == []


def test_a_torn_record_that_may_be_the_studys_scaling_refuses_the_task_naming_the_line(tmp_path, caplog):
    home = make_home(tmp_path / "home")
    spec = scaling_spec_of(home)
    approve(home, spec)
    torn_record(home)  # the site's own release of the scaling, cut by the crash
    site_agent, client = agent(home, SCALING_DATASETS)
    caplog.set_level(logging.WARNING, logger="fedhealth.agent")
    lied = SCALING.model_copy(update={"mean": [0.5] * 12 + [9.0]})
    site_agent.handle(task(spec, task_id="tk-lied", scaling=lied))
    # fail closed: the site cannot check the task's scaling against its own release: it does not train
    assert [f.code for f in client.failures] == [FailureCode.INVALID_TASK]
    assert "results.jsonl line 1" in caplog.text
    assert client.results == []


@pytest.mark.parametrize("failure", ["fsync-einval", "no-read-permission"])
def test_a_folder_the_file_system_cannot_sync_does_not_fail_a_write_that_happened(
    tmp_path, monkeypatch, failure
):
    """Folder syncs are for durability only: a file system that refuses them (EINVAL from FUSE and some
    network file systems) or a folder this account may write but not list must not turn a written and
    renamed file into a reported failure."""
    target = tmp_path / "drop" / "out.json"
    target.parent.mkdir()
    if failure == "fsync-einval":
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
                raise OSError(errno.EINVAL, "Invalid argument")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    else:
        real_open = os.open

        def open_(path, flags, *args, **kwargs):  # root reads any folder: refuse as the kernel would a user
            if flags & os.O_DIRECTORY:
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_)
    files_module.write_private_file(target, b"written")
    assert target.read_bytes() == b"written"
    monkeypatch.undo()

    def fsync_fails(fd: int) -> None:  # a disk error on the folder: the rename may not last, and is said to
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="Input/output"):
        files_module.write_private_file(target, b"again")
