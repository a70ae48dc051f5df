"""An attacker's audit of the rule "no patient value, identifier or file path leaves a site in any string":
a curious orchestrator operator plants nothing, but the site's data holds recognizable markers (a patient id,
a value, a folder name), and every channel by which the agent talks to the orchestrator is read for them.

Channels covered here (in process, a real site home and the agent's real gates; ``RecordingClient`` keeps
exactly what would have crossed the wire, parsed again as the orchestrator parses it):

- task failures (``TaskFailure``): each connector's error naming a value, a patient id or a path, and
  library errors (pandas, pyarrow, SQLAlchemy, pydicom, LightGBM, XGBoost) passed through unwrapped;
- result and evaluation manifests (metrics and attestation) of a successful task on marked data, and the
  attestation's hashes: none is a bare hash of an identifier or of the site's own fingerprint;
- the readiness report of ``fedhealth site check`` with a dataset and a recipe that fail on marked data;
- the steward's approval reports (the reason stays at the site) and the withdrawal notices;
- the shape of every upstream message: a new free-text field would be a new channel.

Each test also checks its control: the marker did reach the site's own log (or the local detail), so the
test would fail if the agent forwarded what it logs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import sqlite3
import types
import typing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from site_fixtures import SITE, agent, approve, make_home, task

from fedhealth.agent import SiteHome
from fedhealth.agent._approvals import sync_approvals
from fedhealth.agent._check import SiteCheck, _local
from fedhealth.agent._datasets import SiteDatasets
from fedhealth.agent._governance import SiteGovernance, report_withdrawals, withdrawal_notices
from fedhealth.data import open_dataset
from fedhealth.governance import spec_hash
from fedhealth.protocol import (
    ApprovalReport,
    FailureCode,
    LogHeadInfo,
    PendingSpec,
    PendingSpecs,
    PrivacySpend,
    ReadinessCheck,
    ResultManifest,
    SiteAttestation,
    SiteMetrics,
    SiteReadiness,
    StudySpec,
    TaskFailure,
    TaskKind,
)
from support import logreg_recipe

PATIENT = "PAT-7f3c-SECRET"
VALUE = "987654.321"
WARD = "secret-ward-7"
# what a message could carry of them: the id (whole, or either end of it), the value as any format prints
# it, the folder. No marker is a string of hex digits alone: a hash or a signature in a message holds any
# four hex digits now and then (a bare "7f3c" was found in a random signature, failing a run by chance)
MARKERS = (PATIENT, "PAT-7f3c", "7f3c-SECRET", "987654", WARD)
N_PATIENTS = 40


def assert_clean(text: str, where: str = "upstream") -> None:
    for marker in MARKERS:
        assert marker not in text, f"{marker!r} reached {where}: {text[:400]}"


def sent(client: Any) -> str:
    """Everything the agent sent the orchestrator, as the orchestrator received it."""
    parts = [m.model_dump_json() for m in (*client.failures, *client.results, *client.evaluations)]
    return "\n".join(parts)


def spec(n_features: int = 2, *, name: str = "marked-study") -> StudySpec:
    return StudySpec(
        name=name,
        dataset="cohort",
        recipe=logreg_recipe(n_features, learning_rate=0.5),
        rounds=1,
        train_sites=[SITE],
    )


def ward(tmp_path: Path) -> Path:
    folder = tmp_path / WARD
    folder.mkdir(exist_ok=True)
    return folder


def marked_rows(*, first_id: str = PATIENT, first_age: str = VALUE) -> list[str]:
    """40 patients; the first is the marked one (its id and its age)."""
    rows = [f"{first_id},{first_age},1,0"]
    rows += [f"p{i:04d},{30 + i % 40},{i % 5 - 2},{i % 2}" for i in range(1, N_PATIENTS)]
    return rows


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("patient_id,age,marker,label\n" + "\n".join(rows) + "\n")
    return path


def run(home: SiteHome, uri: str, study: StudySpec, *, kind: TaskKind = TaskKind.TRAIN) -> Any:
    approve(home, study)
    a, client = agent(home, {"cohort": uri})
    # an evaluation is the round after the study's last training round
    a.handle(task(study, kind=kind, round=study.rounds + 1 if kind is TaskKind.EVALUATE else 1))
    return client


@pytest.fixture
def site(tmp_path) -> SiteHome:
    return make_home(tmp_path / "site")


# --- task failures: each connector's error, with a marker in it ---------------------------------------------


def sqlite_cohort(path: Path, *, id_in_feature: bool) -> Path:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE cohort (patient_id TEXT, age REAL, marker REAL, label INTEGER)")
    rows: list[tuple[Any, ...]] = [(f"p{i:04d}", 30.0 + i, float(i % 3), i % 2) for i in range(1, N_PATIENTS)]
    # a nightly export gone wrong: the id landed in the age column of the marked patient's row
    rows.append((PATIENT, PATIENT if id_in_feature else float(VALUE), 1.0, 0))
    db.executemany("INSERT INTO cohort VALUES (?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    return path


def _csv_out_of_range(folder: Path) -> str:
    csv = write_csv(folder / "cohort.csv", marked_rows())
    schema = folder / "schema.toml"
    schema.write_text(
        'id = "patient_id"\nlabel = "label"\n[columns.age]\nmin = 0\nmax = 120\n[columns.marker]\n'
    )
    return f"file://{csv}?schema={schema}"


def _csv_id_as_feature(folder: Path) -> str:
    # the id column is not declared: the marked id is read as a number
    return f"file://{write_csv(folder / 'cohort.csv', marked_rows())}?label=label"


def _csv_bad_label(folder: Path) -> str:
    rows = marked_rows()
    rows[0] = f"{PATIENT},40,1,{VALUE}"  # a label that is not 0 or 1
    return f"file://{write_csv(folder / 'cohort.csv', rows)}?label=label&id=patient_id"


def _csv_duplicate_id(folder: Path) -> str:
    rows = [*marked_rows(first_age="40"), f"{PATIENT},41,2,1"]
    return f"file://{write_csv(folder / 'cohort.csv', rows)}?label=label&id=patient_id"


def _csv_missing_file(folder: Path) -> str:
    return f"file://{folder}/{PATIENT}.csv?label=label&id=patient_id"


def _parquet_corrupt(folder: Path) -> str:
    path = folder / f"{PATIENT}.parquet"
    path.write_bytes(b"PAR1 not parquet " + VALUE.encode())
    return f"file://{path}?label=label&id=patient_id"


def _sql_text_in_numeric_column(folder: Path) -> str:
    db = sqlite_cohort(folder / "cohort.db", id_in_feature=True)
    return f"sql+sqlite:///{db}?table=cohort&label=label&id=patient_id"


def _sql_bad_query(folder: Path) -> str:
    db = sqlite_cohort(folder / "cohort.db", id_in_feature=False)
    query = f"SELECT patient_id, age, marker, label FROM cohort WHERE patient_id = '{PATIENT}' OR nosuch = 1"
    return f"sql+sqlite:///{db}?query={query}&label=label&id=patient_id"


def _sql_missing_table(folder: Path) -> str:
    db = sqlite_cohort(folder / "cohort.db", id_in_feature=False)
    return f"sql+sqlite:///{db}?table=ward_{PATIENT.replace('-', '_')}&label=label&id=patient_id"


def _dicom_corrupt_file(folder: Path) -> str:
    images = folder / "images"
    images.mkdir()
    (images / f"{PATIENT}.dcm").write_bytes(b"not a DICOM file " + VALUE.encode())
    labels = folder / "labels.csv"
    labels.write_text(f"patient_id,file,label\n{PATIENT},{PATIENT}.dcm,1\n")
    return f"dicom://{images}?labels={labels}&size=28"


def _fhir_unreachable(folder: Path) -> str:
    mapping = folder / "mapping.toml"
    mapping.write_text("index_date = 2020-07-01\n")
    return f"fhir+http://127.0.0.1:9/{PATIENT}/r4?mapping={mapping}&timeout_s=1&retries=0"


def _fhir_missing_mapping(folder: Path) -> str:
    return f"fhir+http://127.0.0.1:9/r4?mapping={folder}/{PATIENT}.toml"


@pytest.mark.parametrize(
    ("make_uri", "code"),
    [
        (_csv_out_of_range, FailureCode.DATASET_INVALID),
        (_csv_id_as_feature, FailureCode.DATASET_INVALID),
        (_csv_bad_label, FailureCode.DATASET_INVALID),
        (_csv_duplicate_id, FailureCode.DATASET_INVALID),
        (_csv_missing_file, FailureCode.DATASET_UNAVAILABLE),
        (_parquet_corrupt, FailureCode.DATASET_INVALID),
        (_sql_text_in_numeric_column, FailureCode.DATASET_INVALID),
        (_sql_bad_query, FailureCode.DATASET_INVALID),
        (_sql_missing_table, FailureCode.DATASET_INVALID),
        (_dicom_corrupt_file, FailureCode.DATASET_INVALID),
        (_fhir_unreachable, None),
        (_fhir_missing_mapping, FailureCode.DATASET_UNAVAILABLE),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)).strip("_"),
)
def test_a_connector_error_naming_a_patient_a_value_or_a_path_reaches_the_orchestrator_as_a_code(
    site, tmp_path, caplog, make_uri, code
):
    uri = make_uri(ward(tmp_path))
    caplog.set_level(logging.INFO, logger="fedhealth.agent")
    client = run(site, uri, spec())
    [failure] = client.failures
    assert client.results == []
    if code is not None:
        assert failure.code is code
    else:
        assert failure.code in (FailureCode.DATASET_UNAVAILABLE, FailureCode.DATASET_INVALID)
    assert set(failure.model_dump(exclude_none=True)) <= {"code", "attestation"}
    assert_clean(sent(client))
    # the control: the error named at least one marker, and the site's own log kept it
    errors = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert any(marker in "\n".join(errors) for marker in MARKERS), errors


def _library_errors() -> list[BaseException]:
    import lightgbm
    import pandas as pd
    import pyarrow as pa
    import pydicom.errors
    import sqlalchemy.exc
    import xgboost

    text = f"{WARD}/cohort.csv line 2: patient {PATIENT} holds {VALUE}"
    return [
        pd.errors.ParserError(text),
        pa.ArrowInvalid(text),
        sqlalchemy.exc.OperationalError(f"SELECT * FROM cohort WHERE id = '{PATIENT}'", {"v": VALUE}, None),
        pydicom.errors.InvalidDicomError(text),
        lightgbm.basic.LightGBMError(text),
        xgboost.core.XGBoostError(text),
        KeyError(PATIENT),
        ValueError(f"could not convert string to float: '{VALUE}' ({WARD})"),
    ]


@pytest.mark.parametrize("where", ["open_dataset", "train_on_site"])
def test_a_library_error_passed_through_unwrapped_sends_only_a_code(
    site, tmp_path, caplog, monkeypatch, where
):
    """A connector or a recipe that lets a library's exception escape: the exception's text (which names
    the row, the value and the file) stays in the site's log; the orchestrator gets a code."""
    csv = write_csv(ward(tmp_path) / "cohort.csv", marked_rows(first_age="40"))
    uri = f"file://{csv}?label=label&id=patient_id"
    caplog.set_level(logging.INFO, logger="fedhealth.agent")
    for i, error in enumerate(_library_errors()):

        def fail(*args: object, _error: BaseException = error, **kwargs: object) -> None:
            raise _error

        monkeypatch.setattr(f"fedhealth.agent._agent.{where}", fail)
        study = spec(name=f"library-error-{i}")
        client = run(site, uri, study)
        [failure] = client.failures
        assert failure.code in (
            FailureCode.INTERNAL_ERROR,
            FailureCode.TRAINING_FAILED,
            FailureCode.DATASET_INVALID,
        )
        assert_clean(sent(client), f"the orchestrator ({type(error).__name__})")
    assert PATIENT in caplog.text  # the control: the site's own log has the details


