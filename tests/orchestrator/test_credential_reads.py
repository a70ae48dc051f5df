"""A site's credentials are read from the database at every request: a revocation or a rotation made
through another connection or process (another orchestrator on the same database, an administrator's tool)
counts at the very next request."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fedhealth.orchestrator import Store, make_engine, sqlite_url, upgrade_database
from fedhealth.orchestrator._store import SiteStatus

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
KEY = "ab" * 32


@pytest.fixture
def stores(tmp_path):
    """Two stores on one database file, each with its own engine, as two processes would have."""
    url = sqlite_url(tmp_path / "o.sqlite")
    serving, other = make_engine(url), make_engine(url)
    upgrade_database(serving)
    yield Store(serving), Store(other)
    serving.dispose()
    other.dispose()


def _enrolled(store: Store, site: str) -> None:
    store.create_site(site, T0)
    store.add_enrollment_token(site, "h" * 64, T0, datetime(2027, 1, 1, tzinfo=UTC))
    store.enroll_site(site=site, token_hash="h" * 64, public_key=KEY, when=T0, cert_fingerprint="f" * 64)


def test_a_revocation_made_by_another_process_counts_at_the_next_read(stores):
    serving, other = stores
    _enrolled(other, "alpha")
    for _ in range(3):
        credentials = serving.site_credentials("alpha")
        assert credentials is not None
        assert credentials.status is SiteStatus.ACTIVE
    assert other.revoke_site("alpha", T0)
    credentials = serving.site_credentials("alpha")
    assert credentials is not None
    assert credentials.status is SiteStatus.REVOKED


def test_a_rotation_made_by_another_process_retires_the_key_at_the_next_read(stores):
    serving, other = stores
    _enrolled(other, "beta")
    assert serving.site_credentials("beta") == serving.site_credentials("beta")
    other.rotate_site("beta", "r" * 64, T0, datetime(2027, 1, 1, tzinfo=UTC))
    credentials = serving.site_credentials("beta")
    assert credentials is not None
    assert (credentials.status, credentials.public_key, credentials.cert_fingerprint) == (
        SiteStatus.PENDING,
        None,
        None,
    )
    assert serving.site_credentials("nobody") is None
