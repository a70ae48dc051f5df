"""Helpers of the dashboard tests: an in-process orchestrator with the dashboard, seeded through its store,
and signing in through the real form."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from fedhealth.crypto import IdentityKey
from fedhealth.dashboard import DashboardExtension, DriftPolicy
from fedhealth.governance import AuditEventType
from fedhealth.orchestrator import (
    ModelVersion,
    NewRound,
    OrchestratorSettings,
    Services,
    create_app,
    default_extensions,
)
from fedhealth.protocol import RoundStatus, SiteMetrics, TaskKind, TaskStatus
from support import TestClient, breast_spec

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found is not None, "the page has no CSRF field"
    return found.group(1)


@dataclass
class Dashboard:
    client: TestClient
    svc: Services


@contextmanager
def dashboard_app(
    state_dir: Path, database_url: str | None = None, drift: DriftPolicy | None = None
) -> Iterator[Dashboard]:
    settings = OrchestratorSettings(
        state_dir=state_dir, signing_key=IdentityKey.generate(), rate_per_s=0, database_url=database_url
    )
    app = create_app(settings, extensions=[*default_extensions(), DashboardExtension(drift=drift)])
    # https: the session cookie is Secure, so a client only sends it back over HTTPS
    with TestClient(app, base_url="https://testserver") as client:
        yield Dashboard(client=client, svc=app.state.services)


@contextmanager
def rita_under_mtls(
    tmp_path: Path, *, seeded: bool = False
) -> Iterator[tuple[TestClient, TestClient, Dashboard]]:
    """An orchestrator with the dashboard, a client whose every request arrives with the client certificate
    of the researcher ``rita`` (as ``_serve`` adds it under ``--mtls``), and a plain client of the same app
    for set-up (``seeded``: two sites and a round)."""
    from fedhealth.crypto import create_ca, issue_client_certificate
    from fedhealth.orchestrator._serve import _with_client_certificate
    from fedhealth.protocol import Role

    settings = OrchestratorSettings(
        state_dir=tmp_path / "state", signing_key=IdentityKey.generate(), rate_per_s=0
    )
    app = create_app(settings, extensions=[*default_extensions(), DashboardExtension()])
    rita = issue_client_certificate(create_ca("fedhealth test CA"), "rita").cert_pem.decode()
    with TestClient(app, base_url="https://testserver") as plain:
        dash = Dashboard(client=plain, svc=app.state.services)
        add_user(dash.svc, "rita", Role.RESEARCHER)
        if seeded:
            seed(dash.svc, sites=2, studies=0, rounds=1)
        yield TestClient(_with_client_certificate(app, rita), base_url="https://testserver"), plain, dash


def add_user(svc: Services, name: str, role: object) -> str:
    return svc.auth.new_user(name, role)  # type: ignore[arg-type]


def sign_in(client: TestClient | httpx.Client, user: str, api_key: str) -> httpx.Response:
    page = client.get("/ui/login")
    assert page.status_code == 200
    return client.post("/ui/login", data={"user": user, "api_key": api_key, "csrf_token": csrf_of(page.text)})


def seed(svc: Services, *, sites: int, studies: int, rounds: int, owner: str = "admin") -> list[str]:
    """``sites`` sites and ``studies`` finished studies of ``rounds`` training rounds each (every site
    contributes, one drops in round 1), a model version and a budget entry per round; returns study ids."""
    store, now = svc.store, svc.settings.clock.now()
    names = [f"site-{i:03d}" for i in range(sites)]
    existing = {s.name for s in store.list_sites()}
    for name in names:
        if name not in existing:
            store.create_site(name, now)
    ids = []
    for i in range(studies):
        spec = breast_spec(names, rounds=rounds, name=f"study-{len(ids)}-{i}", owner=owner)
        digest = f"{i:064x}"
        first = NewRound(
            number=1,
            kind=TaskKind.TRAIN,
            sites=names,
            model_in_digest=digest,
            deadline_at=now + timedelta(hours=1),
        )
        study, r = store.create_study(
            spec=spec, model_digest=digest, state_digest=None, first=first, when=now
        )
        ids.append(study.id)
        assert r is not None
        for n in range(1, rounds + 1):
            tasks = store.tasks_of_round(r.id)
            for t in tasks:
                if n == 1 and t.site == names[-1]:
                    store.close_task(t.id, TaskStatus.TIMED_OUT, "no result by the deadline", now)
                else:
                    store.complete_task(
                        t.id,
                        digest=None,
                        num_samples=10,
                        when=now,
                        metrics=SiteMetrics(num_samples=10, train_loss=1.0 / n),
                    )
            out = f"{i:032x}{n:032x}"
            last = n == rounds
            nxt = (
                None
                if last
                else NewRound(
                    number=n + 1,
                    kind=TaskKind.TRAIN,
                    sites=names,
                    model_in_digest=out,
                    deadline_at=now + timedelta(hours=1),
                )
            )
            version = ModelVersion(
                digest=out,
                study_id=study.id,
                round=n,
                parent_digest=r.model_in_digest,
                created_at=now,
                num_sites=len(names),
                train_loss=1.0 / n,
            )
            next_row = store.finish_round(
                r.id,
                status=RoundStatus.COMPLETED,
                reason=None,
                when=now,
                metrics={"train_loss": 1.0 / n, "accuracy": 0.5 + n / (2 * rounds + 2), "sites": len(names)},
                model_out=out,
                version=version,
                next_round=nxt,
                study_status=None if not last else _completed(),
                study_reason=None,
            )
            svc.audit.append(
                AuditEventType.BUDGET_SPENT,
                {
                    "task_id": f"t-{i}-{n}",
                    "study_id": study.id,
                    "site": names[0],
                    "round": n,
                    "kind": "train",
                    "dataset": "breast-cancer",
                    "delta": 1e-5,
                    "study_epsilon": 0.1 * n,
                    "total_epsilon": 0.1 * n,
                    "budget_epsilon": 5.0,
                    "task_epsilon": 0.1,
                },
            )
            if next_row is not None:
                r = next_row
    return ids


def _completed():
    from fedhealth.protocol import StudyStatus

    return StudyStatus.COMPLETED


def figure_of(html: str, figure_id: str) -> dict:
    found = re.search(rf'<script type="application/json" id="{figure_id}">(.*?)</script>', html, re.S)
    assert found is not None, f"no figure {figure_id}"
    return json.loads(found.group(1))


def copy_screenshots(folder: Path, docs: Path) -> None:
    """The screenshots of a browser test into docs/dashboard/, as 128-colour PNGs (a third of the size)."""
    from PIL import Image

    docs.mkdir(parents=True, exist_ok=True)
    for shot in sorted(folder.glob("*.png")):
        image = Image.open(shot).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        image.save(docs / shot.name, optimize=True)


_SERIOUS = ("serious", "critical")


def assert_accessible(page: Any) -> None:
    """axe-core (from the installed axe-playwright-python) run in the page: no serious or critical violation.
    The page's context must bypass its CSP (the script is injected inline)."""
    import importlib.resources

    script = (importlib.resources.files("axe_playwright_python") / "axe.min.js").read_text(encoding="utf-8")
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.add_script_tag(content=script)
    violations = page.evaluate(
        """async () => (await axe.run(document, {resultTypes: ['violations']})).violations.map(v => ({
             id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.target.join(' '))}))"""
    )
    bad = [v for v in violations if v["impact"] in _SERIOUS]
    assert not bad, f"{page.url}: {bad}"
