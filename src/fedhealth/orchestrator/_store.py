"""The orchestrator's durable state: one interface over SQLAlchemy Core, the same on SQLite and PostgreSQL.

Every method is one transaction. State changes that must happen together (closing a round, recording the
model version, moving the study on and opening the next round) are one call, so a crash leaves either the old
state or the new one, never half of each.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sqlalchemy import Connection, Engine, and_, delete, exists, func, insert, inspect, select, update
from sqlalchemy import column as sa_column
from sqlalchemy import table as sa_table
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError

from fedhealth.core import ConflictError, InputError, NotFoundError, new_id
from fedhealth.orchestrator._db import (
    challenges,
    enrollment_tokens,
    model_versions,
    revoked_tokens,
    rounds,
    site_approvals,
    sites,
    studies,
    tasks,
    users,
)
from fedhealth.protocol import (
    ApprovalState,
    RoundStatus,
    SiteAttestation,
    SiteMetrics,
    StudySpec,
    StudyStatus,
    TaskKind,
    TaskStatus,
)

OPEN_TASK_STATES = (TaskStatus.PENDING.value, TaskStatus.DELIVERED.value)
# a study that has not ended: waiting for its sites' approvals, or running rounds
LIVE_STUDY_STATES = (StudyStatus.AWAITING_APPROVAL.value, StudyStatus.RUNNING.value)


def _user(row: RowMapping | None) -> UserRow | None:
    if row is None:
        return None
    return UserRow(
        name=row["name"],
        role=row["role"],
        api_key_hash=row["api_key_hash"],
        created_at=_aware(row["created_at"]),  # type: ignore[arg-type]
        revoked_at=_aware(row["revoked_at"]),
    )


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything we write is UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class SiteStatus(StrEnum):
    PENDING = "pending"  # registered by an admin (or rotated), not enrolled with a key yet
    ACTIVE = "active"  # enrolled: its public key is known
    REVOKED = "revoked"


class EnrollOutcome(StrEnum):
    """What an enrollment attempt came to (only ``ENROLLED`` changes anything)."""

    ENROLLED = "enrolled"
    INVALID_TOKEN = "invalid_token"  # noqa: S105 - unknown, superseded, spent, expired, or another site's token
    ALREADY_ENROLLED = "already_enrolled"  # a valid token, but the site has a key: re-keying is a rotation
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteRow:
    name: str
    created_at: datetime
    last_seen_at: datetime | None
    status: SiteStatus = SiteStatus.PENDING
    public_key: str | None = None
    enrolled_at: datetime | None = None
    revoked_at: datetime | None = None
    software_version: str | None = None
    protocol_version: int | None = None
    cert_fingerprint: str | None = None  # sha256 of the TLS client certificate issued at enrollment


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteCredentials:
    """What authenticating a site's request needs to know now: its status, its key, its certificate."""

    status: SiteStatus
    public_key: str | None
    cert_fingerprint: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class UserRow:
    name: str
    role: str
    api_key_hash: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyRow:
    id: str
    name: str
    spec: StudySpec
    status: StudyStatus
    reason: str | None
    created_at: datetime
    ended_at: datetime | None
    completed_rounds: int
    model_digest: str
    state_digest: str | None
    spec_hash: str | None = None
    approval_deadline_at: datetime | None = None

    @property
    def named_sites(self) -> list[str]:
        """Every site the study names (training and evaluation): each must approve its spec."""
        return sorted({*self.spec.train_sites, *self.spec.evaluation_sites})


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundRow:
    id: str
    study_id: str
    number: int
    kind: TaskKind
    status: RoundStatus
    reason: str | None
    started_at: datetime
    deadline_at: datetime
    ended_at: datetime | None
    model_in_digest: str
    model_out_digest: str | None
    state_out_digest: str | None
    metrics: dict[str, Any] | None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRow:
    id: str
    round_id: str
    study_id: str
    site: str
    kind: TaskKind
    status: TaskStatus
    reason: str | None
    created_at: datetime
    delivered_at: datetime | None
    ended_at: datetime | None
    result_digest: str | None
    num_samples: int | None
    metrics: SiteMetrics | None
    attestation: SiteAttestation | None = None

    @property
    def is_open(self) -> bool:
        return self.status.value in OPEN_TASK_STATES


@dataclass(frozen=True, slots=True, kw_only=True)
class NewRound:
    """A round to open: number, kind, the sites that get a task, the model they start from, deadline."""

    number: int
    kind: TaskKind
    sites: Sequence[str]
    model_in_digest: str
    deadline_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelVersion:
    digest: str
    study_id: str
    round: int
    parent_digest: str | None
    created_at: datetime
    num_sites: int
    train_loss: float | None


def _site(row: RowMapping) -> SiteRow:
    return SiteRow(
        name=row["name"],
        created_at=_aware(row["created_at"]),  # type: ignore[arg-type]
        last_seen_at=_aware(row["last_seen_at"]),
        status=SiteStatus(row["status"]),
        public_key=row["public_key"],
        enrolled_at=_aware(row["enrolled_at"]),
        revoked_at=_aware(row["revoked_at"]),
        software_version=row.get("software_version"),
        protocol_version=row.get("protocol_version"),
        cert_fingerprint=row["cert_fingerprint"],
    )


def _study(row: RowMapping, spec: StudySpec | None = None) -> StudyRow:
    return StudyRow(
        id=row["id"],
        name=row["name"],
        spec=spec if spec is not None else StudySpec.model_validate_json(row["spec_json"]),
        status=StudyStatus(row["status"]),
        reason=row["reason"],
        created_at=_aware(row["created_at"]),  # type: ignore[arg-type]
        ended_at=_aware(row["ended_at"]),
        completed_rounds=row["completed_rounds"],
        model_digest=row["model_digest"],
        state_digest=row["state_digest"],
        spec_hash=row.get("spec_hash"),
        approval_deadline_at=_aware(row.get("approval_deadline_at")),
    )


