"""Site and orchestrator homes are private to their account (issue 10, finding 12), without the services:
the database files are created 0600 whatever the umask, a loosened home is tightened at start-up, and a
home another account owns is refused with one line."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from site_fixtures import make_home
from sqlalchemy import text

from fedhealth.agent._governance import SiteGovernance, site_engine
from fedhealth.core import ConfigError, create_private_file, make_private_dir, secure_home
from fedhealth.orchestrator import OrchestratorHome, init_home
from fedhealth.privacy import BudgetLedger, sqlite_engine


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("factory", [site_engine, sqlite_engine], ids=["governance", "ledger"])
def test_a_new_site_database_and_its_wal_files_are_0600_under_any_umask(tmp_path, permissive_umask, factory):
    path = tmp_path / "site.sqlite"
    engine = factory(path)
    with engine.connect() as conn:
        conn.execute(text("PRAGMA journal_mode=WAL"))
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
        conn.commit()
        files = sorted(tmp_path.glob("site.sqlite*"))
        assert [p.name for p in files] == ["site.sqlite", "site.sqlite-shm", "site.sqlite-wal"]
        for p in files:
            assert mode(p) == 0o600, p.name
    engine.dispose()


def test_a_site_governance_opened_on_a_loosened_home_tightens_it(tmp_path):
    home = make_home(tmp_path / "site")
    SiteGovernance(home).close()
    os.chmod(home.root, 0o755)
    os.chmod(home.database_path, 0o644)
    os.chmod(home.identity_path, 0o640)
    SiteGovernance(home).close()
    assert mode(home.root) == 0o700
    assert mode(home.database_path) == 0o600
    assert mode(home.identity_path) == 0o600


def test_a_home_owned_by_another_account_is_refused(tmp_path, monkeypatch):
    home = make_home(tmp_path / "site")
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)
    with pytest.raises(ConfigError, match=f"belongs to uid {real}, not to this user") as refused:
        home.secure()
    assert "\n" not in str(refused.value)


def test_a_home_that_is_a_symbolic_link_or_a_file_is_refused(tmp_path):
    real = tmp_path / "real"
    make_private_dir(real)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ConfigError, match="not a folder"):
        secure_home(tmp_path / "link", what="site home")
    create_private_file(tmp_path / "file")
    with pytest.raises(ConfigError, match="not a folder"):
        secure_home(tmp_path / "file", what="site home")


def test_secure_home_names_what_it_tightened_and_leaves_private_files_alone(tmp_path):
    home = tmp_path / "h"
    make_private_dir(home)
    (home / "ok.key").write_text("x")
    os.chmod(home / "ok.key", 0o600)
    (home / "open.db").write_text("x")
    os.chmod(home / "open.db", 0o644)
    (home / "run.sh").write_text("x")
    os.chmod(home / "run.sh", 0o755)
    tightened = secure_home(home, what="site home")
    assert sorted((p.name, m) for p, m in tightened.changes) == [("open.db", 0o644), ("run.sh", 0o755)]
    assert (mode(home / "open.db"), mode(home / "run.sh"), mode(home / "ok.key")) == (0o600, 0o700, 0o600)
    assert "open.db 644" in tightened.summary()
    assert not secure_home(home, what="site home")  # nothing left to do


def test_an_orchestrator_home_is_created_private_under_a_permissive_umask(tmp_path, permissive_umask):
    init_home(tmp_path / "orch", hosts=["localhost"], url="https://localhost:1")
    home = OrchestratorHome(tmp_path / "orch")
    assert mode(home.root) == 0o700
    assert mode(home.state_dir) == 0o700
    for path in (home.ca_key, home.tls_key, home.signing_key_path, home.admin_credential):
        assert mode(path) == 0o600, path.name
    for path in home.state_dir.glob("orchestrator.sqlite*"):
        assert mode(path) == 0o600, path.name
    os.chmod(home.state_dir / "orchestrator.sqlite", 0o644)
    assert home.secure()
    assert mode(home.state_dir / "orchestrator.sqlite") == 0o600


def test_a_ledger_on_an_in_memory_database_still_works():
    ledger_engine = sqlite_engine(":memory:")
    BudgetLedger.create_schema(ledger_engine)
    assert BudgetLedger(ledger_engine).budgets() == []


@pytest.mark.parametrize("step", ["server_certificate", "database", "admin_certificate"])
@pytest.mark.parametrize("folder", ["new", "existing"])
def test_an_orchestrator_init_that_fails_at_any_step_leaves_nothing_and_a_retry_succeeds(
    tmp_path, monkeypatch, step, folder
):
    """Until 2026-12-08 a failure after the first write left the CA key (and, after the database step, a
    database with its admin) behind: a retry then met an admin that already existed. Now what the call
    created goes again; a folder that was there before, and what else it holds, stay."""
    import fedhealth.orchestrator._home as home_module
    import fedhealth.orchestrator._store as store_module

    root = tmp_path / "orch"
    if folder == "existing":
        root.mkdir(mode=0o700)
        (root / "README.txt").write_text("the operator's own notes\n")
    before = sorted(p.name for p in root.iterdir()) if root.exists() else None

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{step} failed")

    with monkeypatch.context() as patch:
        if step == "server_certificate":
            patch.setattr(home_module, "issue_server_certificate", broken)
        elif step == "database":
            patch.setattr(store_module.Store, "create_user", broken)
        else:
            patch.setattr(home_module, "issue_client_certificate", broken)
        with pytest.raises(RuntimeError, match=f"{step} failed"):
            init_home(root, hosts=["localhost"], url="https://localhost:1")
    if before is None:
        assert not root.exists()
    else:
        assert sorted(p.name for p in root.iterdir()) == before
    credential = init_home(root, hosts=["localhost"], url="https://localhost:1")
    assert credential.user == "admin"
    assert OrchestratorHome(root).exists()


@pytest.mark.parametrize("step", ["admin_certificate", "database"])
def test_an_orchestrator_init_on_a_database_elsewhere_that_fails_can_be_retried(tmp_path, monkeypatch, step):
    """A database named by --database-url is not the home's to delete: init_home creates its admin last, so
    a failure before leaves no admin in it, and one at the admin's creation leaves only tables a retry
    upgrades in place (the review of 9d1141c: the retry met an admin it could not replace)."""
    import fedhealth.orchestrator._home as home_module
    import fedhealth.orchestrator._store as store_module

    root = tmp_path / "orch"
    (tmp_path / "db").mkdir()
    database_url = f"sqlite:///{tmp_path / 'db' / 'fed.sqlite'}"

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{step} failed")

    with monkeypatch.context() as patch:
        if step == "database":
            patch.setattr(store_module.Store, "create_user", broken)
        else:
            patch.setattr(home_module, "issue_client_certificate", broken)
        with pytest.raises(RuntimeError, match=f"{step} failed"):
            init_home(root, hosts=["localhost"], url="https://localhost:1", database_url=database_url)
    assert not root.exists()
    credential = init_home(root, hosts=["localhost"], url="https://localhost:1", database_url=database_url)
    assert credential.user == "admin"
    assert OrchestratorHome(root).exists()