# --- what a successful task sends ---------------------------------------------------------------------------


def marked_success_csv(tmp_path: Path) -> Path:
    """Every patient id carries the marker; the first patient's age is the marked value."""
    rows = [f"{PATIENT}-{i:03d},{VALUE if i == 0 else 30 + i},{i % 5 - 2},{i % 2}" for i in range(N_PATIENTS)]
    return write_csv(ward(tmp_path) / "cohort.csv", rows)


def hashes_of(value: str) -> set[str]:
    data = value.encode()
    out = set()
    for name in ("sha256", "sha1", "md5", "blake2b", "sha512", "sha3_256"):
        digest = hashlib.new(name, data)
        out |= {digest.hexdigest(), digest.hexdigest()[:16], digest.hexdigest()[:32]}
        out.add(base64.b64encode(digest.digest()).decode())
    return out


def attestation_strings(manifest: ResultManifest | TaskFailure) -> list[str]:
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            found.append(value)

    walk(manifest.model_dump(mode="json"))
    return found


@pytest.mark.parametrize("kind", [TaskKind.TRAIN, TaskKind.EVALUATE])
def test_a_task_on_marked_data_sends_figures_and_keyed_commitments_only(site, tmp_path, kind):
    csv = marked_success_csv(tmp_path)
    uri = f"file://{csv}?label=label&id=patient_id"
    client = run(site, uri, spec(), kind=kind)
    assert client.failures == []
    [manifest] = client.results if kind is TaskKind.TRAIN else client.evaluations
    assert manifest.metrics is not None
    assert manifest.metrics.num_samples + manifest.metrics.num_eval_samples > 0
    assert_clean(sent(client))
    assert manifest.attestation is not None
    assert manifest.attestation.dataset_fingerprint is not None
    assert manifest.attestation.consent_snapshot is not None
    # no string in it is a bare hash of one identifier (a dictionary over the id space would invert it),
    # nor the site's own unkeyed fingerprint of the rows (anyone holding a copy of the rows could test it)
    ids = [f"{PATIENT}-{i:03d}" for i in range(N_PATIENTS)]
    guessable = set().union(*(hashes_of(v) for v in [*ids, PATIENT, VALUE, str(csv)]))
    guessable.add(open_dataset(uri).fingerprint)
    strings = attestation_strings(manifest)
    assert strings, "the manifest holds the attestation's digests"
    for value in strings:
        assert value not in guessable
        assert value.lower() not in guessable
    with SiteGovernance(site) as governance:
        openings = {o.commitment: o.digest for o in governance.commitments.openings("st-1")}
    # what was sent are the commitments; the digests they open to stayed at the site
    assert manifest.attestation.dataset_fingerprint in openings
    assert manifest.attestation.consent_snapshot in openings
    for digest in openings.values():
        assert digest not in strings