def _round(row: RowMapping) -> RoundRow:
    return RoundRow(
        id=row["id"],
        study_id=row["study_id"],
        number=row["number"],
        kind=TaskKind(row["kind"]),
        status=RoundStatus(row["status"]),
        reason=row["reason"],
        started_at=_aware(row["started_at"]),  # type: ignore[arg-type]
        deadline_at=_aware(row["deadline_at"]),  # type: ignore[arg-type]
        ended_at=_aware(row["ended_at"]),
        model_in_digest=row["model_in_digest"],
        model_out_digest=row["model_out_digest"],
        state_out_digest=row["state_out_digest"],
        metrics=json.loads(row["metrics_json"]) if row["metrics_json"] else None,
    )


log = logging.getLogger("fedhealth.orchestrator")
_Stored = TypeVar("_Stored", bound=BaseModel)


def _stored(model: type[_Stored], text: str | None, what: str, task_id: str) -> _Stored | None:
    """A task's stored site figures, or None (logged) where they no longer pass the checks made at receipt:
    a row written before a check was added (an attacked site's loss of 1e200, an attestation that was no
    digest) must not make every read of its round fail, the round engine's included
    (tests/orchestrator/test_site_report_poisoning_attacks.py::test_figures_stored_before_a_check_was_added_are_read_without_them)."""
    if not text:
        return None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        log.warning(
            "task %s: its stored %s no longer pass the checks made at receipt (%d problems): read "
            "without them",
            task_id,
            what,
            exc.error_count(),
        )
        return None


def _task(row: RowMapping) -> TaskRow:
    return TaskRow(
        id=row["id"],
        round_id=row["round_id"],
        study_id=row["study_id"],
        site=row["site"],
        kind=TaskKind(row["kind"]),
        status=TaskStatus(row["status"]),
        reason=row["reason"],
        created_at=_aware(row["created_at"]),  # type: ignore[arg-type]
        delivered_at=_aware(row["delivered_at"]),
        ended_at=_aware(row["ended_at"]),
        result_digest=row["result_digest"],
        num_samples=row["num_samples"],
        metrics=_stored(SiteMetrics, row["metrics_json"], "figures", row["id"]),
        attestation=_stored(SiteAttestation, row.get("attestation_json"), "attestation", row["id"]),
    )


