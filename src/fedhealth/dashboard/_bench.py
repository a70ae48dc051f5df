"""``fedhealth benchmark dashboard``: each dashboard page's server time on a large seeded federation.

The orchestrator's app (with the dashboard) runs in this process on a fresh SQLite database; sites, users and
studies are made through the store, and the rounds, tasks, model versions and budget entries of finished
studies are inserted in bulk (the same rows the round engine writes, without running 20,000 rounds). Each page
is then requested through the ASGI interface, signed in as an admin: the time measured is the server's, from
the request to the last byte of the answer, without a network.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from fedhealth.crypto import IdentityKey
from fedhealth.dashboard._extension import DashboardExtension
from fedhealth.governance import GOVERNANCE_METADATA, AuditEventType
from fedhealth.learning import SYNTHETIC_RECIPE, SyntheticParams
from fedhealth.orchestrator import (
    OrchestratorSettings,
    Services,
    create_app,
    default_extensions,
    metadata,
)
from fedhealth.protocol import Role, StudySpec
from fedhealth.runtime import recipe_spec

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass(frozen=True, slots=True, kw_only=True)
class PageTime:
    page: str
    first_ms: float  # the first request of a fresh process (caches cold)
    median_ms: float
    p90_ms: float
    bytes: int
    requests: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DashboardBenchmark:
    sites: int
    studies: int
    rounds: int
    tasks: int
    audit_entries: int
    seed_s: float
    pages: list[PageTime]


def _seed(svc: Services, *, sites: int, studies: int, rounds_per_study: int, sites_per_study: int) -> int:
    """Sites, finished studies with their rounds and tasks, model versions and budget entries; the number of
    audit entries written."""
    store, now = svc.store, svc.settings.clock.now()
    names = [f"site-{i:03d}" for i in range(sites)]
    for name in names:
        store.create_site(name, now)
    t_rounds, t_tasks = metadata.tables["rounds"], metadata.tables["tasks"]
    t_studies, t_versions = metadata.tables["studies"], metadata.tables["model_versions"]
    t_provenance = GOVERNANCE_METADATA.tables["gov_model_versions"]
    recipe = recipe_spec(SYNTHETIC_RECIPE, SyntheticParams(n_params=10))
    entries = 0
    for s in range(studies):
        members = [names[(s + k) % sites] for k in range(sites_per_study)]
        spec = StudySpec(
            name=f"bench-{s}",
            dataset="bench",
            recipe=recipe,
            rounds=rounds_per_study,
            train_sites=sorted(members),
            round_deadline_s=60.0,
        )
        study, _ = store.create_study(
            spec=spec, model_digest=f"{s:064x}", state_digest=None, first=None, when=now
        )
        round_rows, task_rows, versions, provenance = [], [], [], []
        for n in range(1, rounds_per_study + 1):
            rid, started = f"rd_{s}_{n}", now + timedelta(seconds=n)
            digest_in, digest_out = f"{s:032x}{n - 1:032x}", f"{s:032x}{n:032x}"
            metrics = {
                "train_loss": 1.0 / n,
                "accuracy": 0.5 + 0.4 * n / rounds_per_study,
                "sites": len(members),
            }
            round_rows.append(
                {
                    "id": rid,
                    "study_id": study.id,
                    "number": n,
                    "kind": "train",
                    "status": "completed",
                    "reason": None,
                    "started_at": started,
                    "deadline_at": started + timedelta(minutes=1),
                    "ended_at": started + timedelta(milliseconds=500),
                    "model_in_digest": digest_in,
                    "model_out_digest": digest_out,
                    "state_out_digest": None,
                    "metrics_json": json.dumps(metrics),
                }
            )
            for k, site in enumerate(members):
                done = not (k == 0 and n % 10 == 0)  # a dropout every tenth round
                task_rows.append(
                    {
                        "id": f"tk_{s}_{n}_{k}",
                        "round_id": rid,
                        "study_id": study.id,
                        "site": site,
                        "kind": "train",
                        "status": "completed" if done else "timed_out",
                        "reason": None if done else "deadline",
                        "created_at": started,
                        "delivered_at": started,
                        "ended_at": started,
                        "result_digest": None,
                        "num_samples": 100,
                        "metrics_json": json.dumps({"num_samples": 100, "train_loss": 1.0 / n})
                        if done
                        else None,
                        "attestation_json": None,
                    }
                )
            versions.append(
                {
                    "digest": digest_out,
                    "study_id": study.id,
                    "round": n,
                    "parent_digest": digest_in,
                    "created_at": started,
                    "num_sites": len(members),
                    "train_loss": 1.0 / n,
                }
            )
            provenance.append(
                {
                    "model_digest": digest_out,
                    "parent_digest": digest_in,
                    "study_id": study.id,
                    "round": n,
                    "created_at": started,
                    "body": json.dumps(
                        {
                            "study_id": study.id,
                            "round": n,
                            "n_sites": len(members),
                            "parent_digest": digest_in,
                            "software_version": "bench",
                            "epsilon_spent": {m: 0.01 * n for m in members},
                        }
                    ),
                }
            )
        with store.engine.begin() as c:
            c.execute(t_rounds.insert(), round_rows)
            c.execute(t_tasks.insert(), task_rows)
            c.execute(t_versions.insert(), versions)
            c.execute(t_provenance.insert(), provenance)
            c.execute(
                t_studies.update()
                .where(t_studies.c.id == study.id)
                .values(status="completed", completed_rounds=rounds_per_study, ended_at=now)
            )
        with svc.audit.batch():  # one budget attestation per round, from the study's first site
            for n in range(1, rounds_per_study + 1):
                svc.audit.append(
                    AuditEventType.BUDGET_SPENT,
                    {
                        "task_id": f"tk_{s}_{n}_1",
                        "study_id": study.id,
                        "site": members[1],
                        "round": n,
                        "kind": "train",
                        "dataset": "bench",
                        "delta": 1e-5,
                        "study_epsilon": 0.01 * n,
                        "total_epsilon": 0.01 * n + 0.001 * s,
                        "budget_epsilon": 100.0,
                        "task_epsilon": 0.01,
                    },
                )
                entries += 1
    return entries


async def _measure(svc: Services, app: Any, pages: list[str], repeats: int) -> list[PageTime]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="https://bench", follow_redirects=True
    ) as client:
        api_key = svc.auth.new_user("bench-admin", Role.ADMIN)
        login = await client.get("/ui/login")
        found = _CSRF.search(login.text)
        assert found is not None
        await client.post(
            "/ui/login", data={"user": "bench-admin", "api_key": api_key, "csrf_token": found[1]}
        )
        out = []
        for page in pages:
            times, size = [], 0
            for _ in range(repeats + 1):
                start = time.perf_counter()
                response = await client.get(page)
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    raise RuntimeError(f"{page}: {response.status_code} {response.text[:200]}")
                times.append(elapsed)
                size = len(response.content)
            first, times = times[0], times[1:]  # the first request warms caches: reported apart
            ordered = sorted(times)
            out.append(
                PageTime(
                    page=page,
                    first_ms=1000 * first,
                    median_ms=1000 * statistics.median(times),
                    p90_ms=1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
                    bytes=size,
                    requests=repeats,
                )
            )
        return out


def benchmark_dashboard(
    *, sites: int = 50, studies: int = 200, rounds: int = 20_000, sites_per_study: int = 5, repeats: int = 15
) -> DashboardBenchmark:
    """Seed ``sites`` sites and ``studies`` finished studies of ``rounds`` rounds in all, then time each page
    ``repeats`` times (module docstring)."""
    per_study = max(1, rounds // studies)
    with tempfile.TemporaryDirectory() as tmp:
        settings = OrchestratorSettings(state_dir=Path(tmp), signing_key=IdentityKey.generate(), rate_per_s=0)
        app = create_app(settings, extensions=[*default_extensions(), DashboardExtension()])

        async def run() -> DashboardBenchmark:
            async with app.router.lifespan_context(app):
                svc: Services = app.state.services
                started = time.perf_counter()
                entries = await asyncio.to_thread(
                    _seed,
                    svc,
                    sites=sites,
                    studies=studies,
                    rounds_per_study=per_study,
                    sites_per_study=min(sites_per_study, sites),
                )
                seed_s = time.perf_counter() - started
                study_id = svc.store.list_studies()[0].id
                pages = [
                    "/ui/federation",
                    "/ui/studies",
                    f"/ui/studies/{study_id}",
                    "/ui/privacy",
                    "/ui/models",
                    "/ui/drift",
                    "/ui/audit",
                    "/ui/audit?type=budget.spent",
                    "/ui/audit/verify",
                ]
                times = await _measure(svc, app, pages, repeats)
                return DashboardBenchmark(
                    sites=sites,
                    studies=studies,
                    rounds=per_study * studies,
                    tasks=per_study * studies * min(sites_per_study, sites),
                    audit_entries=entries,
                    seed_s=seed_s,
                    pages=times,
                )

        return asyncio.run(run())
