"""``fedhealth site check``: the pilot probe of a site before it joins studies.

It reaches the orchestrator the way the agent will (name resolution, a TLS handshake trusting only the pinned
federation CA, a login with the site's identity key), measures the clock's skew against the orchestrator's,
the round-trip latency and the bandwidth each way (a 10 MB transfer by default), times a reference training
step of each recipe this release can run, and checks the free disk, the available memory and every
registered dataset. The result is a table here and, sent to the orchestrator, figures only: each check's
name, status, number and unit, and a note of fixed wording chosen here (never a path, column or value).
Details that could name local things (an error's text) stay in :attr:`SiteCheck.details`, shown locally.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx

import fedhealth
from fedhealth.agent._approvals import site_client
from fedhealth.agent._client import OrchestratorClient, OrchestratorRefused
from fedhealth.agent._datasets import DatasetCheckError, SiteDatasets, check_dataset
from fedhealth.agent._home import SiteHome
from fedhealth.core import FedHealthError
from fedhealth.crypto import pinned_tls_context
from fedhealth.learning import ReferenceStep, default_registry
from fedhealth.protocol import PROTOCOL_VERSION, CheckStatus, ReadinessCheck, SiteReadiness
from fedhealth.transport import answer_deadline

READINESS_PATH = "/api/v1/agent/readiness"
PROBE_PATH = "/api/v1/agent/probe"
DEFAULT_TRANSFER_BYTES = 10_000_000

# thresholds: below WARN a study is likely to be slow; at FAIL the site cannot take part
CLOCK_SKEW_WARN_S = 5.0
CLOCK_SKEW_FAIL_S = 60.0  # login challenges and tokens would be refused
LATENCY_WARN_MS = 500.0
LATENCY_ANSWER_S = 10.0  # one /healthz answer of the latency probe, whole
BANDWIDTH_WARN_MB_S = 1.0
DISK_WARN_GB = 2.0
DISK_FAIL_GB = 0.2
MEMORY_WARN_GB = 1.0
STEP_WARN_MS = 30_000.0


@dataclass(kw_only=True)
class SiteCheck:
    """The checks in order, and local-only details by check name."""

    site: str
    checks: list[ReadinessCheck] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    sent: bool = False

    @property
    def ready(self) -> bool:
        return all(c.status is not CheckStatus.FAIL for c in self.checks)

    def add(
        self,
        name: str,
        status: CheckStatus,
        value: float | None = None,
        unit: str = "",
        note: str = "",
        detail: str | None = None,
    ) -> None:
        self.checks.append(ReadinessCheck(name=name, status=status, value=value, unit=unit, note=note))
        if detail:
            self.details[name] = detail

    def readiness(self, when: datetime) -> SiteReadiness:
        return SiteReadiness(
            site=self.site,
            checked_at=when,
            software_version=fedhealth.__version__,
            protocol_version=PROTOCOL_VERSION,
            ready=self.ready,
            checks=self.checks,
        )


def _skipped(result: SiteCheck, names: list[str], why: str) -> None:
    for name in names:
        result.add(name, CheckStatus.SKIPPED, note=why)


def run_site_check(
    home: SiteHome,
    *,
    url: str | None = None,
    data_dir: Path | None = None,
    transfer_bytes: int = DEFAULT_TRANSFER_BYTES,
    report: bool = True,
) -> SiteCheck:
    """Run every check (none raises: a failure is a line of the result); send the figures if ``report``."""
    result = SiteCheck(site=home.name)
    target = url or home.orchestrator
    network = ["orchestrator.login", "clock.skew", "network.latency", "network.download", "network.upload"]
    if _reach(result, home, target):
        client = site_client(home, url=target, max_elapsed_s=10.0)
        try:
            if _login(result, client):
                _clock(result, client)
                _latency(result, client)
                _bandwidth(result, client, transfer_bytes)
            else:
                _skipped(result, network[1:], "not logged in")
            _local(result, home, data_dir)
            if report:
                _send(result, client)
        finally:
            client.close()
    else:
        _skipped(result, network, "orchestrator not reached")
        _local(result, home, data_dir)
    return result


# --- the orchestrator ---------------------------------------------------------------------------------------


def _reach(result: SiteCheck, home: SiteHome, url: str) -> bool:
    """DNS, then a TLS handshake that trusts only the pinned CA."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    started = time.perf_counter()
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        result.add(
            "orchestrator.dns", CheckStatus.FAIL, note="the host name does not resolve", detail=str(exc)
        )
        _skipped(result, ["orchestrator.tls"], "no address")
        return False
    result.add("orchestrator.dns", CheckStatus.OK, _ms(started), "ms", f"{len(addresses)} address(es)")
    if parts.scheme != "https":
        result.add("orchestrator.tls", CheckStatus.FAIL, note="the URL is not https", detail=url)
        return False
    ca = home.ca_pem()
    if ca is None:
        result.add("orchestrator.tls", CheckStatus.FAIL, note="no pinned CA in the site home")
        return False
    context = pinned_tls_context(ca, client_cert=home.client_cert())
    started = time.perf_counter()
    try:
        with (
            socket.create_connection((host, port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            pass
    except ssl.SSLCertVerificationError as exc:
        note = "the certificate is not trusted by the pinned CA"
        result.add("orchestrator.tls", CheckStatus.FAIL, note=note, detail=exc.verify_message or str(exc))
        return False
    except (OSError, ssl.SSLError) as exc:
        note = "no TLS connection to the orchestrator"
        result.add("orchestrator.tls", CheckStatus.FAIL, note=note, detail=f"{url}: {exc}")
        return False
    result.add("orchestrator.tls", CheckStatus.OK, _ms(started), "ms", "verified against the pinned CA")
    return True


def _login(result: SiteCheck, client: OrchestratorClient) -> bool:
    started = time.perf_counter()
    try:
        client.auth_headers()
    except OrchestratorRefused as exc:
        result.add(
            "orchestrator.login", CheckStatus.FAIL, note="the orchestrator refused this site", detail=str(exc)
        )
        return False
    except (FedHealthError, httpx.HTTPError) as exc:
        result.add("orchestrator.login", CheckStatus.FAIL, note="login failed", detail=str(exc))
        return False
    result.add("orchestrator.login", CheckStatus.OK, _ms(started), "ms", "signed in with the identity key")
    return True


def _clock(result: SiteCheck, client: OrchestratorClient) -> None:
    try:
        before = time.time()
        response = client.call("reading the orchestrator's clock", "GET", f"{PROBE_PATH}/time")
        after = time.time()
        server = datetime.fromisoformat(response.json()["time"]).timestamp()
    except (FedHealthError, httpx.HTTPError, KeyError, ValueError) as exc:
        result.add(
            "clock.skew", CheckStatus.FAIL, note="the orchestrator's clock could not be read", detail=str(exc)
        )
        return
    skew = server - (before + after) / 2
    status = (
        CheckStatus.FAIL
        if abs(skew) > CLOCK_SKEW_FAIL_S
        else CheckStatus.WARN
        if abs(skew) > CLOCK_SKEW_WARN_S
        else CheckStatus.OK
    )
    note = (
        "synchronise this machine's clock (NTP)"
        if status is not CheckStatus.OK
        else "orchestrator minus site"
    )
    result.add("clock.skew", status, round(skew, 3), "s", note)


def _latency(result: SiteCheck, client: OrchestratorClient) -> None:
    samples = []
    try:
        for _ in range(5):
            started = time.perf_counter()
            # whole by its deadline, headers too: an orchestrator trickling them cannot hang the check
            with answer_deadline(time.monotonic() + LATENCY_ANSWER_S):
                client.http.get("/healthz")
            samples.append(_ms(started))
    except httpx.HTTPError as exc:
        result.add("network.latency", CheckStatus.FAIL, note="requests fail", detail=str(exc))
        return
    median = statistics.median(samples)
    status = CheckStatus.WARN if median > LATENCY_WARN_MS else CheckStatus.OK
    result.add("network.latency", status, round(median, 1), "ms", "median of 5 round trips")


def _bandwidth(result: SiteCheck, client: OrchestratorClient, size: int) -> None:
    for name, run in (
        (
            "network.download",  # the probe's size is asked for: the answer may hold that much and no more
            lambda: client.call("download probe", "GET", PROBE_PATH, params={"size": size}, max_bytes=size),
        ),
        (
            "network.upload",
            lambda: client.call(
                "upload probe",
                "POST",
                PROBE_PATH,
                content=bytes(size),
                headers={"Content-Type": "application/octet-stream"},
            ),
        ),
    ):
        started = time.perf_counter()
        try:
            response = run()
        except (FedHealthError, httpx.HTTPError) as exc:
            result.add(name, CheckStatus.FAIL, note="the transfer failed", detail=str(exc))
            continue
        seconds = max(time.perf_counter() - started, 1e-6)
        moved = len(response.content) if name == "network.download" else size
        rate = moved / seconds / 1e6
        status = CheckStatus.WARN if rate < BANDWIDTH_WARN_MB_S else CheckStatus.OK
        result.add(name, status, round(rate, 2), "MB/s", f"{moved / 1e6:.0f} MB in {seconds:.2f} s")


def _send(result: SiteCheck, client: OrchestratorClient) -> None:
    readiness = result.readiness(datetime.now(UTC))
    try:
        client.call(
            "sending the readiness report",
            "POST",
            READINESS_PATH,
            content=readiness.model_dump_json(),
            headers={"Content-Type": "application/json"},
        )
        result.sent = True
    except (FedHealthError, httpx.HTTPError) as exc:
        result.details["report"] = f"not sent: {exc}"


# --- this machine -------------------------------------------------------------------------------------------


def reference_steps() -> dict[str, ReferenceStep | Exception]:
    """Each installed recipe's reference step (its newest version), by name: the work of a round on a
    reference size that the recipe chose; a recipe that cannot even load is reported, not fatal."""
    registry = default_registry()
    steps: dict[str, ReferenceStep | Exception] = {}
    for name in registry.names():
        try:
            recipe = registry.get(name, registry.versions(name)[-1])
            steps[name] = recipe.reference_step()
        except Exception as exc:  # a broken plug-in is a finding of the check
            steps[name] = exc
    return steps


def _local(result: SiteCheck, home: SiteHome, data_dir: Path | None) -> None:
    for recipe, step in reference_steps().items():
        name = f"compute.{recipe}"
        started = time.perf_counter()
        try:
            if isinstance(step, Exception):
                raise step
            step.run()
        except Exception as exc:  # a recipe that cannot run here is a finding, not a crash of the check
            result.add(
                name,
                CheckStatus.FAIL,
                note="the reference step failed",
                detail=f"{type(exc).__name__}: {exc}",
            )
            continue
        elapsed = _ms(started)
        status = CheckStatus.WARN if elapsed > STEP_WARN_MS else CheckStatus.OK
        result.add(name, status, round(elapsed, 1), "ms", step.note)
    free_gb = shutil.disk_usage(home.root).free / 1e9
    disk = (
        CheckStatus.FAIL
        if free_gb < DISK_FAIL_GB
        else CheckStatus.WARN
        if free_gb < DISK_WARN_GB
        else CheckStatus.OK
    )
    result.add("disk.free", disk, round(free_gb, 2), "GB", "free in the site home's file system")
    memory = available_memory_gb()
    if memory is None:
        result.add("memory.available", CheckStatus.SKIPPED, note="not measurable on this system")
    else:
        status = CheckStatus.WARN if memory < MEMORY_WARN_GB else CheckStatus.OK
        result.add("memory.available", status, round(memory, 2), "GB")
    try:
        registered = SiteDatasets(home).all()
    except FedHealthError as exc:
        result.add("datasets", CheckStatus.FAIL, note="the dataset registry is unreadable", detail=str(exc))
        return
    if not registered:
        result.add("datasets", CheckStatus.WARN, 0, "", "no dataset registered")
    for name, uri in registered.items():
        try:
            summary = check_dataset(name, uri, data_dir)
        except DatasetCheckError as exc:
            result.add(f"dataset:{name}", CheckStatus.FAIL, note="does not pass its check", detail=str(exc))
            continue
        note = f"{len(summary.features)} features"
        result.add(f"dataset:{name}", CheckStatus.OK, summary.rows, "rows", note)


def available_memory_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
