"""An attacker who controls time against the orchestrator: a site whose clock is skewed (or that lies) sends
timestamps the orchestrator keeps and shows. What the orchestrator keeps is dated by its own clock (an
injected ``ManualClock`` here), never by the site's."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from fedhealth.core import ManualClock
from fedhealth.crypto import Audience, IdentityKey, TokenClaims
from fedhealth.orchestrator import OrchestratorSettings, start_service
from fedhealth.orchestrator._auth import Principal
from fedhealth.orchestrator._routes_admin import register_site
from fedhealth.orchestrator._routes_auth import enroll_site
from fedhealth.orchestrator._routes_sites import accept_readiness, readiness_of_sites
from fedhealth.protocol import EnrollRequest, Role, SiteCreate, SiteReadiness

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ADMIN = Principal(
    name="root",
    role=Role.ADMIN,
    claims=TokenClaims(
        subject="root",
        role=Role.ADMIN.value,
        audience=Audience.OPERATOR,
        issued_at=T0,
        expires_at=T0 + timedelta(minutes=15),
        token_id="t-root",
    ),
)


@pytest.mark.parametrize(
    "claimed",
    [
        datetime.max.replace(tzinfo=UTC),
        datetime.max.replace(tzinfo=timezone(-timedelta(hours=23, minutes=59))),
        datetime.min.replace(tzinfo=UTC),
        datetime(2026, 3, 1, 12, 0),  # no offset: which zone's noon?
        datetime(2026, 3, 2, 2, 0, tzinfo=timezone(timedelta(hours=14))),  # noon UTC, shown as "02:00 UTC"
    ],
    ids=["9999-12-31Z", "9999-12-31-23:59", "0001-01-01Z", "naive", "+14:00"],
)
def test_a_sites_readiness_report_is_dated_by_the_orchestrators_clock(tmp_path: Path, claimed: datetime):
    async def main() -> list[datetime]:
        clock = ManualClock(T0)
        settings = OrchestratorSettings(
            state_dir=tmp_path / "state", signing_key=IdentityKey.generate(), clock=clock
        )
        svc = await start_service(settings)
        try:
            created = register_site(svc, ADMIN, SiteCreate(name="site-a"))
            key = IdentityKey.generate().public().raw.hex()
            enroll_site(svc, EnrollRequest(site="site-a", token=created.enrollment_token, public_key=key))
            clock.advance(90)
            report = SiteReadiness(
                site="site-a",
                checked_at=claimed,
                software_version="1",
                protocol_version=1,
                ready=True,
                checks=[],
            )
            accept_readiness(svc, "site-a", report)
            kept = [r.readiness.checked_at for r in readiness_of_sites(svc) if r.readiness is not None]
            # a later report replaces it, dated by the orchestrator's clock again
            clock.advance(3600)
            accept_readiness(svc, "site-a", report)
            kept += [r.readiness.checked_at for r in readiness_of_sites(svc) if r.readiness is not None]
            return kept
        finally:
            await svc.close()

    # the orchestrator's time of receipt, in UTC: a site cannot look freshly checked for ever, nor shift its
    # report's time by its offset or leave the zone unsaid
    assert asyncio.run(main()) == [T0 + timedelta(seconds=90), T0 + timedelta(seconds=3690)]