# --- the readiness report (fedhealth site check) -----------------------------------------------------------


class _BrokenStep:
    note = "a step"

    def run(self) -> None:
        raise RuntimeError(f"{WARD}/scratch: cannot read {PATIENT} = {VALUE}")


def test_the_readiness_report_of_a_failing_dataset_and_recipe_names_neither_path_nor_value(
    site, tmp_path, monkeypatch
):
    folder = ward(tmp_path)
    good = write_csv(folder / "cohort.csv", marked_rows(first_id="p0000", first_age="40"))
    other = write_csv(folder / "other.csv", marked_rows(first_id="p0000", first_age="40"))
    datasets = SiteDatasets(site)
    datasets.add("cohort", f"file://{good}?label=label&id=patient_id")
    datasets.add("other", f"file://{other}?label=label&id=patient_id")
    # the files change after registration: a value out of the pinned schema, an id in a numeric column
    write_csv(good, marked_rows(first_age=PATIENT))
    write_csv(other, marked_rows(first_age=f"{VALUE}.{VALUE}"))
    monkeypatch.setattr("fedhealth.agent._check.reference_steps", lambda: {"logreg": _BrokenStep()})
    result = SiteCheck(site=site.name)
    _local(result, site, None)
    readiness = result.readiness(datetime.now(UTC))
    wire = SiteReadiness.model_validate_json(readiness.model_dump_json()).model_dump_json()
    checks = {c.name: c for c in readiness.checks}
    assert checks["dataset:cohort"].status.value == "fail"
    assert checks["dataset:other"].status.value == "fail"
    assert checks["compute.logreg"].status.value == "fail"
    assert_clean(wire, "the readiness report")
    assert str(tmp_path) not in wire
    # the control: the details shown at the site name them
    local = json.dumps(result.details)
    assert PATIENT in local
    assert WARD in local


