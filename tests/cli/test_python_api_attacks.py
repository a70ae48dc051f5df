"""A researcher's notebook misusing ``fedhealth.client`` and a lying orchestrator answering it
(docs/python-api.md): what tests/cli/test_operator_credential_attacks.py (TLS, redirects, bounds, 429s)
and tests/cli/test_operator_local_file_attacks.py (credential modes, links, FIFOs, duplicate keys) do not try.

Every failure is one exception of the documented kind (``FedHealthError``: ``ConfigError`` for a credential,
``CryptoError`` for a signing key, ``SpecFileError``, ``ClientError``, ``ModelFileError``) with a readable
message, and nothing is written or changed locally:

- Files: a credential that is not one (not JSON, binary, wrong types, a folder, a CA or TLS key that is not
  one), a signing key of another kind or mode (garbage, RSA, public, password-protected, a FIFO, a folder,
  many megabytes), a spec that is a folder or holds non-finite or huge numbers; the first signing key is
  made once, by whichever process gets there first, and never replaced.
- Answers: a header of Latin-1 text, a Retry-After of non-ASCII digits, a token that cannot go in a header,
  a 422 whose detail is malformed, a 2xx of the wrong shape, a gzip bomb, a model whose bytes do not hash
  to the digest promised, a submit answered for another (replayed) spec, an id that would make another
  request of the call (``../users/rita/revoke?``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fedhealth.client import (
    ClientError,
    ModelFileError,
    OperatorClient,
    SpecFileError,
    load_model,
    load_signing_key,
    load_spec,
    predict_csv,
    signing_key_path,
    study_spec_hash,
)
from fedhealth.client import _operator as operator_module
from fedhealth.core import ConfigError, CryptoError, FedHealthError, InputError, encode_tensors
from fedhealth.crypto import IdentityKey, create_ca
from fedhealth.protocol import OperatorCredential
from support import breast_spec, file_mode, finishes_within, opened_for_writing_later

API_KEY = "fhk_" + "s" * 43
URL = "https://orchestrator.test"
FEDERATION_CA = create_ca("the federation").cert_pem.decode()
SOON = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
MODEL = encode_tensors({"weight": np.ones(3, dtype=np.float32), "bias": np.zeros(1, dtype=np.float32)})

Answer = Callable[[httpx.Request], httpx.Response]


def orchestrator(answer: Answer, seen: list[httpx.Request] | None = None, token: str = "t") -> OperatorClient:
    """A client whose orchestrator logs it in with ``token`` and answers everything else with ``answer``."""
    record = seen if seen is not None else []

    def handler(request: httpx.Request) -> httpx.Response:
        record.append(request)
        if request.url.path == "/api/v1/auth/token":
            return httpx.Response(200, json={"access_token": token, "expires_at": SOON, "role": "admin"})
        return answer(request)

    return OperatorClient(
        URL, user="admin", api_key=API_KEY, ca_pem=FEDERATION_CA, transport=httpx.MockTransport(handler)
    )


def study_json(status: str = "running", **fields: Any) -> dict[str, Any]:
    spec = breast_spec(["north"]).model_dump(mode="json")
    return {
        "study_id": "st_1",
        "spec": spec,
        "status": status,
        "reason": None,
        "created_at": datetime.now(UTC).isoformat(),
        "ended_at": None,
        "completed_rounds": 0,
        "current_round": None,
        "model_digest": None,
        **fields,
    }


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (a link as its target's name), to compare before and after a call."""
    out: dict[str, bytes | None] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            out[str(path)] = os.readlink(path).encode()
        elif path.is_file():
            out[str(path)] = path.read_bytes()
        else:
            out[str(path)] = None
    return out


# --- (1) the credential file --------------------------------------------------------------------------------


def _credential(path: Path, body: bytes) -> Path:
    path.write_bytes(body)
    os.chmod(path, 0o600)
    return path


