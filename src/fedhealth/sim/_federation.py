"""A whole federation on one machine: the orchestrator and N site agents as real processes over loopback.

Used by the demo, the end-to-end tests and the benchmarks. Each process logs to ``<workdir>/logs/<name>.log``.
Children are started in their own session (a Ctrl-C reaches only the supervisor, which then stops them in
order) and, on Linux, are told to exit if the supervisor dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from fedhealth.core import FedHealthError, ServiceUnavailableError
from fedhealth.protocol import StudyInfo, StudySpec, StudyStatus

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class FederationError(FedHealthError):
    """A process of the local federation did not start or answer."""


class LocalFederation:
    def __init__(
        self,
        workdir: Path,
        *,
        database_url: str | None = None,
        env: Mapping[str, str] | None = None,
        log_level: str = "info",
        orchestrator_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.state_dir = workdir / "orchestrator"
        self.database_url = database_url
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.log_level = log_level
        self.orchestrator_args = list(orchestrator_args)
        self.orchestrator: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.url: str | None = None
        self._http: httpx.Client | None = None

    # --- processes ---------------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it for its lifetime
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "fedhealth", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        finally:
            log.close()

    def start_orchestrator(self, timeout: float = 60.0) -> str:
        ready = self.workdir / "orchestrator.ready.json"
        ready.unlink(missing_ok=True)
        args = [
            "orchestrator",
            "serve",
            "--state-dir",
            str(self.state_dir),
            "--port",
            str(self._port_hint()),
            "--ready-file",
            str(ready),
            "--log-level",
            self.log_level,
            *self.orchestrator_args,
        ]
        if self.database_url:
            args += ["--database-url", self.database_url]
        self.orchestrator = self._spawn("orchestrator", args)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.orchestrator.poll() is not None:
                raise FederationError(
                    f"the orchestrator exited with code {self.orchestrator.returncode}; "
                    f"see {self.logs / 'orchestrator.log'}"
                )
            if time.monotonic() > deadline:
                raise FederationError(f"the orchestrator did not start within {timeout:.0f} s")
            time.sleep(0.02)
        self.url = json.loads(ready.read_text())["url"]
        if self._http is not None:
            self._http.close()
        self._http = httpx.Client(base_url=self.url, timeout=30.0)
        return self.url

    def _port_hint(self) -> int:
        # Reuse the previous port across restarts so that running agents find the orchestrator again.
        if self.url is not None:
            return int(self.url.rsplit(":", 1)[1])
        return 0

    def stop_orchestrator(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.orchestrator is not None:
            _stop(self.orchestrator, sig, timeout)
            self.orchestrator = None

    def start_agent(self, site: str, datasets: Mapping[str, str], *, extra_args: Sequence[str] = ()) -> None:
        if self.url is None:
            raise FederationError("start the orchestrator first")
        args = ["site", "serve", "--orchestrator", self.url, "--name", site, "--log-level", self.log_level]
        for name, uri in datasets.items():
            args += ["--dataset", f"{name}={uri}"]
        self.agents[site] = self._spawn(f"agent-{site}", [*args, *extra_args])

    def stop_agent(self, site: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        proc = self.agents.pop(site, None)
        if proc is not None:
            _stop(proc, sig, timeout)

    def stop_all(self) -> None:
        for site in list(self.agents):
            self.stop_agent(site)
        self.stop_orchestrator()
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.stop_all()

    # --- operator calls ----------------------------------------------------------------------------------

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            raise FederationError("the orchestrator is not running")
        return self._http

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise FederationError(
                f"{response.request.method} {response.request.url.path}: "
                f"{response.status_code} {response.text}"
            )
        return response.json()

    def add_site(self, name: str) -> None:
        self._check(self.http.post("/api/v1/sites", json={"name": name}))

    def wait_for_sites(self, names: Sequence[str], timeout: float = 120.0) -> None:
        """Block until every named site has polled the orchestrator at least once."""
        deadline = time.monotonic() + timeout
        while True:
            seen = {s["name"] for s in self._check(self.http.get("/api/v1/sites")) if s["last_seen_at"]}
            missing = sorted(set(names) - seen)
            if not missing:
                return
            for name in missing:
                proc = self.agents.get(name)
                if proc is not None and proc.poll() is not None:
                    raise FederationError(
                        f"agent {name} exited with code {proc.returncode}; "
                        f"see {self.logs / f'agent-{name}.log'}"
                    )
            if time.monotonic() > deadline:
                raise FederationError(f"sites never connected within {timeout:.0f} s: {', '.join(missing)}")
            time.sleep(0.05)

    def create_study(self, spec: StudySpec) -> StudyInfo:
        return StudyInfo.model_validate(
            self._check(self.http.post("/api/v1/studies", json=spec.model_dump(mode="json")))
        )

    def study(self, study_id: str) -> StudyInfo:
        return StudyInfo.model_validate(self._check(self.http.get(f"/api/v1/studies/{study_id}")))

    def wait_for_study(
        self,
        study_id: str,
        *,
        timeout: float = 600.0,
        interval: float = 0.1,
        on_progress: Callable[[StudyInfo], None] | None = None,
    ) -> StudyInfo:
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = self.study(study_id)
            except httpx.TransportError as exc:
                if time.monotonic() > deadline:
                    raise ServiceUnavailableError(f"orchestrator unreachable: {exc}") from exc
                time.sleep(interval)
                continue
            if on_progress is not None:
                on_progress(info)
            if info.status is not StudyStatus.RUNNING:
                return info
            if time.monotonic() > deadline:
                raise FederationError(f"study {study_id} still running after {timeout:.0f} s")
            time.sleep(interval)

    def model_bytes(self, study_id: str) -> bytes:
        response = self.http.get(f"/api/v1/studies/{study_id}/model")
        self._check_bytes(response)
        return response.content

    def report(self, study_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/api/v1/studies/{study_id}/report"))  # type: ignore[no-any-return]

    def _check_bytes(self, response: httpx.Response) -> None:
        if response.status_code >= 400:
            raise FederationError(f"{response.request.url.path}: {response.status_code} {response.text}")


def _stop(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
