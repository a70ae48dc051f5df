"""The site agent's main loop: long-poll for a task, do it on local data, upload, repeat.

The agent dials out only. Every failure to reach the orchestrator is retried with backoff; a task the site
cannot do (missing dataset, wrong model shape, training diverged) is reported with a code from
:class:`fedhealth.protocol.FailureCode` so the round goes on without it; the details (which may name a file
or a patient) stay in this site's own log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedhealth.agent._approvals import ApprovalSync
from fedhealth.agent._client import (
    OrchestratorClient,
    OrchestratorRefused,
    RetryPolicy,
    SecureRoundGone,
    TlsVerificationError,
)
from fedhealth.agent._collective import HttpCollectives, check_collective_session
from fedhealth.agent._datasets import feeds_consent, sync_consent
from fedhealth.agent._home import SiteHome
from fedhealth.agent._pipeline import SiteGate, TaskContext, TaskRefused
from fedhealth.agent._secure import (
    PeerPins,
    UnmaskRecord,
    bounded_deadline,
    check_secure_round,
    run_secure_exchange,
)
from fedhealth.agent._site_state import SiteStateStore
from fedhealth.core import (
    MAX_HEADER_BYTES,
    PRIVATE_FILE_MODE,
    ConfigError,
    DatasetError,
    DeadlinePassedError,
    FedHealthError,
    InputError,
    ServiceUnavailableError,
    decode_tensors,
    keep_malloc_heaps,
    sha256_hex,
    sync_folder,
    work_deadline,
)
from fedhealth.crypto import IdentityKey
from fedhealth.data import SchemaError, TabularDataset, open_dataset
from fedhealth.learning import RecipeError, ResolvedRecipe, preload_libraries
from fedhealth.protocol import (
    FailureCode,
    ProtocolMismatch,
    ResultManifest,
    SiteMetrics,
    Task,
    TaskFailure,
    TaskKind,
    failure_code,
)
from fedhealth.runtime import (
    SCALING_ROUND,
    check_dataset_fits,
    check_recipe,
    encode_contribution,
    encode_update,
    evaluate_on_site,
    federated_scaling_requested,
    param_specs,
    run_scaling_program,
    run_site_program,
    secure_codec,
    task_recipe,
    train_on_site,
)
from fedhealth.secagg import KeyReuseGuard, SecAggSecurityError, SessionFailedError

log = logging.getLogger("fedhealth.agent")

# the results record's mark that this site joined a study's scaling pre-step session (before it sent anything)
SCALING_JOINED = "federated_scaling_joined"


@dataclass(kw_only=True)
class AgentSettings:
    orchestrator_url: str
    site: str
    identity: IdentityKey
    ca_pem: bytes | None = None  # the pinned federation CA; None only for plain-HTTP test set-ups
    client_cert: tuple[bytes, bytes] | None = None  # (certificate, key) PEM, for mutual TLS
    datasets: dict[str, str] = field(default_factory=dict)  # dataset name -> connector URI
    data_dir: Path | None = None
    poll_wait_s: float = 25.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    home: Path | None = None  # the site home: pinned peer keys, the site's own record of its results
    insecure: bool = False  # allow a plain http:// orchestrator URL (local tests only)


class SiteAgent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        client: OrchestratorClient | None = None,
        gates: Sequence[SiteGate] = (),
    ) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self.client = client or OrchestratorClient(
            settings.orchestrator_url,
            settings.site,
            settings.identity,
            ca_pem=settings.ca_pem,
            client_cert=settings.client_cert,
            retry=settings.retry,
            should_stop=self._stop.is_set,
            insecure=settings.insecure,
        )
        # per dataset: the study it was opened for and its rows (see _dataset)
        self._datasets: dict[str, tuple[str, TabularDataset]] = {}
        self._models: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self.tasks_done = 0
        self.gates: list[SiteGate] = list(gates)
        self._pins = PeerPins(settings.home / "peers.json" if settings.home is not None else None)
        self._key_guard = KeyReuseGuard()
        # per study: the federated scaling this site's own pre-step session released (standardize =
        # "federated"), checked against what later tasks carry
        self._scalings: dict[str, Any] = {}
        # the site database (HOME/site.sqlite), where the site records each secure round it unmasked
        home = SiteHome(settings.home) if settings.home is not None else None
        self._unmasked = UnmaskRecord.at(home.database_path if home is not None else None)
        # what a recipe keeps here between a study's rounds (SCAFFOLD's c_i), per study; never sent
        self._site_state = SiteStateStore(home.recipe_state_path if home is not None else None)
        # the specs awaiting this site's steward, fetched and registered between polls
        self._approvals = (
            ApprovalSync(home, self.client) if home is not None and home.settings_path.exists() else None
        )

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Poll and work until stopped. Raises :class:`SiteRefused` when the orchestrator will not serve this
        site any more (revoked, unknown) and :class:`TlsVerificationError` for an untrusted server."""
        self._warm_up()
        log.info("site %s polling %s", self.settings.site, self.settings.orchestrator_url)
        while not self._stop.is_set():
            if self._approvals is not None:
                self._approvals.maybe_sync()
            try:
                task = self.client.next_task(self.settings.poll_wait_s)
            except ServiceUnavailableError as exc:
                # unreachable for a while, or an answer that is not one: poll again, after a pause
                log.warning("polling: %s", exc)
                self._stop.wait(self.client.backoff(0))
                continue
            except OrchestratorRefused as exc:
                if exc.status in (401, 403):
                    raise SiteRefused(f"the orchestrator refuses this site: {exc}") from exc
                log.error("polling refused: %s", exc)
                self._stop.wait(self.settings.retry.max_s)
                continue
            if task is not None:
                self.handle(task)

    @staticmethod
    def _warm_up() -> None:
        """Load the libraries training needs before the first poll (scikit-learn and the boosting libraries
        take seconds), so a first task does not pay them against its round's deadline, nor a study's timed
        path. No data is read here: only a task that passed its gates reads data."""
        keep_malloc_heaps()  # collective calls move histogram-sized buffers: no fresh pages for each
        preload_libraries()

    def _dataset(self, name: str, study_id: str) -> TabularDataset:
        """The dataset as this study sees it. A study's first task opens the source again, so the rows are
        the warehouse's current ones and its schema is checked against the one pinned at ``site dataset
        add`` before any task of a new study (a renamed or retyped column refuses the task, charging
        nothing); later tasks of the same study reuse those rows, so every round of a study trains on one
        snapshot. Only the newest study's rows are kept per dataset. A FHIR dataset added with
        ``consent=true`` also reads its server's Consent resources again then."""
        held = self._datasets.get(name)
        if held is not None and held[0] == study_id:
            return held[1]
        uri = self.settings.datasets.get(name)
        if uri is None:
            raise DatasetError(
                f"this site has no dataset named {name!r} (registered: {sorted(self.settings.datasets)})"
            )
        self._datasets.pop(name, None)  # a failed open below must not leave the previous study's rows
        try:
            dataset = open_dataset(uri, self.settings.data_dir)
        except ConfigError as exc:  # a malformed dataset URI: the dataset is not available
            raise DatasetError(str(exc)) from exc
        if self.settings.home is not None and feeds_consent(uri):
            # a FHIR dataset that feeds consent: the server's Consent resources as they are now, imported
            # (audited) before the consent gate filters this study's rows
            sync_consent(SiteHome(self.settings.home), name, uri)
        self._datasets[name] = (study_id, dataset)
        return dataset

    def _model(self, task: Task) -> dict[str, np.ndarray]:
        cached = self._models.get(task.model_digest)
        if cached is None:
            if task.model_inline is not None:
                try:
                    blob = base64.b64decode(task.model_inline, validate=True)
                except binascii.Error as exc:
                    raise InputError(f"the task's inline model is not base64: {exc}") from exc
            else:
                specs = param_specs(task.recipe)
                size = sum(spec.numel * np.dtype(spec.dtype).itemsize for spec in specs)
                blob = self.client.get_model(
                    task.model_digest,
                    max_elapsed_s=self._time_left(task),
                    max_bytes=8 + MAX_HEADER_BYTES + size,  # the header's length, the header, the tensors
                )
            if sha256_hex(blob) != task.model_digest:
                # content addressing is the site's check that it trains the model the round names
                raise InputError(
                    f"the global model received does not match its digest {task.model_digest[:16]}..."
                )
            cached, _ = decode_tensors(blob, param_specs(task.recipe))
            self._models[task.model_digest] = cached
            while len(self._models) > 4:
                self._models.popitem(last=False)
        return cached

    @staticmethod
    def _until_deadline(task: Task) -> float:
        """Seconds to the task's deadline by this site's clock, but never more than two round periods. An
        honest orchestrator's deadline is one period (``round_deadline_s``, in the spec the steward approved)
        after the round opened, so it is at most two away from a site whose clock runs behind by less than
        a period. A deadline in the year 9999 (a lying orchestrator, or a site clock reset to 1970) let a
        spec's many epochs train for hours and its transfers retry as long
        (tests/agent/test_time_attacks.py::test_a_deadline_in_the_year_9999_is_bounded_by_the_approved_round_period)."""
        return (bounded_deadline(task) - datetime.now(UTC)).total_seconds()

    @staticmethod
    def _time_left(task: Task) -> float:
        return max(1.0, SiteAgent._until_deadline(task))

    @staticmethod
    def _training_time_left(task: Task) -> float:
        """How long this site may still train for the task: until its deadline and one more round period
        (``round_deadline_s``), by this site's clock. The deadline is the orchestrator's time; the margin
        keeps a site whose clock runs ahead (by less than a round period) from cutting its rounds short."""
        return SiteAgent._until_deadline(task) + task.spec.round_deadline_s

    def handle(self, task: Task) -> None:
        site = self.settings.site
        log.info("task %s: %s round %d of study %s", task.task_id, task.kind.value, task.round, task.study_id)
        ctx = TaskContext(task=task, site=site)
        try:
            for gate in self.gates:
                gate.before_data(ctx)
            # before the model or any data: this site must have the study's recipe at its version, and the
            # recipe must accept the study's params (RecipeError: reported as invalid_recipe)
            recipe = check_recipe(task.spec)
            if task.kind is TaskKind.COLLECTIVE:
                self._run_collective(task, ctx, recipe)
                self.tasks_done += 1
                return
            # a federated standardization's task must carry the scaling its pre-step released, the one this
            # site took part in (InputError: invalid_task), before anything of a secure round starts
            task_recipe(task)
            self._check_scaling(task)
            # before the model or any data: a secure study's round must be the one the steward approved, and
            # a secure study's task without its secure round is refused (nothing goes out in clear)
            secure = check_secure_round(task, site, self.settings.identity, self._pins)
            if task.kind in _DEADLINE_KINDS and self._training_time_left(task) <= 0:
                # before the model or any data (nothing charged): a task already past its deadline, whose
                # round the orchestrator has closed (a training or an evaluation: no answer is taken)
                raise DeadlinePassedError("the task's deadline had passed when it arrived")
            params = self._model(task)
            dataset = None
            if recipe.capabilities.reads_data:
                dataset = self._dataset(task.dataset, task.study_id)
                _check_fits(task, dataset)
                for gate in self.gates:
                    dataset = gate.prepare_data(ctx, dataset)
                # From here on the rows are computed on: a failure after this point may reflect them, so
                # the budget reserved for the task is charged; one before it (missing file, bad header,
                # a value that does not parse, a schema that does not fit) released.
                ctx.data_read = True
            kept_after: dict[str, np.ndarray] | None = None
            if task.kind is TaskKind.TRAIN:
                kept = None
                if recipe.capabilities.site_state:
                    kept = self._site_state.load(task.study_id, task.round)
                # past the round's deadline the orchestrator takes no update: training stops there
                with work_deadline(self._training_time_left(task)):
                    outcome = train_on_site(task, site, params, dataset, site_state=kept)
                delta, metrics, kept_after = outcome.delta, outcome.metrics, outcome.site_state
            else:
                delta, metrics = None, evaluate_on_site(task, params, dataset)
            for gate in self.gates:
                gate.after_training(ctx)
            self._attest(ctx)
            self._record_locally(task, metrics)
            if secure is not None:
                # Metrics travel only inside the secure sum; the attestation rides on the first message.
                vector = encode_contribution(secure_codec(task.spec, task.kind), task.spec, metrics, delta)
                run_secure_exchange(
                    self.client,
                    task,
                    secure,
                    site=site,
                    identity=self.settings.identity,
                    guard=self._key_guard,
                    record=self._unmasked,
                    vector=vector,
                    attestation=ctx.site_attestation(),
                    poll_wait_s=self.settings.poll_wait_s,
                )
            elif delta is not None:
                manifest = ResultManifest(
                    task_id=task.task_id, metrics=metrics, attestation=ctx.site_attestation()
                )
                self.client.upload_result(
                    task.task_id, encode_update(delta, manifest), max_elapsed_s=self._time_left(task)
                )
            else:
                self.client.upload_evaluation(
                    task.task_id,
                    ResultManifest(task_id=task.task_id, metrics=metrics, attestation=ctx.site_attestation()),
                    max_elapsed_s=self._time_left(task),
                )
            if kept_after is not None:  # once the update went out: the state moves on with the server's c
                self._site_state.save(task.study_id, task.round, kept_after)
            self.tasks_done += 1
        except TaskRefused as refusal:
            log.warning("task %s refused: %s: %s", task.task_id, refusal.code, refusal.reason)
            for gate in self.gates:
                gate.on_refused(ctx, refusal)
            self._attest(ctx)
            self._fail(task, failure_code(refusal.code), ctx)
        except SecureRoundGone as exc:
            log.warning("task %s: out of the secure round: %s", task.task_id, exc)
        except SessionFailedError as exc:  # the orchestrator ended the session (and closed the task)
            log.warning("task %s: the collective session failed: %s", task.task_id, exc)
            for gate in self.gates:
                gate.on_failed(ctx, exc)
        except SecAggSecurityError as exc:  # a key, signature or result of the session failed our checks
            log.error("task %s: stopped the collective session: %s", task.task_id, exc)
            for gate in self.gates:
                gate.on_failed(ctx, exc)
            self._fail(task, FailureCode.COLLECTIVE_REFUSED, ctx)
        except OrchestratorRefused as exc:
            if exc.status == 403:
                raise SiteRefused(f"the orchestrator refuses this site: {exc}") from exc
            log.error("task %s: the orchestrator refused the result: %s", task.task_id, exc)
        except ServiceUnavailableError as exc:
            log.error("task %s abandoned: %s", task.task_id, exc)
        except Exception as exc:  # a bug in training code must not kill the agent: report it and go on
            for gate in self.gates:
                gate.on_failed(ctx, exc)
            code = _failure_code(exc)
            if code is FailureCode.INTERNAL_ERROR:
                log.exception("task %s crashed", task.task_id)
            else:  # the detail (it may name a file or a patient) stays in this site's own log
                log.error("task %s failed: %s: %s: %s", task.task_id, code.value, type(exc).__name__, exc)
            self._fail(task, code, ctx)

    def _run_collective(self, task: Task, ctx: TaskContext, recipe: ResolvedRecipe) -> None:
        """A collective session: the checks, the recipe's site program over the session, the closing call
        (with the attestation), and the site's own record of it."""
        site = self.settings.site
        checked = check_collective_session(task, site, self.settings.identity, self._pins)
        scaling_step = task.round == SCALING_ROUND and federated_scaling_requested(task.spec.recipe)
        if not scaling_step:
            recipe.collective()  # RecipeError (invalid_recipe) for a recipe combined in rounds
        elif self._scalings.get(task.study_id) or self._recorded_scaling(task.study_id):
            # An honest orchestrator never runs a study's pre-step twice; a second session's totals less the
            # first's are the rows that changed in between (one patient who withdrew consent: their values)
            raise TaskRefused(
                FailureCode.INVALID_TASK.value,
                "this site already took part in the study's scaling pre-step and takes part once: a second "
                "session's sums, less the first's, would reveal the rows that changed in between",
            )
        dataset = None
        if recipe.capabilities.reads_data:
            dataset = self._dataset(task.dataset, task.study_id)
            _check_fits(task, dataset)
            for gate in self.gates:
                dataset = gate.prepare_data(ctx, dataset)
            ctx.data_read = True
        session = HttpCollectives(
            self.client,
            task,
            checked,
            site=site,
            identity=self.settings.identity,
            guard=self._key_guard,
            poll_wait_s=self.settings.poll_wait_s,
        )
        if scaling_step:
            # Durable before anything is sent: a restarted agent that joined the session but recorded no
            # release (killed mid-session) knows it took part, and neither runs it again nor takes the
            # orchestrator's word for its scaling
            self._record(task, {SCALING_JOINED: task.task_id})
            self._scalings[task.study_id] = {SCALING_JOINED: task.task_id}
        started = time.perf_counter()
        try:
            session.open()
            log.info("task %s: collective session joined (%d sites)", task.task_id, len(session.sites))
            record: dict[str, Any] | None = None
            if scaling_step:  # standardize = "federated": the pre-step's sums over the kept training rows
                release = json.loads(run_scaling_program(task.spec, dataset, session))
                # Recorded before the closing call acknowledges it: an agent killed between the two kept no
                # record and, restarted, took the orchestrator's word for the scaling. A record that cannot
                # be written fails the session instead (tests/agent/test_scaling_crash_attacks.py).
                self._record(task, {"collective_calls": session.calls, "federated_scaling": release})
                self._scalings[task.study_id] = release
                if "refused" in release:
                    # the session still closes: the orchestrator reads the refusal from it and fails the
                    # study with that one line
                    log.warning("task %s: the scaling pre-step refused: %s", task.task_id, release["refused"])
            else:
                outcome = run_site_program(
                    recipe, task.spec, dataset, session, task.round, checkpoints=self._checkpoints(task)
                )
                record = dict(outcome.record)
            for gate in self.gates:
                gate.after_training(ctx)
            self._attest(ctx)
            session.close_with(ctx.site_attestation())
        finally:
            session.release()
        log.info(
            "task %s: collective session done: %d calls in %.2f s",
            task.task_id,
            session.calls,
            time.perf_counter() - started,
        )
        if record is not None:
            self._record(task, {"collective_calls": session.calls, **record})

    def _check_scaling(self, task: Task) -> None:
        """A federated study's task must carry the scaling this site's own pre-step session released, when
        it took part in it (an evaluation site outside the session takes the orchestrator's word, as it
        does for the model): a lying orchestrator cannot make it train on another scaling. Every training
        site of the study took part (the session is every training site or nobody), so one with no release
        to check against refuses: it lost the record, or the orchestrator skipped or replayed the pre-step."""
        if task.scaling is None:
            return
        own = self._scalings.get(task.study_id) or self._recorded_scaling(task.study_id)
        if own is None:
            if self.settings.site not in task.spec.train_sites:
                return
            where = self.settings.home / "results.jsonl" if self.settings.home is not None else "memory"
            raise TaskRefused(
                FailureCode.INVALID_TASK.value,
                "the task carries a federated scaling, but this site holds no record of what its pre-step "
                f"released (none in {where}): as one of the study's training sites it took part in that "
                "session, so the agent stopped before recording it, the record was removed, or the "
                "orchestrator skipped the pre-step; it does not train on a scaling it cannot check",
            )
        if SCALING_JOINED in own:
            raise TaskRefused(
                FailureCode.INVALID_TASK.value,
                "the task carries a federated scaling, but this site joined the study's pre-step session and "
                "recorded no release of it (the agent stopped mid-session?): it cannot check the scaling",
            )
        if "refused" in own:
            raise TaskRefused(
                FailureCode.INVALID_TASK.value,
                f"the task carries a federated scaling, but this site's pre-step refused: {own['refused']}",
            )
        if list(task.scaling.mean) != own.get("mean") or list(task.scaling.scale) != own.get("scale"):
            raise TaskRefused(
                FailureCode.INVALID_TASK.value,
                "the task's federated scaling differs from the one this site's pre-step session released",
            )

    def _recorded_scaling(self, study_id: str) -> dict[str, Any] | None:
        """What this site's own results record holds of its pre-step for ``study_id`` (after a restart of
        the agent): the release, ``{SCALING_JOINED: task id}`` when its latest session recorded none, or
        None if it holds neither."""
        if self.settings.home is None:
            return None
        try:
            lines = (self.settings.home / "results.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return None
        torn: list[int] = []
        for number in range(len(lines), 0, -1):
            try:
                entry = json.loads(lines[number - 1])
            except json.JSONDecodeError:
                torn.append(number)  # a record cut by a crash mid-append (see _record)
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("metrics"), dict):
                torn.append(number)
                continue
            if entry.get("study_id") != study_id:
                continue
            found: dict[str, Any] | None = None
            if "federated_scaling" in entry["metrics"]:
                found = entry["metrics"]["federated_scaling"]
            elif SCALING_JOINED in entry["metrics"]:  # joined, and recorded no release after that
                found = {SCALING_JOINED: entry["metrics"][SCALING_JOINED]}
            if isinstance(found, dict):
                self._scalings[study_id] = found
                return found
        if torn:
            # A torn line may be this study's own release, cut by a crash while it was written: reading it
            # as "took no part" would take the orchestrator's word for the scaling, and a json error here
            # failed every later task as an internal error. Fail closed, naming the line for the steward
            # (tests/agent/test_crash_consistency_attacks.py).
            raise TaskRefused(
                FailureCode.INVALID_TASK.value,
                "this site's record of the study's scaling pre-step cannot be read: "
                f"{self.settings.home / 'results.jsonl'} line {', '.join(map(str, sorted(torn)))} is not a "
                "whole record (cut by a crash while it was written?) and may be this site's own part in the "
                "pre-step; check it and remove it",
            )
        return None

    def _checkpoints(self, task: Task) -> Path | None:
        """The study's checkpoint directory in the site home (created 0700 by the recipe when it first
        writes one; kept across the study's sessions, so a retried session resumes from what this site
        completed); None without a home."""
        if self.settings.home is None:
            return None
        # the study id is the orchestrator's word: a digest of it names the directory, never a path it chose
        return self.settings.home / "checkpoints" / hashlib.sha256(task.study_id.encode()).hexdigest()[:32]

    def _record_locally(self, task: Task, metrics: SiteMetrics) -> None:
        """The site's own record of what it computed (kept at the site, whatever is sent)."""
        self._record(task, metrics.model_dump(mode="json"))

    def _record(self, task: Task, metrics: dict[str, Any]) -> None:
        if self.settings.home is None:
            return
        line = {
            "time": datetime.now(UTC).isoformat(),
            "study_id": task.study_id,
            "study": task.spec.name,
            "round": task.round,
            "kind": task.kind.value,
            "metrics": metrics,
        }
        data = (json.dumps(line) + "\n").encode()
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC  # read: its last byte
        fd = os.open(self.settings.home / "results.jsonl", flags, PRIVATE_FILE_MODE)
        try:
            # A crash mid-append (a kill between two writes of a long line, a power cut) leaves a last line
            # without its newline; appended to as it was, the next record was glued to it, and both were lost
            # to the scaling check that reads them back. Start on a line of our own, write the record in one
            # call and make it durable
            # (tests/agent/test_crash_consistency_attacks.py).
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if not size:  # the file is new: its name is durable only once the home is synced too
            sync_folder(self.settings.home)

    def _attest(self, ctx: TaskContext) -> None:
        for gate in self.gates:
            gate.attest(ctx)

    def _fail(self, task: Task, code: FailureCode, ctx: TaskContext | None = None) -> None:
        """Tell the orchestrator the task's code, nothing more: the code's sentence is fixed (it is looked
        up, not sent) and the details were logged here by the caller."""
        log.info("task %s: reporting %s to the orchestrator", task.task_id, code.value)
        try:
            self.client.report_failure(
                task.task_id,
                TaskFailure(code=code, attestation=ctx.site_attestation() if ctx is not None else None),
                max_elapsed_s=self._time_left(task),
            )
        except (OrchestratorRefused, ServiceUnavailableError) as exc:
            log.error("could not report the failure of %s: %s", task.task_id, exc)