GOOD = OperatorCredential(orchestrator=URL, ca_pem=FEDERATION_CA, user="admin", api_key=API_KEY).model_dump()


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"\xff\xfe\x00\x01",
        b"[1, 2]",
        json.dumps({**GOOD, "user": 5}).encode(),
        json.dumps({**GOOD, "orchestrator": None}).encode(),
        b'{"orchestrator": NaN, "api_key": "' + API_KEY.encode() + b'"}',
        json.dumps({"api_key": API_KEY}).encode(),
    ],
    ids=["text", "empty", "binary", "list", "user-a-number", "url-null", "nan", "only-a-key"],
)
def test_a_credential_file_that_is_not_one_is_one_config_error_that_does_not_quote_the_key(tmp_path, body):
    credential = _credential(tmp_path / "admin.credential", body)
    before = listing(tmp_path)
    with pytest.raises(ConfigError, match="not a fedhealth credential file") as refused:
        OperatorClient.from_credential(credential)
    assert API_KEY not in str(refused.value)
    assert "\n" not in str(refused.value)
    assert listing(tmp_path) == before  # no signing key made, nothing rewritten


def test_a_folder_given_as_the_credential_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not a regular file"):
        OperatorClient.from_credential(tmp_path)


@pytest.mark.parametrize(
    "fields",
    [{"ca_pem": "-----BEGIN CERTIFICATE-----\ngarbage\n"}, {"tls_certificate": "x", "tls_key": "y"}],
    ids=["ca-not-a-certificate", "tls-key-not-a-key"],
)
def test_a_credential_whose_ca_or_tls_key_is_not_one_is_a_config_error(tmp_path, fields):
    credential = _credential(tmp_path / "admin.credential", json.dumps({**GOOD, **fields}).encode())
    with pytest.raises(ConfigError, match="cannot be used") as refused:
        OperatorClient.from_credential(credential)
    assert API_KEY not in str(refused.value)


# --- (2) the spec-signing key -------------------------------------------------------------------------------


def _pem(key: Any, *, public: bool = False, password: bytes | None = None) -> bytes:
    if public:
        return key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _other_kinds() -> dict[str, bytes]:
    ed = IdentityKey.generate().crypto_key()
    return {
        "garbage": b"not a key at all",
        "empty": b"",
        "binary": bytes(range(256)),
        "rsa": _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "public-key": _pem(ed, public=True),
        "password-protected": _pem(ed, password=b"secret"),
        "a-credential": json.dumps(GOOD).encode(),
    }


@pytest.mark.parametrize("kind", list(_other_kinds()))
def test_a_signing_key_file_of_another_kind_is_one_crypto_error_and_left_as_it_is(tmp_path, kind):
    path = signing_key_path(tmp_path / "admin.credential")
    path.write_bytes(_other_kinds()[kind])
    os.chmod(path, 0o600)
    before = listing(tmp_path)
    with pytest.raises(CryptoError, match="does not hold an Ed25519 private key") as refused:
        load_signing_key(path)
    assert "\n" not in str(refused.value)
    assert "BEGIN" not in str(refused.value)
    assert listing(tmp_path) == before  # not replaced by a new key


def test_a_signing_key_others_can_read_or_another_account_owns_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "admin.signing.key"
    IdentityKey.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(CryptoError, match="readable by other users"):
        load_signing_key(path)
    os.chmod(path, 0o600)
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)
    with pytest.raises(CryptoError, match="another account"):
        load_signing_key(path)


def test_a_fifo_or_a_folder_at_the_signing_key_path_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "admin.signing.key"
    os.mkfifo(fifo, 0o600)
    timer = opened_for_writing_later(fifo)
    try:
        raised = finishes_within(2.0, lambda: load_signing_key(fifo))
    finally:
        timer.cancel()
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert isinstance(raised, CryptoError), raised
    assert "not a regular file" in str(raised)
    folder = tmp_path / "folder.signing.key"
    folder.mkdir()
    with pytest.raises(CryptoError, match="not a regular file"):
        load_signing_key(folder)


