"""The collective calls skip the router's search (``_direct``), and nothing else: through the whole app (ASGI,
no sockets) a collective call still gets every check of the request gate (token, revocation at the next
call, a declared or a streamed body over the limit) and the version headers, with the same statuses and
error shapes; and a direct route that another route would shadow is refused when the app is built."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI

import fedhealth
from fedhealth.core import ConfigError, canonical_json
from fedhealth.crypto import IdentityKey
from fedhealth.orchestrator import OrchestratorSettings, create_app
from fedhealth.orchestrator._collective import COLLECTIVE_PATH, collective_router
from fedhealth.orchestrator._direct import DirectRoutes, install_direct_routes
from fedhealth.orchestrator._home import secret_hash
from fedhealth.protocol import (
    SESSION_HEADER,
    RecipeSpec,
    SecureAggregationSpec,
    StudySpec,
    agent_login_message,
    version_headers,
)

LIMIT = 4096
SITES = ["alpha", "beta", "gamma"]
KEYS = {s: IdentityKey.generate() for s in SITES}


def _spec() -> StudySpec:
    return StudySpec(
        name="collective",
        dataset="none",
        recipe=RecipeSpec(name="collective-probe", params={"size": 4}),
        rounds=1,
        train_sites=SITES,
        secure_aggregation=SecureAggregationSpec(
            site_keys={s: k.public().fingerprint for s, k in KEYS.items()}, stage_timeout_s=30.0
        ),
    )


def _bearer(svc: Any, site: str) -> str:
    now = datetime.now(UTC)
    svc.store.create_site(site, now)
    svc.store.add_enrollment_token(site, secret_hash("fhe_t"), now, now + timedelta(days=1))
    svc.auth.enroll(site=site, token="fhe_t", public_key_hex=KEYS[site].public().raw.hex())
    challenge, _ = svc.auth.challenge(site)
    signature = KEYS[site].sign(canonical_json(agent_login_message(site, challenge))).hex()
    token, _ = svc.auth.agent_token(site=site, challenge=challenge, signature_hex=signature)
    return f"Bearer {token}"


def _direct_layer(app: FastAPI) -> DirectRoutes:
    layer: Any = app.middleware_stack
    while not isinstance(layer, DirectRoutes):
        layer = layer.app
    return layer


def test_a_collective_call_skips_the_router_and_keeps_every_check_of_the_gate(tmp_path: Path) -> None:
    settings = OrchestratorSettings(
        state_dir=tmp_path, signing_key=IdentityKey.generate(), max_body_bytes=LIMIT
    )
    app = create_app(settings)
    routed: list[str] = []

    async def main() -> None:
        async with app.router.lifespan_context(app):
            svc = app.state.services
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://o")
            assert (await http.get("/healthz")).status_code == 200  # builds the middleware stack
            direct = _direct_layer(app)
            router_side = direct.app

            async def spy(scope: Any, receive: Any, send: Any) -> None:
                routed.append(scope["path"])
                await router_side(scope, receive, send)

            direct.app = spy
            bearer = _bearer(svc, "alpha")
            driver = svc.engine.collective.start(
                round_id="rd-1",
                study_id="st-1",
                number=1,
                spec=_spec(),
                tasks={f"tk-{s}": s for s in SITES},
                identities={s: k.public().raw.hex() for s, k in KEYS.items()},
                on_done=lambda _: None,
                on_failed=lambda *_: None,
            )
            path = "/api/v1/agent/tasks/tk-alpha/collective/0"
            session = {SESSION_HEADER: driver.config.attempt}

            answer = await http.post(path, content=b"x" * 16, headers=session)
            assert answer.status_code == 401
            assert answer.json() == {
                "error": "missing credentials: send 'Authorization: Bearer <token>'",
                "detail": None,
            }
            assert answer.headers["www-authenticate"] == "Bearer"
            for name, value in version_headers(fedhealth.__version__).items():
                assert answer.headers[name] == value

            signed = {**session, "Authorization": bearer}
            answer = await http.post(path, content=b"x" * (LIMIT + 1), headers=signed)
            assert answer.status_code == 413
            assert (
                answer.json()["error"]
                == f"request body of {LIMIT + 1} bytes exceeds the limit of {LIMIT} bytes"
            )

            async def streamed() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
                for _ in range(4):
                    yield b"x" * 2048

            answer = await http.post(path, content=streamed(), headers=signed)
            assert answer.status_code == 413
            assert answer.json() == {
                "error": f"request body exceeds the limit of {LIMIT} bytes",
                "detail": None,
            }
            assert answer.headers["connection"] == "close"

            answer = await http.get(
                "/api/v1/agent/tasks/tk-beta/collective/0", params={"wait": 0}, headers=signed
            )
            assert answer.status_code == 403
            assert answer.json()["error"] == "this task belongs to another site"

            answer = await http.get(path, params={"wait": 0}, headers=signed)
            assert answer.status_code == 204
            assert answer.headers[next(iter(version_headers(fedhealth.__version__)))]

            svc.store.revoke_site("alpha", datetime.now(UTC))
            answer = await http.get(path, params={"wait": 0}, headers=signed)
            assert answer.status_code == 403
            assert answer.json()["error"] == "this site has been revoked"

            # not a collective path (no integer index): the router's answer, as before
            assert (await http.get("/api/v1/agent/tasks/tk-alpha/collective/x")).status_code == 404
            await http.aclose()

    asyncio.run(main())
    # not one collective call went to the router; everything else did
    assert routed == ["/api/v1/agent/tasks/tk-alpha/collective/x"]


def test_a_direct_route_that_another_route_would_shadow_is_refused() -> None:
    app = FastAPI()
    earlier = APIRouter()

    @earlier.post("/api/v1/agent/tasks/{task_id}/{rest:path}")
    async def anything(task_id: str, rest: str) -> dict[str, str]:
        return {}

    app.include_router(earlier)
    collective = collective_router()
    app.include_router(collective)
    with pytest.raises(ConfigError, match="shadowed"):
        install_direct_routes(
            app, [r for r in collective.routes if r.path == COLLECTIVE_PATH], marker="/collective/"
        )  # type: ignore[attr-defined]