class Store:
    """Sites, studies, rounds, tasks and model versions."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._specs: dict[str, StudySpec] = {}  # specs never change once stored

    @contextmanager
    def _writing(self, connection: Connection | None) -> Iterator[Connection]:
        """The caller's transaction if it passes one (e.g. the audit log's, so that a security action and
        its audit entry commit together), else a transaction of our own."""
        if connection is not None:
            yield connection
        else:
            with self.engine.begin() as c:
                yield c

    # --- sites -------------------------------------------------------------------------------------------

    def create_site(self, name: str, when: datetime, *, connection: Connection | None = None) -> SiteRow:
        """Register a site. Site and user names share one namespace (the subject of a TLS client
        certificate names one principal), so a user's name is refused too."""
        try:
            with self._writing(connection) as c:
                if c.execute(select(users.c.name).where(users.c.name == name)).first() is not None:
                    raise ConflictError(f"{name!r} is a user's name; sites and users need distinct names")
                if c.execute(select(sites.c.name).where(sites.c.name == name)).first() is not None:
                    raise ConflictError(f"site {name!r} already exists")
                c.execute(
                    insert(sites).values(
                        name=name, created_at=when, last_seen_at=None, status=SiteStatus.PENDING.value
                    )
                )
        except IntegrityError as exc:  # a concurrent registration of the same name won
            raise ConflictError(f"site {name!r} already exists") from exc
        return SiteRow(name=name, created_at=when, last_seen_at=None)

    def get_site(self, name: str) -> SiteRow:
        with self.engine.connect() as c:
            row = c.execute(select(sites).where(sites.c.name == name)).mappings().first()
        if row is None:
            raise NotFoundError(f"site {shown_id(name)} is not registered")
        return _site(row)

    def get_site_or_none(self, name: str) -> SiteRow | None:
        with self.engine.connect() as c:
            row = c.execute(select(sites).where(sites.c.name == name)).mappings().first()
        return _site(row) if row is not None else None

    def site_credentials(self, name: str) -> SiteCredentials | None:
        """A site's status, key and certificate fingerprint, read on every authenticated request (so that a
        revocation or rotation, made by any orchestrator process, counts at the next request). One indexed
        row through the driver's own cursor: the ORM-free path costs a fraction of :meth:`get_site_or_none`,
        which matters at hundreds of collective calls a second."""
        placeholder = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        query = f"SELECT status, public_key, cert_fingerprint FROM sites WHERE name = {placeholder}"  # noqa: S608 - a constant placeholder
        connection = self.engine.raw_connection()
        try:
            cursor = connection.cursor()
            try:
                cursor.execute(query, (name,))
                row = cursor.fetchone()
            finally:
                cursor.close()
            connection.commit()  # end the read transaction the driver opened (PostgreSQL)
        finally:
            connection.close()  # back to the pool
        if row is None:
            return None
        return SiteCredentials(status=SiteStatus(row[0]), public_key=row[1], cert_fingerprint=row[2])

    def list_sites(self) -> list[SiteRow]:
        with self.engine.connect() as c:
            return [_site(r) for r in c.execute(select(sites).order_by(sites.c.name)).mappings()]

    def touch_site(self, name: str, when: datetime) -> None:
        with self.engine.begin() as c:
            c.execute(update(sites).where(sites.c.name == name).values(last_seen_at=when))

    def site_status(self, name: str) -> SiteStatus | None:
        with self.engine.connect() as c:
            value = c.execute(select(sites.c.status).where(sites.c.name == name)).scalar()
        return SiteStatus(value) if value is not None else None

    def set_readiness(self, name: str, readiness_json: str) -> None:
        """A site's latest ``fedhealth site check`` report (figures only)."""
        with self.engine.begin() as c:
            c.execute(update(sites).where(sites.c.name == name).values(readiness_json=readiness_json))

    def readiness(self) -> dict[str, str | None]:
        """Every site's latest readiness report (JSON text), by name; None where it sent none."""
        with self.engine.connect() as c:
            rows = c.execute(select(sites.c.name, sites.c.readiness_json).order_by(sites.c.name)).all()
        return {name: text for name, text in rows}

    def set_versions(self, name: str, *, software_version: str, protocol_version: int) -> None:
        """What the site's agent stated at its last login."""
        with self.engine.begin() as c:
            c.execute(
                update(sites)
                .where(sites.c.name == name)
                .values(software_version=software_version, protocol_version=protocol_version)
            )

    @staticmethod
    def _locked_status(c: Connection, site: str) -> SiteStatus:
        # FOR UPDATE on PostgreSQL serializes token changes of one site; SQLite has one writer at a time
        value = c.execute(select(sites.c.status).where(sites.c.name == site).with_for_update()).scalar()
        if value is None:
            raise NotFoundError(f"site {shown_id(site)} is not registered")
        return SiteStatus(value)

    @staticmethod
    def _cancel_credentials(c: Connection, site: str) -> int:
        """Cancel the site's outstanding enrollment tokens and login challenges; returns how many tokens."""
        cancelled = c.execute(
            delete(enrollment_tokens).where(
                and_(enrollment_tokens.c.site == site, enrollment_tokens.c.used_at.is_(None))
            )
        ).rowcount
        c.execute(delete(challenges).where(challenges.c.site == site))
        return int(cancelled or 0)

    def add_enrollment_token(
        self,
        site: str,
        token_hash: str,
        when: datetime,
        expires_at: datetime,
        *,
        connection: Connection | None = None,
    ) -> int:
        """Make ``token_hash`` the site's one outstanding enrollment token; returns how many earlier tokens
        it cancelled. Only a site without a key (pending) gets one: an enrolled site is re-keyed by
        :meth:`rotate_site`, a revoked one never again (:class:`ConflictError`)."""
        with self._writing(connection) as c:
            status = self._locked_status(c, site)
            if status is SiteStatus.ACTIVE:
                raise ConflictError(
                    f"site {site!r} is enrolled; to give it a new key: fedhealth site rotate {site}"
                )
            if status is SiteStatus.REVOKED:
                raise ConflictError(f"site {site!r} is revoked")
            cancelled = self._cancel_credentials(c, site)
            c.execute(
                insert(enrollment_tokens).values(
                    token_hash=token_hash, site=site, created_at=when, expires_at=expires_at, used_at=None
                )
            )
        return cancelled

    def enroll_site(
        self,
        *,
        site: str,
        token_hash: str,
        public_key: str,
        when: datetime,
        cert_fingerprint: str | None = None,
        connection: Connection | None = None,
    ) -> EnrollOutcome:
        """Spend the site's outstanding enrollment token and record its public key (and the fingerprint of
        the TLS client certificate issued with it), atomically. Every outcome but ``ENROLLED`` writes
        nothing, and the site's state is told only to a caller holding a valid token."""
        with self._writing(connection) as c:
            # FOR UPDATE on PostgreSQL: two enrollments of one site run one after the other
            status = c.execute(select(sites.c.status).where(sites.c.name == site).with_for_update()).scalar()
            valid = and_(
                enrollment_tokens.c.token_hash == token_hash,
                enrollment_tokens.c.site == site,
                enrollment_tokens.c.used_at.is_(None),
                enrollment_tokens.c.expires_at > when,
            )
            if status is None or c.execute(select(enrollment_tokens.c.site).where(valid)).first() is None:
                return EnrollOutcome.INVALID_TOKEN
            if status == SiteStatus.REVOKED.value:
                return EnrollOutcome.REVOKED
            if status == SiteStatus.ACTIVE.value:
                # never overwrite a live key: the holder of a stray token must not take the site over
                return EnrollOutcome.ALREADY_ENROLLED
            if not c.execute(update(enrollment_tokens).where(valid).values(used_at=when)).rowcount:
                return EnrollOutcome.INVALID_TOKEN  # spent by a concurrent enrollment meanwhile
            self._cancel_credentials(c, site)
            c.execute(
                update(sites)
                .where(sites.c.name == site)
                .values(
                    status=SiteStatus.ACTIVE.value,
                    public_key=public_key,
                    enrolled_at=when,
                    cert_fingerprint=cert_fingerprint,
                )
            )
        return EnrollOutcome.ENROLLED

    def rotate_site(
        self,
        name: str,
        token_hash: str,
        when: datetime,
        expires_at: datetime,
        *,
        connection: Connection | None = None,
    ) -> SiteRow:
        """Retire an enrolled site's key and client certificate at once and make ``token_hash`` its one
        enrollment token, atomically; returns the site as it was (with the retired key). The site is
        pending until it enrolls with a new key."""
        with self._writing(connection) as c:
            status = self._locked_status(c, name)
            if status is not SiteStatus.ACTIVE:
                hint = " (issue it a new enrollment token instead)" if status is SiteStatus.PENDING else ""
                raise ConflictError(f"site {name!r} is {status.value}, not enrolled{hint}")
            before = _site(c.execute(select(sites).where(sites.c.name == name)).mappings().one())
            self._cancel_credentials(c, name)
            c.execute(
                update(sites)
                .where(sites.c.name == name)
                .values(
                    status=SiteStatus.PENDING.value, public_key=None, enrolled_at=None, cert_fingerprint=None
                )
            )
            c.execute(
                insert(enrollment_tokens).values(
                    token_hash=token_hash, site=name, created_at=when, expires_at=expires_at, used_at=None
                )
            )
        return before

    def revoke_site(self, name: str, when: datetime, *, connection: Connection | None = None) -> bool:
        """Revoke a site for good (its tokens and challenges are cancelled too); False if already revoked."""
        with self._writing(connection) as c:
            done = c.execute(
                update(sites)
                .where(and_(sites.c.name == name, sites.c.status != SiteStatus.REVOKED.value))
                .values(status=SiteStatus.REVOKED.value, revoked_at=when)
            ).rowcount
            if done:
                self._cancel_credentials(c, name)
            return bool(done)

    def add_challenge(self, site: str, challenge: str, when: datetime, expires_at: datetime) -> None:
        with self.engine.begin() as c:
            c.execute(delete(challenges).where(challenges.c.expires_at < when))
            c.execute(
                insert(challenges).values(
                    challenge=challenge, site=site, created_at=when, expires_at=expires_at, used_at=None
                )
            )

    def use_challenge(self, *, site: str, challenge: str, when: datetime) -> bool:
        """Spend a login challenge once; False if unknown, for another site, used, or expired."""
        with self.engine.begin() as c:
            return bool(
                c.execute(
                    update(challenges)
                    .where(
                        and_(
                            challenges.c.challenge == challenge,
                            challenges.c.site == site,
                            challenges.c.used_at.is_(None),
                            challenges.c.expires_at > when,
                        )
                    )
                    .values(used_at=when)
                ).rowcount
            )

    # --- users -------------------------------------------------------------------------------------------

    def create_user(
        self, name: str, role: str, api_key_hash: str, when: datetime, *, connection: Connection | None = None
    ) -> UserRow:
        try:
            with self._writing(connection) as c:
                if c.execute(select(sites.c.name).where(sites.c.name == name)).first() is not None:
                    raise ConflictError(f"{name!r} is a site's name; sites and users need distinct names")
                if c.execute(select(users.c.name).where(users.c.name == name)).first() is not None:
                    raise ConflictError(f"user {name!r} already exists")
                c.execute(
                    insert(users).values(
                        name=name, role=role, api_key_hash=api_key_hash, created_at=when, revoked_at=None
                    )
                )
        except IntegrityError as exc:
            raise ConflictError(f"user {name!r} already exists") from exc
        return UserRow(name=name, role=role, api_key_hash=api_key_hash, created_at=when, revoked_at=None)

    def get_user(self, name: str) -> UserRow | None:
        with self.engine.connect() as c:
            row = c.execute(select(users).where(users.c.name == name)).mappings().first()
        return _user(row)

    def user_for_token(self, name: str, token_id: str) -> tuple[UserRow | None, bool]:
        """The user and whether the token ``token_id`` was revoked (signed out), in one statement: read on
        every request an operator token makes."""
        revoked = exists().where(revoked_tokens.c.token_id == token_id).label("token_revoked")
        with self.engine.connect() as c:
            row = c.execute(select(users, revoked).where(users.c.name == name)).mappings().first()
        return _user(row), bool(row is not None and row["token_revoked"])

    def revoke_token(self, token_id: str, expires_at: datetime, when: datetime) -> None:
        """End a token before it expires (kept until then), and forget the revocations that have expired."""
        try:
            with self.engine.begin() as c:
                c.execute(delete(revoked_tokens).where(revoked_tokens.c.expires_at <= when))
                seen = select(revoked_tokens.c.token_id).where(revoked_tokens.c.token_id == token_id)
                if c.execute(seen).first() is None:
                    c.execute(insert(revoked_tokens).values(token_id=token_id, expires_at=expires_at))
        except IntegrityError:  # another process revoked it between the read and the insert: revoked
            return

    def list_users(self) -> list[UserRow]:
        with self.engine.connect() as c:
            names = list(c.execute(select(users.c.name).order_by(users.c.name)).scalars())
        return [u for u in (self.get_user(n) for n in names) if u is not None]

    def set_user_api_key(self, name: str, api_key_hash: str, *, connection: Connection | None = None) -> bool:
        """Replace a user's API key (the old one, and every token issued against it, stop working);
        False if the user does not exist or is revoked."""
        with self._writing(connection) as c:
            return bool(
                c.execute(
                    update(users)
                    .where(and_(users.c.name == name, users.c.revoked_at.is_(None)))
                    .values(api_key_hash=api_key_hash)
                ).rowcount
            )

    def revoke_user(self, name: str, when: datetime, *, connection: Connection | None = None) -> bool:
        with self._writing(connection) as c:
            q = (
                update(users)
                .where(and_(users.c.name == name, users.c.revoked_at.is_(None)))
                .values(revoked_at=when)
            )
            return bool(c.execute(q).rowcount)

    # --- studies -----------------------------------------------------------------------------------------

    def check_study_sites(self, named: Iterable[str]) -> None:
        """Raise as :meth:`create_study` would for a site that is unknown or revoked (checked again there, in
        its transaction): a caller may check before it stores anything for the study."""
        with self.engine.connect() as c:
            _check_study_sites(c, sorted(set(named)))

    def create_study(
        self,
        *,
        spec: StudySpec,
        model_digest: str,
        state_digest: str | None,
        first: NewRound | None,
        when: datetime,
        spec_hash: str | None = None,
        approval_deadline_at: datetime | None = None,
    ) -> tuple[StudyRow, RoundRow | None]:
        """Store a study. With ``first`` it runs at once (round 1 opens); without, it waits in
        ``awaiting_approval`` until :meth:`start_study` (or fails at ``approval_deadline_at``)."""
        study_id = new_id("st")
        named = sorted(
            {*spec.train_sites, *spec.evaluation_sites, *(first.sites if first is not None else ())}
        )
        with self.engine.begin() as c:
            _check_study_sites(c, named)
            status = StudyStatus.RUNNING if first is not None else StudyStatus.AWAITING_APPROVAL
            c.execute(
                insert(studies).values(
                    id=study_id,
                    name=spec.name,
                    spec_json=spec.model_dump_json(),
                    status=status.value,
                    reason=None,
                    created_at=when,
                    ended_at=None,
                    completed_rounds=0,
                    model_digest=model_digest,
                    state_digest=state_digest,
                    spec_hash=spec_hash,
                    approval_deadline_at=approval_deadline_at if first is None else None,
                )
            )
            round_row = self._open_round(c, study_id, first, when) if first is not None else None
        return self.get_study(study_id), round_row

    def start_study(self, study_id: str, first: NewRound, when: datetime) -> RoundRow | None:
        """Move an awaiting study to running and open its first round, atomically; None if it was not
        awaiting any more (started or ended by another caller)."""
        with self.engine.begin() as c:
            moved = c.execute(
                update(studies)
                .where(
                    and_(studies.c.id == study_id, studies.c.status == StudyStatus.AWAITING_APPROVAL.value)
                )
                .values(status=StudyStatus.RUNNING.value, approval_deadline_at=None)
            ).rowcount
            if not moved:
                return None
            return self._open_round(c, study_id, first, when)

    def awaiting_studies(self, spec_hash: str | None = None) -> list[StudyRow]:
        q = select(studies).where(studies.c.status == StudyStatus.AWAITING_APPROVAL.value)
        if spec_hash is not None:
            q = q.where(studies.c.spec_hash == spec_hash)
        with self.engine.connect() as c:
            return [_study(r) for r in c.execute(q.order_by(studies.c.created_at, studies.c.id)).mappings()]

    # --- approvals -----------------------------------------------------------------------------------------

    def record_approval(self, site: str, spec_hash: str, state: ApprovalState, when: datetime) -> None:
        """A site's latest decision on a spec hash (a later report replaces an earlier one)."""
        for attempt in range(2):
            try:
                with self.engine.begin() as c:
                    done = c.execute(
                        update(site_approvals)
                        .where(and_(site_approvals.c.site == site, site_approvals.c.spec_hash == spec_hash))
                        .values(state=state.value, reported_at=when)
                    ).rowcount
                    if not done:
                        c.execute(
                            insert(site_approvals).values(
                                site=site, spec_hash=spec_hash, state=state.value, reported_at=when
                            )
                        )
                return
            except IntegrityError:  # inserted concurrently by another report: update that row instead
                if attempt:
                    raise

    def approvals_of(self, spec_hash: str, named: Sequence[str]) -> dict[str, ApprovalState]:
        """Each named site's decision on ``spec_hash`` (pending where it reported none)."""
        with self.engine.connect() as c:
            rows = c.execute(
                select(site_approvals.c.site, site_approvals.c.state).where(
                    site_approvals.c.spec_hash == spec_hash
                )
            ).all()
        reported = {site: ApprovalState(state) for site, state in rows}
        return {site: reported.get(site, ApprovalState.PENDING) for site in sorted(named)}

    def get_study(self, study_id: str) -> StudyRow:
        with self.engine.connect() as c:
            row = c.execute(select(studies).where(studies.c.id == study_id)).mappings().first()
        if row is None:
            raise NotFoundError(f"study {shown_id(study_id)} does not exist")
        return _study(row)

    def study_view(
        self, study_id: str, *, with_rounds: bool = True
    ) -> tuple[StudyRow, list[RoundRow], list[TaskRow], dict[str, ApprovalState]]:
        """A study, its rounds and tasks (when ``with_rounds``) and its sites' approvals, read on one
        connection in one transaction (one snapshot, and one pool checkout instead of four: a client polls
        this while the study runs). The spec is the stored one, parsed once per study."""
        with self.engine.connect() as c:
            row = c.execute(select(studies).where(studies.c.id == study_id)).mappings().first()
            if row is None:
                raise NotFoundError(f"study {shown_id(study_id)} does not exist")
            spec = self._specs.get(study_id)
            if spec is None:
                spec = self._specs[study_id] = StudySpec.model_validate_json(row["spec_json"])
            study = _study(row, spec)
            round_rows: list[RoundRow] = []
            task_rows: list[TaskRow] = []
            if with_rounds:
                q = select(rounds).where(rounds.c.study_id == study_id).order_by(rounds.c.number)
                round_rows = [_round(r) for r in c.execute(q).mappings()]
                q = (
                    select(tasks)
                    .where(tasks.c.study_id == study_id)
                    .order_by(tasks.c.created_at, tasks.c.site)
                )
                task_rows = [_task(r) for r in c.execute(q).mappings()]
            reported: dict[str, ApprovalState] = {}
            if study.spec_hash:
                q = select(site_approvals.c.site, site_approvals.c.state).where(
                    site_approvals.c.spec_hash == study.spec_hash
                )
                reported = {site: ApprovalState(state) for site, state in c.execute(q).all()}
        approvals = (
            {site: reported.get(site, ApprovalState.PENDING) for site in sorted(study.named_sites)}
            if study.spec_hash
            else {}
        )
        return study, round_rows, task_rows, approvals

    def spec(self, study_id: str) -> StudySpec:
        cached = self._specs.get(study_id)
        if cached is None:
            with self.engine.connect() as c:
                raw = c.execute(select(studies.c.spec_json).where(studies.c.id == study_id)).scalar()
            if raw is None:
                raise NotFoundError(f"study {shown_id(study_id)} does not exist")
            cached = self._specs[study_id] = StudySpec.model_validate_json(raw)
        return cached

    def list_studies(self, status: StudyStatus | None = None) -> list[StudyRow]:
        q = select(studies).order_by(studies.c.created_at, studies.c.id)
        if status is not None:
            q = q.where(studies.c.status == status.value)
        with self.engine.connect() as c:
            return [_study(r) for r in c.execute(q).mappings()]

    def end_study(
        self,
        study_id: str,
        status: StudyStatus,
        reason: str | None,
        when: datetime,
        *,
        only_from: StudyStatus | None = None,
    ) -> bool:
        """Move a running or awaiting study (only ``only_from``, if given) to a final state and close its
        open round; False if it was not in such a state."""
        live = (only_from.value,) if only_from is not None else LIVE_STUDY_STATES
        with self.engine.begin() as c:
            done = c.execute(
                update(studies)
                .where(and_(studies.c.id == study_id, studies.c.status.in_(live)))
                .values(status=status.value, reason=reason, ended_at=when)
            ).rowcount
            if not done:
                return False
            open_rounds = select(rounds.c.id).where(
                and_(rounds.c.study_id == study_id, rounds.c.status == RoundStatus.OPEN.value)
            )
            c.execute(
                update(tasks)
                .where(and_(tasks.c.round_id.in_(open_rounds), tasks.c.status.in_(OPEN_TASK_STATES)))
                .values(status=TaskStatus.FAILED.value, reason=f"study {status.value}", ended_at=when)
            )
            c.execute(
                update(rounds)
                .where(and_(rounds.c.study_id == study_id, rounds.c.status == RoundStatus.OPEN.value))
                .values(status=RoundStatus.FAILED.value, reason=reason, ended_at=when)
            )
        return True

    # --- rounds ------------------------------------------------------------------------------------------

    def _open_round(self, c: Any, study_id: str, new: NewRound, when: datetime) -> RoundRow:
        round_id = new_id("rd")
        c.execute(
            insert(rounds).values(
                id=round_id,
                study_id=study_id,
                number=new.number,
                kind=new.kind.value,
                status=RoundStatus.OPEN.value,
                reason=None,
                started_at=when,
                deadline_at=new.deadline_at,
                ended_at=None,
                model_in_digest=new.model_in_digest,
                model_out_digest=None,
                state_out_digest=None,
                metrics_json=None,
            )
        )
        c.execute(
            insert(tasks),
            [
                {
                    "id": new_id("tk"),
                    "round_id": round_id,
                    "study_id": study_id,
                    "site": site,
                    "kind": new.kind.value,
                    "status": TaskStatus.PENDING.value,
                    "reason": None,
                    "created_at": when,
                    "delivered_at": None,
                    "ended_at": None,
                    "result_digest": None,
                    "num_samples": None,
                    "metrics_json": None,
                    "attestation_json": None,
                }
                for site in sorted(new.sites)
            ],
        )
        row = c.execute(select(rounds).where(rounds.c.id == round_id)).mappings().one()
        return _round(row)

    def get_round(self, round_id: str) -> RoundRow:
        with self.engine.connect() as c:
            row = c.execute(select(rounds).where(rounds.c.id == round_id)).mappings().first()
        if row is None:
            raise NotFoundError(f"round {shown_id(round_id)} does not exist")
        return _round(row)

    def rounds_of(self, study_id: str) -> list[RoundRow]:
        with self.engine.connect() as c:
            q = select(rounds).where(rounds.c.study_id == study_id).order_by(rounds.c.number)
            return [_round(r) for r in c.execute(q).mappings()]

    def open_rounds(self) -> list[RoundRow]:
        with self.engine.connect() as c:
            q = select(rounds).where(rounds.c.status == RoundStatus.OPEN.value).order_by(rounds.c.started_at)
            return [_round(r) for r in c.execute(q).mappings()]

    def set_deadline(self, round_id: str, deadline: datetime) -> None:
        with self.engine.begin() as c:
            c.execute(update(rounds).where(rounds.c.id == round_id).values(deadline_at=deadline))

    def finish_round(
        self,
        round_id: str,
        *,
        status: RoundStatus,
        reason: str | None,
        when: datetime,
        metrics: dict[str, Any] | None = None,
        model_out: str | None = None,
        state_out: str | None = None,
        version: ModelVersion | None = None,
        next_round: NewRound | None = None,
        study_status: StudyStatus | None = None,
        study_reason: str | None = None,
    ) -> RoundRow | None:
        """Close an open round and move its study on, atomically. Returns the next round, if one was opened.

        Raises :class:`ConflictError` if the round was no longer open (another caller finished it).
        """
        with self.engine.begin() as c:
            r = c.execute(select(rounds).where(rounds.c.id == round_id)).mappings().one()
            # The study's row first, as end_study takes it (PostgreSQL): a cancellation at the moment the
            # round closes then waits for it, or it for the cancellation, instead of the two deadlocking
            # (round then study here, study then round there) and one failing with a database error
            # (tests/orchestrator/test_race_attacks.py).
            c.execute(select(studies.c.id).where(studies.c.id == r["study_id"]).with_for_update())
            done = c.execute(
                update(rounds)
                .where(and_(rounds.c.id == round_id, rounds.c.status == RoundStatus.OPEN.value))
                .values(
                    status=status.value,
                    reason=reason,
                    ended_at=when,
                    model_out_digest=model_out,
                    state_out_digest=state_out,
                    metrics_json=json.dumps(metrics) if metrics is not None else None,
                )
            ).rowcount
            if not done:
                raise ConflictError(f"round {round_id} is no longer open")
            c.execute(
                update(tasks)
                .where(and_(tasks.c.round_id == round_id, tasks.c.status.in_(OPEN_TASK_STATES)))
                .values(
                    status=TaskStatus.TIMED_OUT.value, reason="no result by the round deadline", ended_at=when
                )
            )
            values: dict[str, Any] = {}
            if status is RoundStatus.COMPLETED and r["kind"] == TaskKind.TRAIN.value:
                values["completed_rounds"] = r["number"]
                values["model_digest"] = model_out
                values["state_digest"] = state_out
            if study_status is not None:
                values.update(status=study_status.value, reason=study_reason)
                if study_status is not StudyStatus.RUNNING:
                    values["ended_at"] = when
            if values:
                c.execute(update(studies).where(studies.c.id == r["study_id"]).values(**values))
            if version is not None:
                exists = c.execute(
                    select(model_versions.c.digest).where(model_versions.c.digest == version.digest)
                ).first()
                if exists is None:
                    c.execute(
                        insert(model_versions).values(
                            digest=version.digest,
                            study_id=version.study_id,
                            round=version.round,
                            parent_digest=version.parent_digest,
                            created_at=version.created_at,
                            num_sites=version.num_sites,
                            train_loss=version.train_loss,
                        )
                    )
            if next_round is not None:
                return self._open_round(c, r["study_id"], next_round, when)
        return None

    # --- tasks -------------------------------------------------------------------------------------------

    def get_task(self, task_id: str) -> TaskRow:
        with self.engine.connect() as c:
            row = c.execute(select(tasks).where(tasks.c.id == task_id)).mappings().first()
        if row is None:
            raise NotFoundError(f"task {shown_id(task_id)} does not exist")
        return _task(row)

    def tasks_of_round(self, round_id: str) -> list[TaskRow]:
        with self.engine.connect() as c:
            q = select(tasks).where(tasks.c.round_id == round_id).order_by(tasks.c.site)
            return [_task(r) for r in c.execute(q).mappings()]

    def tasks_of_study(self, study_id: str) -> list[TaskRow]:
        with self.engine.connect() as c:
            q = select(tasks).where(tasks.c.study_id == study_id).order_by(tasks.c.created_at, tasks.c.site)
            return [_task(r) for r in c.execute(q).mappings()]

    def next_task(
        self, site: str, skip: Callable[[TaskRow, RoundRow], bool] | None = None
    ) -> tuple[TaskRow, RoundRow] | None:
        """The oldest task of ``site`` that is still open in an open round, with its round (one query);
        ``skip`` passes over tasks the caller knows the site cannot take now."""
        round_cols = [c.label(f"r_{c.name}") for c in rounds.c]
        q = (
            select(tasks, *round_cols)
            .join(rounds, rounds.c.id == tasks.c.round_id)
            .where(
                and_(
                    tasks.c.site == site,
                    tasks.c.status.in_(OPEN_TASK_STATES),
                    rounds.c.status == RoundStatus.OPEN.value,
                )
            )
            .order_by(tasks.c.created_at, tasks.c.id)
        )
        if skip is None:
            q = q.limit(1)
        with self.engine.connect() as c:
            rows = c.execute(q).mappings().all()
        for row in rows:
            found = _task(row), _round({c.name: row[f"r_{c.name}"] for c in rounds.c})  # type: ignore[arg-type]
            if skip is None or not skip(*found):
                return found
        return None

    def open_tasks_of_site(self, site: str) -> list[TaskRow]:
        """Every task of ``site`` still open in an open round (oldest first)."""
        q = (
            select(tasks)
            .join(rounds, rounds.c.id == tasks.c.round_id)
            .where(
                and_(
                    tasks.c.site == site,
                    tasks.c.status.in_(OPEN_TASK_STATES),
                    rounds.c.status == RoundStatus.OPEN.value,
                )
            )
            .order_by(tasks.c.created_at, tasks.c.id)
        )
        with self.engine.connect() as c:
            return [_task(r) for r in c.execute(q).mappings()]

    def count_open_tasks(self, round_id: str) -> int:
        with self.engine.connect() as c:
            q = select(func.count()).where(
                and_(tasks.c.round_id == round_id, tasks.c.status.in_(OPEN_TASK_STATES))
            )
            return int(c.execute(q).scalar_one())

    def mark_delivered(self, task_id: str, when: datetime) -> None:
        with self.engine.begin() as c:
            c.execute(
                update(tasks)
                .where(and_(tasks.c.id == task_id, tasks.c.status == TaskStatus.PENDING.value))
                .values(status=TaskStatus.DELIVERED.value, delivered_at=when)
            )

    def complete_task(
        self,
        task_id: str,
        *,
        digest: str | None,
        num_samples: int | None,
        metrics: SiteMetrics | None,
        when: datetime,
        attestation: SiteAttestation | None = None,
    ) -> bool:
        """Record a valid result if the task is still open; False if it was already closed. Without
        ``attestation`` the one already stored (a secure round's manifest) is kept."""
        values: dict[str, Any] = {
            "status": TaskStatus.COMPLETED.value,
            "result_digest": digest,
            "num_samples": num_samples,
            "metrics_json": metrics.model_dump_json() if metrics is not None else None,
            "ended_at": when,
        }
        if attestation is not None:
            values["attestation_json"] = attestation.model_dump_json()
        with self.engine.begin() as c:
            return bool(
                c.execute(
                    update(tasks)
                    .where(and_(tasks.c.id == task_id, tasks.c.status.in_(OPEN_TASK_STATES)))
                    .values(**values)
                ).rowcount
            )

    def close_tasks(
        self,
        outcomes: Mapping[str, tuple[TaskStatus, str | None, SiteAttestation | None]],
        when: datetime,
    ) -> list[str]:
        """Close several open tasks in one transaction: task id -> (COMPLETED, or the status to close it
        with; the reason; the site's attestation, if it sent one). A completed task carries no result here
        (a secure round's). Returns the ids of the tasks this closed (those already closed are left as they
        are)."""
        closed: list[str] = []
        with self.engine.begin() as c:
            for task_id, (status, reason, attestation) in outcomes.items():
                values: dict[str, Any] = {"status": status.value, "ended_at": when}
                if status is not TaskStatus.COMPLETED:
                    values["reason"] = (reason or "")[:2000]
                if attestation is not None:
                    values["attestation_json"] = attestation.model_dump_json()
                done = c.execute(
                    update(tasks)
                    .where(and_(tasks.c.id == task_id, tasks.c.status.in_(OPEN_TASK_STATES)))
                    .values(**values)
                ).rowcount
                if done:
                    closed.append(task_id)
        return closed

    def close_task(
        self,
        task_id: str,
        status: TaskStatus,
        reason: str,
        when: datetime,
        attestation: SiteAttestation | None = None,
    ) -> bool:
        """Close an open task as rejected, failed or timed out; False if it was already closed."""
        values: dict[str, Any] = {"status": status.value, "reason": reason[:2000], "ended_at": when}
        if attestation is not None:
            values["attestation_json"] = attestation.model_dump_json()
        with self.engine.begin() as c:
            return bool(
                c.execute(
                    update(tasks)
                    .where(and_(tasks.c.id == task_id, tasks.c.status.in_(OPEN_TASK_STATES)))
                    .values(**values)
                ).rowcount
            )

    # --- model versions and who may read them -------------------------------------------------------------

    def site_may_read_model(self, site: str, digest: str) -> bool:
        """Whether ``digest`` is the input model of a task of ``site`` that is still open: the only models an
        agent may download (never another site's upload, nor a model of a task it was not given)."""
        q = (
            select(tasks.c.id)
            .join(rounds, rounds.c.id == tasks.c.round_id)
            .where(
                and_(
                    tasks.c.site == site,
                    tasks.c.status.in_(OPEN_TASK_STATES),
                    rounds.c.status == RoundStatus.OPEN.value,
                    rounds.c.model_in_digest == digest,
                )
            )
            .limit(1)
        )
        with self.engine.connect() as c:
            return c.execute(q).first() is not None

    def study_ids(self) -> set[str]:
        """The id of every study in the database (whatever its status)."""
        with self.engine.connect() as c:
            return set(c.execute(select(studies.c.id)).scalars())

    def named_digests(self) -> set[str]:
        """Every value of every column named ``*digest`` in the database, the extensions' tables included:
        the blobs rows name, which :meth:`BlobStore.collect` must keep. Found by reflection rather than
        listed, so a table added later (or an extension's) cannot have its blobs collected by omission."""
        inspector = inspect(self.engine)
        named: set[str] = set()
        with self.engine.connect() as c:
            for name in inspector.get_table_names():
                for column in inspector.get_columns(name):
                    if not column["name"].endswith("digest"):
                        continue
                    col = sa_column(column["name"])
                    query = select(col).select_from(sa_table(name)).where(col.is_not(None)).distinct()
                    named.update(str(value) for value in c.execute(query).scalars())
        return named

    def model_version(self, digest: str) -> ModelVersion | None:
        """The released model version with this digest (a completed round's output), if there is one."""
        with self.engine.connect() as c:
            row = (
                c.execute(select(model_versions).where(model_versions.c.digest == digest)).mappings().first()
            )
        return ModelVersion(**{**dict(row), "created_at": _aware(row["created_at"])}) if row else None

    def model_versions_of(self, study_id: str) -> list[ModelVersion]:
        with self.engine.connect() as c:
            q = (
                select(model_versions)
                .where(model_versions.c.study_id == study_id)
                .order_by(model_versions.c.round)
            )
            return [
                ModelVersion(**{**dict(r), "created_at": _aware(r["created_at"])})
                for r in c.execute(q).mappings()
            ]


def _check_study_sites(c: Connection, named: list[str]) -> None:
    q = select(sites.c.name, sites.c.status).where(sites.c.name.in_(named))
    site_status = {name: value for name, value in c.execute(q)}
    unknown = [s for s in named if s not in site_status]
    if unknown:
        raise NotFoundError(f"unknown sites: {', '.join(unknown)}")
    revoked = [s for s in named if site_status[s] == SiteStatus.REVOKED.value]
    if revoked:
        raise InputError(f"revoked sites cannot take part in a study: {', '.join(revoked)}")


def shown_id(value: str) -> str:
    """An id as an answer names it: quoted, and cut at 80 characters (a caller may send 10,000)."""
    return repr(value[:80]) + ("..." if len(value) > 80 else "")
