"""Prometheus metrics of the orchestrator, served on a port of their own (localhost by default), never on the
federation's port: rounds and their durations, secure-aggregation stage times, dropped sites, sites by status
and recently active, privacy budget spends the sites attest, and request latencies.

:class:`MetricsExtension` is an orchestrator extension: its observer counts what the round engine reports and
its ASGI middleware times every request (labelled by route template, never by raw path, so the label set stays
bounded). Each orchestrator has its own :class:`~prometheus_client.CollectorRegistry`.

Secure-aggregation stage times are measured at the orchestrator from the sites' stage messages: a stage's
time is from the end of the previous stage (the round's start, for the first) to the last message of that
stage the round received, observed when the round closes.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fedhealth.orchestrator import (
    ExtensionContext,
    ModelVersion,
    NullObserver,
    Registration,
    RoundRow,
    Store,
    StudyRow,
    TaskRow,
)
from fedhealth.protocol import Task, TaskStatus

log = logging.getLogger("fedhealth.dashboard")

DEFAULT_METRICS_HOST = "127.0.0.1"
ACTIVE_WINDOW = timedelta(minutes=5)  # a site that called within this window counts as active
_SECAGG_POST = re.compile(r"^/api/v1/agent/tasks/([^/]+)/secagg/([a-z_]+)\Z")
_STAGE_ORDER = ("advertise_keys", "share_keys", "masked_input", "consistency", "unmask")
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class _RoundStages:
    started: float
    last: dict[str, float] = field(default_factory=dict)  # stage -> time of its latest message


class _SitesCollector(Collector):
    """Sites by status, and those that called within :data:`ACTIVE_WINDOW`, read from the store on scrape."""

    def __init__(self, store: Store, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sites = self._store.list_sites()
        by_status = GaugeMetricFamily("fedhealth_sites", "Sites by enrollment status", labels=["status"])
        counts: dict[str, int] = {"pending": 0, "active": 0, "revoked": 0}
        for s in sites:
            counts[s.status.value] = counts.get(s.status.value, 0) + 1
        for status, n in sorted(counts.items()):
            by_status.add_metric([status], n)
        yield by_status
        since = self._clock() - ACTIVE_WINDOW
        recent = sum(1 for s in sites if s.last_seen_at is not None and s.last_seen_at >= since)
        yield GaugeMetricFamily(
            "fedhealth_active_sites",
            "Enrolled sites that called the orchestrator in the last 5 minutes",
            recent,
        )


class FederationMetrics:
    """The orchestrator's metrics in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rounds = Counter("fedhealth_rounds", "Rounds closed", ["kind", "status"], registry=r)
        self.round_seconds = Histogram(
            "fedhealth_round_duration_seconds",
            "Round wall time, open to close",
            ["kind"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "fedhealth_secagg_stage_seconds",
            "Secure-aggregation stage wall time at the orchestrator",
            ["stage"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.dropped = Counter(
            "fedhealth_dropped_sites",
            "Sites whose task in a closed round did not complete",
            ["reason"],
            registry=r,
        )
        self.tasks = Counter("fedhealth_tasks", "Tasks closed", ["kind", "status"], registry=r)
        self.charges = Counter(
            "fedhealth_budget_charges",
            "Tasks a site's ledger charged to a dataset, as the site attested",
            ["site", "dataset"],
            registry=r,
        )
        self.epsilon = Gauge(
            "fedhealth_budget_epsilon_spent",
            "A dataset's total epsilon over all studies (as its site composed it), last attested",
            ["site", "dataset"],
            registry=r,
        )
        self.epsilon_budget = Gauge(
            "fedhealth_budget_epsilon",
            "A dataset's epsilon budget at its site, as last attested",
            ["site", "dataset"],
            registry=r,
        )
        self.epsilon_remaining = Gauge(
            "fedhealth_budget_epsilon_remaining",
            "Budget left on a site's dataset, as the site last attested",
            ["site", "dataset"],
            registry=r,
        )
        self.requests = Histogram(
            "fedhealth_request_duration_seconds",
            "HTTP request latency at the orchestrator",
            ["method", "route", "status"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self._lock = threading.Lock()
        self._task_round: dict[str, tuple[str, int]] = {}  # task id -> (study, round), from the tasks sent
        self._stages: dict[tuple[str, int], _RoundStages] = {}

    def watch_sites(self, store: Store, clock: Callable[[], datetime]) -> None:
        self.registry.register(_SitesCollector(store, clock))

    # --- secure aggregation stage times --------------------------------------------------------------------

    def task_sent(self, task: Task) -> None:
        with self._lock:
            self._task_round[task.task_id] = (task.study_id, task.round)
            self._stages.setdefault((task.study_id, task.round), _RoundStages(started=time.monotonic()))

    def stage_message(self, task_id: str, stage: str) -> None:
        with self._lock:
            key = self._task_round.get(task_id)
            stages = self._stages.get(key) if key is not None else None
            if stages is not None and stage in _STAGE_ORDER:
                stages.last[stage] = time.monotonic()

    def round_closed(self, study_id: str, number: int, task_ids: list[str]) -> None:
        with self._lock:
            stages = self._stages.pop((study_id, number), None)
            for task_id in task_ids:
                self._task_round.pop(task_id, None)
        if stages is None:
            return
        previous = stages.started
        for stage in _STAGE_ORDER:
            end = stages.last.get(stage)
            if end is None:
                break
            self.stage_seconds.labels(stage).observe(max(0.0, end - previous))
            previous = end


class MetricsObserver(NullObserver):
    """Counts what the round engine reports (module docstring)."""

    def __init__(self, metrics: FederationMetrics) -> None:
        self.metrics = metrics

    def decorate_task(self, task: Task) -> Task:
        self.metrics.task_sent(task)
        return task

    def task_closed(self, task: TaskRow) -> None:
        m = self.metrics
        m.tasks.labels(task.kind.value, task.status.value).inc()
        privacy = task.attestation.privacy if task.attestation is not None else None
        if privacy is not None:
            labels = (task.site, privacy.dataset)
            if privacy.task_epsilon:
                m.charges.labels(*labels).inc()
            # composed totals, not a sum of per-task epsilons (composition is sub-additive)
            m.epsilon.labels(*labels).set(privacy.total_epsilon)
            m.epsilon_budget.labels(*labels).set(privacy.budget_epsilon)
            m.epsilon_remaining.labels(*labels).set(max(0.0, privacy.budget_epsilon - privacy.total_epsilon))

    def round_finished(
        self, study: StudyRow, round_row: RoundRow, tasks: list[TaskRow], version: ModelVersion | None
    ) -> None:
        m = self.metrics
        m.rounds.labels(round_row.kind.value, round_row.status.value).inc()
        if round_row.ended_at is not None:
            seconds = (round_row.ended_at - round_row.started_at).total_seconds()
            m.round_seconds.labels(round_row.kind.value).observe(max(0.0, seconds))
        for t in tasks:
            if t.status is not TaskStatus.COMPLETED:
                m.dropped.labels(t.status.value).inc()
        m.round_closed(study.id, round_row.number, [t.id for t in tasks])


class RequestTimer:
    """ASGI middleware: each request's latency by method, route template and status."""

    def __init__(self, app: Any, metrics: FederationMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def timed_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - start
            )
            if scope["method"] == "POST" and status < 400:
                found = _SECAGG_POST.match(scope["path"])
                if found is not None:
                    self.metrics.stage_message(found.group(1), found.group(2))


class MetricsExtension:
    """Prometheus metrics on ``host:port`` (``port`` 0: any free port, see :attr:`port`)."""

    def __init__(self, port: int, host: str = DEFAULT_METRICS_HOST) -> None:
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.metrics = FederationMetrics()
        self._server: Any = None

    def start(self, context: ExtensionContext) -> Registration:
        self.metrics.watch_sites(context.store, context.settings.clock.now)
        if self._server is None:  # the lifespan runs once per process
            self._server, _ = start_http_server(
                self.requested_port, addr=self.host, registry=self.metrics.registry
            )
            self.port = int(self._server.server_port)
            log.info("Prometheus metrics on http://%s:%d/metrics", self.host, self.port)
        return Registration(observer=MetricsObserver(self.metrics))

    def routers(self) -> list[APIRouter]:
        return []

    def install_middleware(self, app: FastAPI) -> None:
        app.add_middleware(RequestTimer, metrics=self.metrics)