# --- approval reports and withdrawal notices ----------------------------------------------------------------


class _Response:
    def __init__(self, content: bytes) -> None:
        self.content = content


class _ApprovalClient:
    """Answers GET /approvals with one pending spec and records every request body."""

    def __init__(self, pending: PendingSpecs) -> None:
        self.pending = pending
        self.bodies: list[str] = []

    def call(self, what: str, method: str, path: str, **kwargs: Any) -> _Response:
        if method == "GET":
            return _Response(self.pending.model_dump_json().encode())
        self.bodies.append(str(kwargs.get("content", "")) + json.dumps(kwargs.get("json")))
        return _Response(b'{"ok": true}')


def test_an_approval_report_carries_the_hash_and_state_not_the_stewards_reason(site):
    study = spec(name="approved-study")
    with SiteGovernance(site) as governance:
        governance.approve(
            study, reason=f"IRB-1; excludes {PATIENT} (age {VALUE}) per {WARD} list", steward="dana"
        )
        digest = spec_hash(study.model_dump(mode="json"))
        client = _ApprovalClient(
            PendingSpecs(specs=[PendingSpec(study_id="st-1", spec_hash=digest, spec=study)])
        )
        result = sync_approvals(governance, client)  # type: ignore[arg-type]
    assert result.reported == (digest,)
    [body] = client.bodies
    assert_clean(body, "the approval report")
    report = ApprovalReport.model_validate_json(body.removesuffix("null"))
    assert report.spec_hash == digest
    with pytest.raises(ValueError, match="Extra inputs"):
        ApprovalReport.model_validate({"spec_hash": digest, "state": "approved", "reason": PATIENT})


