"""The site dashboard with the orchestrator out of reach: the steward's pages do not wait on it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from fedhealth.agent import SiteHome
from fedhealth.agent._governance import SiteGovernance
from fedhealth.crypto import IdentityKey, create_ca
from fedhealth.dashboard import _site


@pytest.fixture
def home(tmp_path: Path) -> SiteHome:
    home = SiteHome(tmp_path / "site")
    home.root.mkdir(mode=0o700)
    IdentityKey.generate().save(home.identity_path)
    home.settings_path.write_text(json.dumps({"site": "solo", "orchestrator": "https://127.0.0.1:1"}))
    home.ca_path.write_bytes(create_ca("test federation").cert_pem)  # as enrollment leaves it
    return home


def test_after_a_failed_fetch_the_queue_does_not_ask_the_orchestrator_again_for_a_minute(home, monkeypatch):
    calls = []

    def unreachable(governance, client):
        calls.append(1)
        raise httpx.ConnectError("connection refused")

    monkeypatch.setattr(_site, "sync_approvals", unreachable)
    monkeypatch.setattr(_site, "_sync_failed", {})
    now = [1000.0]
    monkeypatch.setattr(_site.time, "monotonic", lambda: now[0])
    with SiteGovernance(home) as governance:
        first = _site._sync(governance)
        second = _site._sync(governance)  # the page loaded again: no new wait on the orchestrator
        assert calls == [1]
        assert first is not None
        assert "could not fetch" in first
        assert second is not None
        assert "asked again in a minute" in second
        now[0] += _site._SYNC_PAUSE_S + 1
        _site._sync(governance)
        assert calls == [1, 1]  # a minute later it asks again

        in_reach = type("SyncResult", (), {"refused": ()})()
        monkeypatch.setattr(_site, "sync_approvals", lambda governance, client: in_reach)
        now[0] += _site._SYNC_PAUSE_S + 1
        assert _site._sync(governance) is None  # back in reach: no warning, and the pause is forgotten
        assert str(home.root) not in _site._sync_failed


def test_a_home_without_its_federation_ca_shows_a_warning_instead_of_failing_the_page(home, monkeypatch):
    """A site home whose ca.pem was lost cannot make a client (no CA to pin, and the system's authorities
    are not trusted): the queue says so, with what to do, and shows what the site holds."""
    home.ca_path.unlink()
    monkeypatch.setattr(_site, "_sync_failed", {})
    with SiteGovernance(home) as governance:
        warning = _site._sync(governance)
    assert warning is not None
    assert "could not fetch the specs awaiting this site (no federation CA to pin" in warning
    assert "restore ca.pem" in warning