def test_a_signing_key_of_many_megabytes_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "admin.signing.key"
    IdentityKey.generate().save(path)
    with path.open("r+b") as f:
        f.truncate(512 << 20)  # sparse: reading it would cost 512 MiB of memory
    with pytest.raises(CryptoError, match="larger than a key"):
        load_signing_key(path)


def test_the_control_a_first_signing_key_is_made_private_and_is_the_same_key_next_time(
    tmp_path, permissive_umask
):
    path = signing_key_path(tmp_path / "admin.credential")
    assert path.name == "admin.signing.key"
    first = load_signing_key(path)
    assert file_mode(path) == 0o600
    assert load_signing_key(path).public() == first.public()


def test_a_signing_key_another_process_made_first_is_kept_not_replaced(tmp_path, monkeypatch):
    """Two notebooks submitting at once for the first time: both find no key; the one that writes second
    replaced the first one's key, whose owner had registered and signed with it (and lost it)."""
    path = tmp_path / "admin.signing.key"
    theirs = IdentityKey.generate()
    real_generate = IdentityKey.generate

    def generate_while_the_other_process_writes_its_key() -> IdentityKey:
        if not path.exists():
            theirs.save(path)  # the other notebook, between this one's check and its write
        return real_generate()

    monkeypatch.setattr(
        IdentityKey, "generate", staticmethod(generate_while_the_other_process_writes_its_key)
    )
    mine = load_signing_key(path)
    monkeypatch.undo()
    assert mine.public() == theirs.public()
    assert load_signing_key(path).public() == theirs.public()
    assert [p.name for p in tmp_path.iterdir()] == ["admin.signing.key"]  # no temporary file left


# --- (3) spec files -----------------------------------------------------------------------------------------


def _spec_text() -> str:
    return json.dumps(breast_spec(["north"]).model_dump(mode="json"))


def test_a_folder_given_as_a_spec_file_is_a_spec_file_error(tmp_path):
    folder = tmp_path / "study.toml"
    folder.mkdir()
    with pytest.raises(SpecFileError, match="not a regular file"):
        load_spec(folder)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("study.json", _spec_text().replace('"round_deadline_s": 60.0', '"round_deadline_s": NaN')),
        ("study.json", _spec_text().replace('"round_deadline_s": 60.0', '"round_deadline_s": Infinity')),
        ("study.json", _spec_text().replace('"round_deadline_s": 60.0', '"round_deadline_s": 1e400')),
        ("study.json", _spec_text().replace('"seed": 7', '"seed": ' + "9" * 5000)),
        ("study.json", _spec_text().replace('"rounds": 3', '"rounds": 3.5')),
        ("study.json", _spec_text().replace('"description": ""', '"description": "\\ud800"')),
        ("study.toml", 'name = "breast"\nround_deadline_s = nan\n'),
        ("study.toml", 'name = "breast"\nseed = ' + "9" * 5000 + "\n"),
        ("study.toml", 'name = "breast"\ndescription = "\\ud800"\n'),
    ],
    ids=[
        "json-nan",
        "json-infinity",
        "json-1e400",
        "json-5000-digits",
        "json-half-round",
        "json-lone-surrogate",
        "toml-nan",
        "toml-5000-digits",
        "toml-lone-surrogate",
    ],
)
def test_a_spec_with_non_finite_huge_or_broken_values_is_one_spec_file_error(tmp_path, name, text):
    assert text != _spec_text()  # the replacement took place
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpecFileError) as refused:
        load_spec(path)
    assert "\n" not in str(refused.value)
    assert len(str(refused.value)) < 1000


def test_a_binary_spec_file_is_a_spec_file_error(tmp_path):
    path = tmp_path / "study.toml"
    path.write_bytes(b"\x00\xff\xfe\x89PNG\r\n")
    with pytest.raises(SpecFileError, match="cannot be read"):
        load_spec(path)


# --- (4) hostile answers ------------------------------------------------------------------------------------