class _HttpRecorder:
    def __init__(self, bodies: list[Any]) -> None:
        self.bodies = bodies

    def post(self, path: str, json: Any = None, **kwargs: Any) -> Any:
        self.bodies.append(json)
        return types.SimpleNamespace(status_code=200, json=lambda: {"flagged": []}, text="")

    def call(self, what: str, method: str, path: str, json: Any = None, **kwargs: Any) -> Any:
        """The client's retried, bounded call (what report_withdrawals uses)."""
        self.bodies.append(json)
        return types.SimpleNamespace(status_code=200, content=b'{"flagged": []}', text="")


def test_a_withdrawal_notice_names_no_patient_and_no_hash_of_one(site, tmp_path, monkeypatch):
    csv = marked_success_csv(tmp_path)
    uri = f"file://{csv}?label=label&id=patient_id"
    client = run(site, uri, spec())
    [manifest] = client.results
    with SiteGovernance(site) as governance:
        governance.consent().withdraw(f"{PATIENT}-000", "research")
        notices = withdrawal_notices(governance)
    assert notices
    bodies: list[Any] = []

    class FakeClient:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.http = _HttpRecorder(bodies)

        def auth_headers(self) -> dict[str, str]:
            return {}

        def call(self, *args: Any, **kwargs: Any) -> Any:
            return self.http.call(*args, **kwargs)

        def close(self) -> None:
            pass

    monkeypatch.setattr("fedhealth.agent._governance.OrchestratorClient", FakeClient)
    report_withdrawals(site, notices)
    [body] = bodies
    text = json.dumps(body)
    assert_clean(text, "the withdrawal notice")
    for value in hashes_of(f"{PATIENT}-000"):
        assert value not in text
    # the notice names the snapshot by the commitment the orchestrator already holds, nothing else
    assert manifest.attestation is not None
    assert body["snapshot_hashes"] == [manifest.attestation.consent_snapshot]


