"""The orchestrator's home folder: its PKI, signing key, settings, first admin credential and state.

HOME/                     mode 0700; keys, credential and database files 0600 (checked at start-up)
  ca.pem  ca.key          the federation CA (ECDSA P-256); ca.key is 0600
  tls.pem tls.key         the orchestrator's TLS certificate for its host names
  signing.key             Ed25519 key that signs access tokens (0600)
  orchestrator.json       settings chosen at init (host names, URL, database URL)
  admin.credential        the first admin's credential (0600): URL, CA, user, API key
  state/                  SQLite database (unless PostgreSQL), blobs, reports
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fedhealth.core import (
    ConfigError,
    Tightened,
    create_private_file,
    make_private_dir,
    secure_home,
    sha256_hex,
    utcnow,
)
from fedhealth.crypto import (
    IdentityKey,
    PemPair,
    create_ca,
    issue_client_certificate,
    issue_server_certificate,
    write_private,
)
from fedhealth.protocol import OperatorCredential, Role


def new_secret(prefix: str) -> str:
    """A high-entropy secret (256 bits) with a recognisable prefix; stored only as its sha256."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def secret_hash(secret: str) -> str:
    # The secrets are 256-bit random strings, so a plain sha256 is enough (no password stretching needed).
    return sha256_hex(secret.encode())


@dataclass(frozen=True, slots=True)
class OrchestratorHome:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def tls_cert(self) -> Path:
        return self.root / "tls.pem"

    @property
    def tls_key(self) -> Path:
        return self.root / "tls.key"

    @property
    def signing_key_path(self) -> Path:
        return self.root / "signing.key"

    @property
    def settings_path(self) -> Path:
        return self.root / "orchestrator.json"

    @property
    def admin_credential(self) -> Path:
        return self.root / "admin.credential"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def exists(self) -> bool:
        return self.settings_path.exists()

    def secure(self) -> Tightened:
        """Make the home and its state folder 0700 and the files directly in them (keys, the credential,
        the SQLite database and its -wal/-shm) 0600 if looser; :class:`ConfigError` for a home another
        account owns. Returns what changed, for one log line."""
        return secure_home(self.root, what="orchestrator home", subdirs=("state",))

    def require(self) -> None:
        if not self.exists():
            raise ConfigError(
                f"{self.root} is not an orchestrator home; run `fedhealth orchestrator init {self.root}`"
            )

    def settings(self) -> dict[str, Any]:
        self.require()
        return json.loads(self.settings_path.read_text())  # type: ignore[no-any-return]

    def signing_key(self) -> IdentityKey:
        self.require()
        return IdentityKey.load(self.signing_key_path)

    def ca(self) -> PemPair:
        return PemPair(key_pem=self.ca_key.read_bytes(), cert_pem=self.ca_cert.read_bytes())

    def database_url(self, override: str | None = None) -> str:
        return override or self.settings().get("database_url") or _default_db(self)


def init_home(
    root: Path,
    *,
    hosts: list[str],
    url: str,
    database_url: str | None = None,
    federation: str = "fedhealth federation",
    now: datetime | None = None,
) -> OperatorCredential:
    """Create a new federation: CA, TLS certificate, signing key, database and first admin credential. On a
    failure at any step, what this call wrote (and the folders it made, if empty) is removed again."""
    home = OrchestratorHome(root)
    if home.exists():
        raise ConfigError(f"{root} already holds a federation; refusing to overwrite it")
    folders = [p for p in (root, home.state_dir) if not p.exists()]
    database = home.state_dir / "orchestrator.sqlite"
    files = [
        *(home.ca_key, home.ca_cert, home.tls_key, home.tls_cert, home.signing_key_path),
        *(home.admin_credential, home.settings_path, database),
        *(database.with_name(database.name + suffix) for suffix in ("-wal", "-shm", "-journal")),
    ]
    new_files = [p for p in files if not os.path.lexists(p)]
    try:
        return _init_home(
            home, hosts=hosts, url=url, database_url=database_url, federation=federation, now=now
        )
    except BaseException:
        # nothing half made stays behind (a retry would meet keys and a database, with its admin, that a
        # later step failed after): the files this call created and the folders it made, if empty
        for path in new_files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for folder in reversed(folders):
            with contextlib.suppress(OSError):  # not empty: something else is in it, left alone
                folder.rmdir()
        raise


def _init_home(
    home: OrchestratorHome,
    *,
    hosts: list[str],
    url: str,
    database_url: str | None,
    federation: str,
    now: datetime | None,
) -> OperatorCredential:
    from fedhealth.orchestrator._db import make_engine, upgrade_database
    from fedhealth.orchestrator._store import Store

    make_private_dir(home.root)
    ca = create_ca(federation, now=now)
    write_private(home.ca_key, ca.key_pem)
    write_private(home.ca_cert, ca.cert_pem)  # public, but the home's rule is one: every file 0600
    tls = issue_server_certificate(ca, hosts, now=now)
    write_private(home.tls_key, tls.key_pem)
    write_private(home.tls_cert, tls.cert_pem)
    IdentityKey.generate().save(home.signing_key_path)
    make_private_dir(home.state_dir)
    if database_url is None:
        create_private_file(home.state_dir / "orchestrator.sqlite")  # 0600 before SQLite creates it
    api_key = new_secret("fhk")
    client = issue_client_certificate(ca, "admin", valid_days=365)
    credential = OperatorCredential(
        orchestrator=url,
        ca_pem=ca.cert_pem.decode(),
        user="admin",
        api_key=api_key,
        tls_certificate=client.cert_pem.decode(),
        tls_key=client.key_pem.decode(),
    )
    write_private(home.admin_credential, credential.model_dump_json(indent=2).encode())
    settings = {"hosts": hosts, "url": url, "database_url": database_url, "federation": federation}
    write_private(home.settings_path, json.dumps(settings, indent=2).encode())
    # The database last: its admin is the one thing init_home's clean-up cannot take back from a database
    # elsewhere (--database-url), so nothing may fail after it; its tables alone a retry upgrades in place.
    engine = make_engine(database_url or _default_db(home))
    try:
        upgrade_database(engine)
        Store(engine).create_user("admin", Role.ADMIN.value, secret_hash(api_key), now or utcnow())
    finally:
        engine.dispose()
    return credential


def _default_db(home: OrchestratorHome) -> str:
    from fedhealth.orchestrator._db import sqlite_url

    return sqlite_url(home.state_dir / "orchestrator.sqlite")