def _check_fits(task: Task, dataset: TabularDataset) -> None:
    """The dataset's width against the study's model: a schema question, answered before any row is used."""
    try:
        check_dataset_fits(task.recipe, dataset)
    except DatasetError as exc:
        raise SchemaError(str(exc)) from exc


def _failure_code(exc: BaseException) -> FailureCode:
    """The code for an exception; its message never leaves the site (it may name a path or a patient)."""
    if isinstance(exc, RecipeError):  # unknown recipe or version, params the recipe refuses
        return FailureCode.INVALID_RECIPE
    if isinstance(exc, SchemaError):
        return FailureCode.DATASET_INVALID
    if isinstance(exc, DatasetError):  # missing, unreadable or failing its checksum
        return FailureCode.DATASET_UNAVAILABLE
    if isinstance(exc, InputError):
        return FailureCode.INVALID_TASK
    if isinstance(exc, DeadlinePassedError):
        return FailureCode.DEADLINE_PASSED
    if isinstance(exc, FedHealthError):
        return FailureCode.TRAINING_FAILED
    return FailureCode.INTERNAL_ERROR


# the kinds of task refused once past their deadline: their round closes at it. A collective session keeps
# its own call deadlines (its round waits for the session, not the clock).
_DEADLINE_KINDS = frozenset({TaskKind.TRAIN, TaskKind.EVALUATE})


class SiteRefused(FedHealthError):
    """The orchestrator will not serve this site (revoked or unknown): stop rather than retry."""


def run_agent(settings: AgentSettings, gates: Sequence[SiteGate] = ()) -> int:
    """Run an agent in the foreground until interrupted (SIGINT/SIGTERM); returns the process exit code."""
    agent = SiteAgent(settings, gates=gates)
    try:
        agent.run()
    except KeyboardInterrupt:
        log.info("site %s stopping", settings.site)
    except (SiteRefused, TlsVerificationError, ProtocolMismatch) as exc:
        log.error("%s", exc)
        return 3
    finally:
        if agent._approvals is not None:
            agent._approvals.close()
        agent.client.close()
    return 0