# --- the shape of every upstream message --------------------------------------------------------------------

# Every field of an upstream message that can hold text, and why it cannot hold patient data. A new one is a
# new channel: this list fails until someone argues for it here.
TEXT_FIELDS = {
    "ResultManifest.task_id": "the orchestrator's own id, echoed",
    "SiteAttestation.dataset_fingerprint": "a keyed commitment (random per-study key)",
    "SiteAttestation.consent_snapshot": "a keyed commitment (random per-study key)",
    "LogHeadInfo.hash": "the site log's chained head (docs/privacy.md: not covered)",
    "LogHeadInfo.signature": "the site's Ed25519 signature of that head's hash: a function of the hash alone",
    "PrivacySpend.dataset": "the dataset's registered name, chosen by the steward",
    "ApprovalReport.spec_hash": "the hash of the orchestrator's own spec",
    "SiteReadiness.site": "the site's name",
    "SiteReadiness.software_version": "fedhealth's release",
    "ReadinessCheck.name": "a fixed vocabulary plus the dataset's registered name",
    "ReadinessCheck.unit": "fixed wording",
    "ReadinessCheck.note": "fixed wording chosen by the agent's code",
}


def _text_fields(model: type[BaseModel], seen: set[type]) -> set[str]:
    if model in seen:
        return set()
    seen.add(model)
    out: set[str] = set()
    for name, info in model.model_fields.items():
        for leaf in _leaves(info.annotation):
            if leaf is str or leaf is Any:
                out.add(f"{model.__name__}.{name}")
            elif isinstance(leaf, type) and issubclass(leaf, BaseModel):
                out |= _text_fields(leaf, seen)
    return out


def _leaves(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _leaves(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, tuple, set, frozenset, dict):
        return [leaf for arg in typing.get_args(annotation) for leaf in _leaves(arg)]
    return [annotation]


def test_every_text_field_of_an_upstream_message_is_one_argued_for():
    found: set[str] = set()
    seen: set[type] = set()
    for model in (TaskFailure, ResultManifest, SiteAttestation, SiteMetrics, ApprovalReport, SiteReadiness):
        found |= _text_fields(model, seen)
    assert LogHeadInfo in seen
    assert PrivacySpend in seen
    assert ReadinessCheck in seen
    assert found == set(TEXT_FIELDS)


@pytest.mark.parametrize(
    "answer", [b"[1, 2]", b'{"flagged": "all"}', b'{"flagged": [1]}', b"[" * 100_000, b"not json"]
)
def test_a_withdrawal_answer_that_is_not_a_list_of_versions_is_one_clear_error(
    site, tmp_path, monkeypatch, answer
):
    """The notice goes out through the client's bounded, retried call, and whatever the orchestrator
    answers, the steward gets one error (not AttributeError or RecursionError from its body)."""
    from fedhealth.core import ServiceUnavailableError

    csv = marked_success_csv(tmp_path)
    run(site, f"file://{csv}?label=label&id=patient_id", spec())
    with SiteGovernance(site) as governance:
        governance.consent().withdraw(f"{PATIENT}-000", "research")
        notices = withdrawal_notices(governance)

    class FakeClient:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def call(self, what: str, method: str, path: str, **kwargs: Any) -> Any:
            return types.SimpleNamespace(status_code=200, content=answer, text="")

        def close(self) -> None:
            pass

    monkeypatch.setattr("fedhealth.agent._governance.OrchestratorClient", FakeClient)
    with pytest.raises(ServiceUnavailableError, match="is not a list of flagged model versions"):
        report_withdrawals(site, notices)