def test_an_answer_with_a_header_of_latin1_text_is_read_not_a_crash():
    seen: list[httpx.Request] = []
    client = orchestrator(lambda r: httpx.Response(200, headers=[(b"X-Note", b"caf\xe9")], json=[]), seen)
    with client:
        assert client.sites() == []


@pytest.mark.parametrize(
    "retry_after", [b"\xb2", "١٢".encode(), b"3\xb2"], ids=["superscript", "arabic", "mixed"]
)
def test_a_retry_after_of_non_ascii_digits_is_waited_out_at_the_interval(monkeypatch, retry_after):
    slept: list[float] = []
    monkeypatch.setattr(operator_module.time, "sleep", slept.append)
    answers = [httpx.Response(429, headers=[(b"Retry-After", retry_after)], json={"error": "slow down"})] * 2
    answers.append(httpx.Response(200, json=study_json("completed")))
    with orchestrator(lambda r: answers.pop(0)) as client:
        info = client.wait_for_study("st_1", timeout=60, interval=0.5)
    assert info.status.value == "completed"
    assert slept == [0.5, 0.5]


@pytest.mark.parametrize("token", ["a\r\nX-Injected: 1", "caf\u00e9", "two words", ""])
def test_a_token_that_cannot_go_in_a_header_is_a_client_error_and_nothing_else_is_sent(token):
    seen: list[httpx.Request] = []
    with (
        orchestrator(lambda r: httpx.Response(200, json=[]), seen, token=token) as client,
        pytest.raises(ClientError, match="token") as refused,
    ):
        client.sites()
    assert refused.value.status == 200
    assert [r.url.path for r in seen] == ["/api/v1/auth/token"]


@pytest.mark.parametrize(
    "detail",
    [
        [{"loc": 5, "msg": "bad", "type": "x"}],
        [{"loc": None, "msg": "bad", "type": "x"}],
        [{"loc": ["body", "name"], "msg": "bad", "type": "string_pattern_mismatch", "ctx": "not an object"}],
        [{"loc": ["body", "name"], "type": "missing", "ctx": [1, 2]}],
        [{}],
    ],
    ids=["loc-a-number", "loc-null", "ctx-a-string", "ctx-a-list", "empty-item"],
)
def test_a_422_whose_detail_is_malformed_is_a_client_error(detail):
    answer = httpx.Response(422, json={"error": "validation_failed", "detail": detail})
    with orchestrator(lambda r: answer) as client, pytest.raises(ClientError) as refused:
        client.sites()
    assert refused.value.status == 422
    assert refused.value.detail == detail
    assert "validation_failed" in str(refused.value)


NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("call", "body"),
    [
        ("study", b"[1, 2]"),
        ("study", json.dumps(study_json(completed_rounds="many")).encode()),
        ("study", json.dumps(study_json(status="exploded")).encode()),
        ("study", b'{"study_id": NaN}'),
        ("study", NESTED),
        ("study", b"\xff\xfe not json"),
        ("studies", b'{"a": 1}'),
        ("studies", b'[{"study_id": 1}]'),
        ("sites", b'"sites"'),
        ("site_readiness", b"[[1]]"),
        ("report", b"[1]"),
        ("report", NESTED),
        ("cancel_study", b"null"),
    ],
    ids=[
        "study-list",
        "study-rounds-text",
        "study-unknown-status",
        "study-nan",
        "study-nested",
        "study-binary",
        "studies-object",
        "studies-wrong-item",
        "sites-string",
        "readiness-nested-list",
        "report-list",
        "report-nested",
        "cancel-null",
    ],
)
def test_a_2xx_answer_of_the_wrong_shape_is_a_client_error(call, body):
    with orchestrator(lambda r: httpx.Response(200, content=body)) as client:
        method = getattr(client, call)
        with pytest.raises(ClientError) as refused:
            method("st_1") if call in ("study", "report", "cancel_study") else method()
    assert refused.value.status == 200
    assert len(str(refused.value)) < 1000


