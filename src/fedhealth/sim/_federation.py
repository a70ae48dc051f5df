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

from fedhealth.agent import SiteHome, enroll_site
from fedhealth.client import OperatorClient
from fedhealth.core import FedHealthError
from fedhealth.crypto import pinned_tls_context
from fedhealth.orchestrator import OrchestratorHome, init_home
from fedhealth.protocol import OperatorCredential, StudyInfo, StudySpec

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _with_python_path(env: dict[str, str], folders: Sequence[Path]) -> dict[str, str]:
    """``env`` with ``folders`` in front of its ``PYTHONPATH``."""
    if not folders:
        return env
    parts = [str(Path(f).resolve()) for f in folders]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    return {**env, "PYTHONPATH": os.pathsep.join(parts)}


class FederationError(FedHealthError):
    """A process of the local federation did not start or answer."""


class LocalFederation:
    """A federation on this machine: ``workdir/orchestrator`` is the orchestrator's home (created on first
    start), ``workdir/sites/<name>`` each site's home, ``workdir/logs`` every process's log.

    With ``tls=True`` (the default) everything runs as in production: HTTPS with the federation's own CA,
    enrolled sites with Ed25519 identities, short-lived tokens. ``env`` is added to every process's
    environment; ``python_path`` folders go in front of its ``PYTHONPATH`` (e.g. a recipe plug-in's package
    and its ``*.dist-info``: importlib.metadata then finds its ``fedhealth.recipes`` entry point).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        database_url: str | None = None,
        env: Mapping[str, str] | None = None,
        log_level: str = "info",
        orchestrator_args: Sequence[str] = (),
        tls: bool = True,
        mtls: bool = False,
        python_path: Sequence[Path] = (),
    ) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home = OrchestratorHome(workdir / "orchestrator")
        self.database_url = database_url
        self._base_python_path = {**os.environ, **(env or {})}.get("PYTHONPATH", "")
        self.env = _with_python_path({**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}, python_path)
        self.log_level = log_level
        self.orchestrator_args = list(orchestrator_args)
        self.tls = tls
        self.mtls = mtls  # mutual TLS: clients need certificates; sites enroll on a second listener
        self.enroll_url: str | None = None
        self.orchestrator: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.url: str | None = None
        self._operator: OperatorClient | None = None
        self._raw: httpx.Client | None = None

    @property
    def state_dir(self) -> Path:
        return self.home.state_dir

    def site_home(self, name: str) -> SiteHome:
        return SiteHome(self.workdir / "sites" / name)

    def site_keys(self, names: Sequence[str]) -> dict[str, str]:
        """The identity-key fingerprints of enrolled sites, read from their own homes (what each steward
        would state), for a secure study's ``SecureAggregationSpec.site_keys``."""
        return {name: self.site_home(name).identity().public().fingerprint for name in names}

    def budget_ledger(self, site: str) -> Any:
        """The site's privacy-budget ledger (a ``fedhealth.privacy.BudgetLedger`` on its database), as its
        agent and ``fedhealth site budget ... --home`` open it."""
        from fedhealth.privacy import BudgetLedger, sqlite_engine

        engine = sqlite_engine(self.site_home(site).database_path)
        BudgetLedger.create_schema(engine)
        return BudgetLedger(engine)

    def set_budget(self, site: str, dataset: str, epsilon: float, delta: float) -> None:
        """What ``fedhealth site budget set DATASET --epsilon E --delta D --home HOME`` does at ``site``."""
        self.budget_ledger(site).set_budget(dataset, epsilon, delta)

    # --- processes ---------------------------------------------------------------------------------------

    def _spawn(
        self, name: str, args: list[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it for its lifetime
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "fedhealth", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        finally:
            log.close()

    def start_orchestrator(self, timeout: float = 60.0) -> str:
        if not self.home.exists():
            init_home(
                self.home.root,
                hosts=["127.0.0.1", "localhost"],
                url="https://127.0.0.1:0",
                database_url=self.database_url,
            )
        ready = self.workdir / "orchestrator.ready.json"
        ready.unlink(missing_ok=True)
        args = [
            "orchestrator",
            "serve",
            "--home",
            str(self.home.root),
            "--port",
            str(self._port_hint()),
            "--ready-file",
            str(ready),
            "--log-level",
            self.log_level,
            *self.orchestrator_args,
        ]
        if self.mtls:
            args += ["--mtls", "--enroll-port", "0"]
        if not self.tls:
            args.append("--insecure")
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
        announced = json.loads(ready.read_text())
        self.url, self.enroll_url = announced["url"], announced.get("enroll_url")
        self._close_clients()
        credential = OperatorCredential.model_validate_json(self.home.admin_credential.read_text())
        self._operator = OperatorClient(
            self.url,
            user=credential.user,
            api_key=credential.api_key,
            ca_pem=credential.ca_pem if self.tls else None,
            client_cert=self._admin_cert(),
            insecure=not self.tls,
        )
        return self.url

    def _admin_cert(self) -> tuple[bytes, bytes] | None:
        credential = OperatorCredential.model_validate_json(self.home.admin_credential.read_text())
        if self.mtls and credential.tls_certificate and credential.tls_key:
            return credential.tls_certificate.encode(), credential.tls_key.encode()
        return None

    def _port_hint(self) -> int:
        # Reuse the previous port across restarts so that running agents find the orchestrator again.
        if self.url is not None:
            return int(self.url.rsplit(":", 1)[1])
        return 0

    def stop_orchestrator(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.orchestrator is not None:
            _stop(self.orchestrator, sig, timeout)
            self.orchestrator = None

    def add_site(self, name: str, *, enroll: bool = True) -> str:
        """Register a site; unless ``enroll=False``, enroll it too (key generated in its home). Returns the
        enrollment token (already spent when enrolled)."""
        token = self.operator.add_site(name).enrollment_token
        if enroll:
            self.enroll(name, token)
        return token

    def enroll(self, name: str, token: str) -> SiteHome:
        if self.url is None:
            raise FederationError("start the orchestrator first")
        return enroll_site(
            self.site_home(name).root,
            name=name,
            orchestrator=self.enroll_url or self.url,
            serve_url=self.url,
            token=token,
            ca_pem=self.home.ca_cert.read_bytes() if self.tls else None,
            insecure=not self.tls,
        )

    def start_agent(
        self,
        site: str,
        datasets: Mapping[str, str],
        *,
        extra_args: Sequence[str] = (),
        orchestrator_url: str | None = None,
        python_path: Sequence[Path] | None = None,
    ) -> None:
        """Start ``site``'s agent; ``orchestrator_url`` points it somewhere else than the orchestrator (a
        proxy in front of it, in tests); ``python_path`` replaces the federation's extra ``PYTHONPATH``
        folders for this agent (``()``: none, e.g. a site that lacks a recipe plug-in)."""
        if self.url is None:
            raise FederationError("start the orchestrator first")
        args = [
            "site",
            "serve",
            "--home",
            str(self.site_home(site).root),
            "--orchestrator",
            orchestrator_url or self.url,
            "--log-level",
            self.log_level,
        ]
        if not self.tls:
            args.append("--insecure")  # plain http:// is refused without it
        for name, uri in datasets.items():
            args += ["--dataset", f"{name}={uri}"]
        env: dict[str, str] | None = None
        if python_path is not None:
            env = {k: v for k, v in self.env.items() if k != "PYTHONPATH"}
            if self._base_python_path:
                env["PYTHONPATH"] = self._base_python_path
            env = _with_python_path(env, python_path)
        self.agents[site] = self._spawn(f"agent-{site}", [*args, *extra_args], env)

    def stop_agent(self, site: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        proc = self.agents.pop(site, None)
        if proc is not None:
            _stop(proc, sig, timeout)

    def stop_all(self) -> None:
        self._close_clients()  # idle keep-alive connections would hold the server's graceful shutdown
        for site in list(self.agents):
            self.stop_agent(site)
        self.stop_orchestrator()

    def _close_clients(self) -> None:
        for client in (self._operator, self._raw):
            if client is not None:
                client.close()
        self._operator = None
        self._raw = None

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.stop_all()

    # --- operator calls ----------------------------------------------------------------------------------

    @property
    def operator(self) -> OperatorClient:
        """The admin's authenticated client of the operator API."""
        if self._operator is None:
            raise FederationError("the orchestrator is not running")
        return self._operator

    @property
    def http(self) -> httpx.Client:
        """An unauthenticated client that trusts the federation CA: for sending requests by hand."""
        if self.url is None:
            raise FederationError("the orchestrator is not running")
        if self._raw is None:
            ca = self.home.ca_cert.read_bytes()
            verify: Any = pinned_tls_context(ca, client_cert=self._admin_cert()) if self.tls else True
            self._raw = httpx.Client(base_url=self.url, verify=verify, timeout=30.0)
        return self._raw

    def admin_headers(self) -> dict[str, str]:
        credential = OperatorCredential.model_validate_json(self.home.admin_credential.read_text())
        response = self.http.post(
            "/api/v1/auth/token", json={"user": credential.user, "api_key": credential.api_key}
        )
        response.raise_for_status()
        return {"Authorization": f"Bearer {response.json()['access_token']}"}

    def wait_for_sites(self, names: Sequence[str], timeout: float = 120.0) -> None:
        """Block until every named site has polled the orchestrator at least once."""
        deadline = time.monotonic() + timeout
        while True:
            seen = {s.name for s in self.operator.sites() if s.last_seen_at}
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

    # --- governance: the data stewards' approvals and the owner's signature ---------------------------------

    def approve(
        self,
        site: str,
        spec: StudySpec,
        *,
        reason: str = "approved for this federation",
        steward: str = "steward",
    ) -> str:
        """Play ``site``'s data steward: approve exactly this spec there and tell the orchestrator, as
        ``fedhealth site approve HASH --reason ... --home HOME`` does. Returns the spec hash."""
        from fedhealth.agent import SiteGovernance, report_approval

        with SiteGovernance(self.site_home(site)) as governance:
            digest = governance.approve(
                spec, reason=reason, steward=steward, signed=self._signed(spec)
            ).spec_hash
        if self.url is not None:  # as `fedhealth site approve` does: the orchestrator learns the decision
            report_approval(self.site_home(site), digest, approved=True, url=self.url)
        return digest

    def owner_key(self) -> Any:
        """The operator's spec-signing key (``fedhealth.crypto.IdentityKey``), made on first use."""
        from fedhealth.crypto import IdentityKey

        path = self.workdir / "owner.key"
        if not path.exists():
            IdentityKey.generate().save(path)
        return IdentityKey.load(path)

    def _signed(self, spec: StudySpec) -> Any:
        from fedhealth.governance import SignedSpec

        if self._operator is None or spec.owner != self._operator.user:
            return None  # only the operator's own specs can be signed here
        return SignedSpec.sign(spec.model_dump(mode="json"), owner=spec.owner, key=self.owner_key())

    def create_study(self, spec: StudySpec, *, approve: bool = True, sign: bool = True) -> StudyInfo:
        """Submit a study. By default each training and evaluation site enrolled here approves the spec first
        (as its steward would), and the spec is signed by its owner (when the owner is the operator):
        ``approve=False`` leaves the stewards' decisions to the caller, ``sign=False`` submits it unsigned."""
        if approve:
            for site in dict.fromkeys([*spec.train_sites, *spec.evaluation_sites]):
                if self.site_home(site).identity_path.exists():
                    self.approve(site, spec)
        signed = self._signed(spec) if sign else None
        if signed is None:
            return self.operator.create_study(spec)
        key = self.owner_key().public().raw.hex()
        self.operator.request("PUT", "/api/v1/governance/owner-key", json={"public_key": key})
        body = {"spec": spec.model_dump(mode="json"), "signature": signed.signature.hex()}
        response = self.operator.request("POST", "/api/v1/governance/studies", json=body)
        return StudyInfo.model_validate(response.json())

    def study(self, study_id: str) -> StudyInfo:
        return self.operator.study(study_id)

    def wait_for_study(
        self,
        study_id: str,
        *,
        timeout: float = 600.0,
        interval: float = 0.1,
        on_progress: Callable[[StudyInfo], None] | None = None,
    ) -> StudyInfo:
        return self.operator.wait_for_study(
            study_id, timeout=timeout, interval=interval, on_progress=on_progress
        )

    def model_bytes(self, study_id: str) -> bytes:
        return self.operator.model_bytes(study_id)

    def report(self, study_id: str) -> dict[str, Any]:
        return self.operator.report(study_id)


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
