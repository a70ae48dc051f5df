"""Orchestrator: the coordinating service (FastAPI + SQLAlchemy + a content-addressed blob store).

Routes are thin adapters over plain handler functions of one :class:`OrchestratorService` (``_app`` says
which module holds which area); durable state is in :class:`Store` (SQLite or PostgreSQL, Alembic-migrated),
tensors in the :class:`BlobStore`, and the round engine moves studies from round to round with a quorum and a
deadline.
"""

from fedhealth.orchestrator._app import create_app
from fedhealth.orchestrator._auth import AuthService, AuthSettings, CertificateMismatch, PeerCertificate
from fedhealth.orchestrator._blobs import BlobStore
from fedhealth.orchestrator._db import make_engine, metadata, sqlite_url, upgrade_database
from fedhealth.orchestrator._engine import RoundEngine
from fedhealth.orchestrator._extensions import default_extensions
from fedhealth.orchestrator._home import OrchestratorHome, init_home
from fedhealth.orchestrator._hooks import NullObserver, StudyObserver
from fedhealth.orchestrator._http import check_certificate_names
from fedhealth.orchestrator._limits import peer_certificate
from fedhealth.orchestrator._report import build_report, report_markdown, study_info, write_report
from fedhealth.orchestrator._serve import TlsFiles, serve
from fedhealth.orchestrator._service import (
    Extension,
    ExtensionContext,
    OrchestratorService,
    OrchestratorSettings,
    Registration,
    Services,
    start_service,
)
from fedhealth.orchestrator._store import ModelVersion, NewRound, RoundRow, SiteRow, Store, StudyRow, TaskRow

__all__ = [
    "AuthService",
    "AuthSettings",
    "BlobStore",
    "CertificateMismatch",
    "Extension",
    "ExtensionContext",
    "ModelVersion",
    "NewRound",
    "NullObserver",
    "OrchestratorHome",
    "OrchestratorService",
    "OrchestratorSettings",
    "PeerCertificate",
    "Registration",
    "RoundEngine",
    "RoundRow",
    "Services",
    "SiteRow",
    "Store",
    "StudyObserver",
    "StudyRow",
    "TaskRow",
    "TlsFiles",
    "build_report",
    "check_certificate_names",
    "create_app",
    "default_extensions",
    "init_home",
    "make_engine",
    "metadata",
    "peer_certificate",
    "report_markdown",
    "serve",
    "sqlite_url",
    "start_service",
    "study_info",
    "upgrade_database",
    "write_report",
]