def test_a_gzip_bomb_counts_as_what_it_inflates_to(monkeypatch):
    monkeypatch.setattr(OperatorClient, "MAX_ANSWER_BYTES", 1 << 20)
    bomb = gzip.compress(b"[" + b" " * (64 << 20) + b"]")
    assert len(bomb) < 1 << 20  # under the bound as sent
    answer = httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=bomb)
    with orchestrator(lambda r: answer) as client, pytest.raises(ClientError, match="over"):
        client.sites()


# --- (5) the model: what was promised, and nothing written on any failure ----------------------------------


def _model_answer(blob: bytes, promised: str | None) -> httpx.Response:
    headers = {"X-Fedhealth-Model-Digest": promised} if promised is not None else {}
    return httpx.Response(200, headers=headers, content=blob)


def test_a_model_whose_bytes_do_not_hash_to_the_digest_promised_is_refused_and_nothing_written(tmp_path):
    promised = hashlib.sha256(MODEL).hexdigest()
    tampered = MODEL[:-4] + b"\x00\x00\x80\x7f"  # the last weight made +inf
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier model")
    before = listing(tmp_path)
    with orchestrator(lambda r: _model_answer(tampered, promised)) as client:
        with pytest.raises(ClientError, match="digest promised"):
            client.download_model("st_1", out)
        with pytest.raises(ClientError, match="digest promised"):
            client.model_bytes("st_1")
    assert listing(tmp_path) == before


def test_a_released_model_that_is_not_the_digest_asked_for_is_refused():
    asked = hashlib.sha256(MODEL).hexdigest()
    other = encode_tensors({"weight": np.zeros(3, dtype=np.float32), "bias": np.zeros(1, dtype=np.float32)})
    # the orchestrator states the digest of what it sends: only the one asked for shows the swap
    with (
        orchestrator(lambda r: _model_answer(other, hashlib.sha256(other).hexdigest())) as client,
        pytest.raises(ClientError, match="digest promised"),
    ):
        client.released_model(asked)


@pytest.mark.parametrize("promised", ["match", None], ids=["digest-stated", "no-digest-stated"])
def test_the_control_a_model_that_is_what_was_promised_is_written_private(
    tmp_path, permissive_umask, promised
):
    digest = hashlib.sha256(MODEL).hexdigest()
    out = tmp_path / "model.safetensors"
    answer = _model_answer(MODEL, digest if promised else None)
    with orchestrator(lambda r: answer) as client:
        assert client.download_model("st_1", out) == digest
        assert client.released_model(digest.upper()) == MODEL
    assert out.read_bytes() == MODEL
    assert file_mode(out) == 0o600
    assert load_model(out).digest == digest


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(404, json={"error": "no model yet"}),
        httpx.Response(307, headers={"Location": "https://collector.example/model"}),
        httpx.Response(200, headers={"Content-Length": str(8 << 30)}, content=b""),
    ],
    ids=["404", "redirect", "declares-8-GiB"],
)
def test_a_failed_download_writes_nothing(tmp_path, answer):
    out = tmp_path / "model.safetensors"
    with orchestrator(lambda r: answer) as client, pytest.raises(ClientError):
        client.download_model("st_1", out)
    assert list(tmp_path.iterdir()) == []


def test_download_model_without_overwrite_leaves_a_file_or_a_dangling_link_alone(tmp_path):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier model")
    target = tmp_path / "home" / ".bashrc"
    target.parent.mkdir()
    link = tmp_path / "linked.safetensors"
    link.symlink_to(target)
    before = listing(tmp_path)
    with orchestrator(lambda r: _model_answer(MODEL, None)) as client:
        for path in (out, link):
            with pytest.raises(FileExistsError):
                client.download_model("st_1", path, overwrite=False)
    assert listing(tmp_path) == before
    assert not target.exists()


@pytest.mark.parametrize(
    ("call", "value"),
    [
        ("cancel_study", "../users/rita/revoke?"),
        ("cancel_study", "st_1/../../sites/north/revoke?x="),
        ("model_bytes", "../../users/rita/api-key#"),
        ("study", ".."),
        ("report", "st_1?status=completed"),
        ("revoke_site", "north/../../users/rita/revoke#"),
        ("revoke_user", "../studies/st_1/cancel?"),
        ("released_model", "../studies/st_1/model?"),
    ],
)
def test_an_id_with_path_characters_stays_one_path_segment(call, value):
    """An id typed, pasted, or listed by a lying orchestrator (``for s in client.studies():
    client.cancel_study(s.study_id)``) must not turn the call into another request."""
    seen: list[httpx.Request] = []
    with (
        orchestrator(lambda r: httpx.Response(404, json={"error": "not found"}), seen) as client,
        pytest.raises(ClientError),
    ):
        getattr(client, call)(value)
    sent = seen[-1].url
    assert sent.query == b""
    assert sent.fragment == ""
    segments = sent.raw_path.split(b"/")
    assert b".." not in segments
    assert b"." not in segments
    base = {"revoke_site": b"sites", "revoke_user": b"users", "released_model": b"models"}.get(
        call, b"studies"
    )
    assert segments[:4] == [b"", b"api", b"v1", base]
    assert len(segments) in (5, 6)  # the id is one segment, then at most the action's own


# --- (6) submitting: the hash the owner sends the stewards is the one of the spec submitted ---------------


def test_submit_study_refuses_an_answer_for_another_spec_whose_hash_would_go_to_the_stewards():
    submitted = breast_spec(["north"])
    replayed = breast_spec(["north"], rounds=50, name="an-older-study")  # signed by this owner long ago
    answer = study_json("awaiting_approval", spec=replayed.model_dump(mode="json"))
    answer["spec_hash"] = study_spec_hash(replayed)
    with (
        orchestrator(lambda r: httpx.Response(200, json=answer)) as client,
        pytest.raises(ClientError, match="do not send its hash") as refused,
    ):
        client.submit_study(submitted, IdentityKey.generate())
    assert study_spec_hash(submitted) in str(refused.value)


def test_the_control_submit_study_returns_an_answer_for_the_spec_submitted():
    submitted = breast_spec(["north"])
    answer = study_json("awaiting_approval", spec=submitted.model_dump(mode="json"))
    answer["spec_hash"] = study_spec_hash(submitted)
    with orchestrator(lambda r: httpx.Response(200, json=answer)) as client:
        info = client.submit_study(submitted, IdentityKey.generate())
    assert info.spec_hash == study_spec_hash(submitted)


# --- (7) wait_for_study: arguments and its timeout ----------------------------------------------------------


@pytest.mark.parametrize(
    ("timeout", "interval"),
    [(float("nan"), 1.0), (10.0, -1.0), (10.0, float("inf")), (10.0, float("nan"))],
    ids=["timeout-nan", "interval-negative", "interval-inf", "interval-nan"],
)
def test_wait_for_study_refuses_arguments_that_would_poll_for_ever_or_crash_before_polling(timeout, interval):
    seen: list[httpx.Request] = []
    with (
        orchestrator(lambda r: httpx.Response(200, json=study_json("running")), seen) as client,
        pytest.raises(InputError, match="wait_for_study"),
    ):
        client.wait_for_study("st_1", timeout=timeout, interval=interval)
    assert seen == []


def test_wait_for_study_gives_up_at_its_timeout_as_a_408_client_error(monkeypatch):
    class Clock:
        now = 0.0

        def monotonic(self) -> float:
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += seconds

    clock = Clock()
    monkeypatch.setattr(operator_module, "time", clock)
    polls: list[int] = []

    def running(request: httpx.Request) -> httpx.Response:
        polls.append(1)
        return httpx.Response(200, json=study_json("running"))

    progress: list[str] = []
    with orchestrator(running) as client, pytest.raises(ClientError, match="still running") as gave_up:
        client.wait_for_study("st_1", timeout=30, interval=2, on_progress=lambda i: progress.append(i.status))
    assert gave_up.value.status == 408
    assert 30 <= clock.now <= 32
    assert len(polls) == len(progress) <= 17


# --- (8) a downloaded model applied to new rows -------------------------------------------------------------


def _model_file(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    path.write_bytes(encode_tensors(tensors))
    return path


@pytest.mark.parametrize(
    "tensors",
    [
        {"weight": np.array([1.0, np.nan, 1.0], np.float32), "bias": np.zeros(1, np.float32)},
        {"weight": np.ones(3, np.float32), "bias": np.array([np.inf], np.float32)},
        {"weight": np.ones((3, 1), np.float32), "bias": np.zeros(1, np.float32)},
        {"weight": np.ones(3, np.float32), "bias": np.zeros(2, np.float32)},
        {"kernel": np.ones(3, np.float32), "bias": np.zeros(1, np.float32)},
    ],
    ids=["nan-weight", "inf-bias", "weight-2d", "bias-two", "other-tensors"],
)
def test_a_model_file_that_cannot_be_applied_is_a_model_file_error(tmp_path, tensors):
    with pytest.raises(ModelFileError):
        load_model(_model_file(tmp_path / "model.safetensors", tensors))


@pytest.mark.parametrize(
    "rows",
    [
        "p-1,1,2,nan,1\np-2,2,1,1,0\n",
        "p-1,1,2,1e400,1\np-2,2,1,1,0\n",
        "p-1,1,2,3,7\np-2,2,1,1,0\n",
        "p-1,1,2\n",
    ],
    ids=["nan", "1e400", "label-7", "short-row"],
)
def test_new_rows_that_cannot_be_predicted_are_an_input_error_and_nothing_is_written(tmp_path, rows):
    model = _model_file(
        tmp_path / "model.safetensors", {"weight": np.ones(3, np.float32), "bias": np.zeros(1, np.float32)}
    )
    csv = tmp_path / "new-patients.csv"
    csv.write_text("patient_id,a,b,c,y\n" + rows)
    before = listing(tmp_path)
    with pytest.raises(InputError):
        predict_csv(load_model(model), csv, label="y", id_column="patient_id")
    assert listing(tmp_path) == before


def test_every_refusal_above_is_a_fedhealth_error():
    for kind in (ConfigError, CryptoError, SpecFileError, ClientError, ModelFileError, InputError):
        assert issubclass(kind, FedHealthError), kind


# --- a newer orchestrator's spec field ----------------------------------------------------------------------


def test_a_spec_field_of_a_newer_orchestrator_is_one_error_saying_to_upgrade_not_a_shortened_spec():
    """A spec is read whole or not at all (docs/architecture.md, "Versions on the wire"): an older client
    facing a newer orchestrator whose study spec holds a field it lacks neither drops the field nor says only
    that the answer is not a StudyInfo; it says to upgrade. A spec that is wrong at the same protocol stays
    the plain refusal."""
    from fedhealth.protocol import PROTOCOL_VERSION
    from fedhealth.protocol._versions import version_headers

    newer = version_headers("9.0.0", protocol=PROTOCOL_VERSION + 1)
    same = version_headers("0.1.0", protocol=PROTOCOL_VERSION)
    plain = study_json()
    extended = study_json(study_id="st_2", spec={**plain["spec"], "retention_days": 30})

    def answer(headers: dict[str, str]) -> Answer:
        def reply(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/api/v1/studies":
                return httpx.Response(200, json=[plain, extended], headers=headers)
            return httpx.Response(200, json=extended, headers=headers)

        return reply

    with orchestrator(answer(newer)) as client:
        for call in (client.studies, lambda: client.study("st_2")):
            with pytest.raises(ClientError, match=r"field this release does not know .*upgrade fedhealth"):
                call()
    with orchestrator(answer(same)) as client, pytest.raises(ClientError) as caught:
        client.study("st_2")
    assert "is not a StudyInfo" in str(caught.value)
