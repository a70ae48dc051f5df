"""A malicious orchestrator against a site through the content it serves (in process, no services): model
blobs whose digest matches (the orchestrator chooses both) but whose tensors or safetensors header lie, ids
crafted to escape the site home or to inject into its records, and recipe params changed after approval or
beyond what the recipe allows. Each test plays one lie against the real agent (with its real gates on a real
site home where the lie is about governance) and checks that the site refuses it, or that what the site
writes stays inside its home. The transport-level lies (endless or enormous bodies, giant headers,
redirects) are in test_malicious_orchestrator_transport.py."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from site_fixtures import agent, approve, make_home, task
from sqlalchemy import inspect, select

from fedhealth.agent import AgentSettings, SiteAgent
from fedhealth.agent._site_state import SiteStateStore
from fedhealth.core import TensorError, decode_tensors, encode_tensors, sha256_hex
from fedhealth.core._tensors import MAX_HEADER_BYTES
from fedhealth.crypto import IdentityKey
from fedhealth.governance import GOVERNANCE_METADATA
from fedhealth.privacy import sqlite_engine
from fedhealth.protocol import FailureCode, RecipeSpec, StudySpec, Task, TaskFailure, TaskKind
from fedhealth.runtime import initial_model, param_specs
from support import logreg_recipe

SITE = "hospital-a"
RECIPE = logreg_recipe(2, learning_rate=0.5)  # tensors: bias (1,) float32, weight (2,) float32


# --- a stand-in orchestrator client -------------------------------------------------------------------------


class StubClient:
    """Serves one model blob (the orchestrator's choice) and records what the agent sends back."""

    def __init__(self, blob: bytes = b"") -> None:
        self.blob = blob
        self.downloads = 0
        self.uploads: list[str] = []
        self.failures: list[str] = []

    def get_model(
        self, digest: str, *, max_elapsed_s: float | None = None, max_bytes: int | None = None
    ) -> bytes:
        self.downloads += 1
        return self.blob

    def upload_result(self, task_id: str, body: bytes, *, max_elapsed_s: float | None = None) -> None:
        self.uploads.append(task_id)

    def upload_evaluation(
        self, task_id: str, manifest: object, *, max_elapsed_s: float | None = None
    ) -> None:
        self.uploads.append(task_id)

    def report_failure(
        self, task_id: str, failure: TaskFailure, *, max_elapsed_s: float | None = None
    ) -> None:
        self.failures.append(failure.code.value)

    def close(self) -> None:
        pass


def bare_agent(client: StubClient, datasets: dict[str, str]) -> SiteAgent:
    """The agent without a home or gates: only its own checks (digest, tensor codec, recipe) stand."""
    settings = AgentSettings(
        orchestrator_url="https://x.invalid", site=SITE, identity=IdentityKey.generate(), datasets=datasets
    )
    return SiteAgent(settings, client=client)  # type: ignore[arg-type]


def plain_spec(recipe: RecipeSpec = RECIPE, **fields: object) -> StudySpec:
    return StudySpec.model_validate(
        {"name": "s", "dataset": "cohort", "recipe": recipe, "rounds": 2, "train_sites": [SITE], **fields}
    )


def task_serving(blob: bytes, *, inline: bool) -> Task:
    """A task whose model digest is the blob's own: the digest check passes, the blob is the lie."""
    spec = plain_spec()
    return Task(
        task_id="t-1",
        study_id="st-1",
        round=1,
        kind=TaskKind.TRAIN,
        dataset="cohort",
        recipe=spec.recipe,
        model_digest=sha256_hex(blob),
        model_inline=base64.b64encode(blob).decode() if inline else None,
        seed=0,
        deadline=datetime.now(UTC) + timedelta(minutes=1),
        spec=spec,
    )


# --- hostile safetensors blobs ----------------------------------------------------------------------------


def raw(header: object, data: bytes, *, header_len: int | None = None) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + data


def f32(*values: float) -> bytes:
    return np.array(values, dtype=np.float32).tobytes()


def entry(dtype: str, shape: list[int], start: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def good_blob() -> bytes:
    return encode_tensors(initial_model(RECIPE, 0))


HOSTILE_BLOBS: dict[str, bytes] = {
    "empty": b"",
    "shorter-than-its-length-field": b"\x01\x02\x03",
    "truncated-data": good_blob()[:-4],
    "header-only": good_blob()[: 8 + struct.unpack("<Q", good_blob()[:8])[0]],
    "header-length-2^64-1": b"\xff" * 8 + b"{}",
    "header-length-just-over-the-limit": raw(b"{}", b"", header_len=MAX_HEADER_BYTES + 1),
    "header-length-beyond-the-payload": raw(b"{}", b"", header_len=4096),
    "header-not-json": raw(b"{not json", b""),
    "header-a-list": raw([], b""),
    "wrong-dtype": encode_tensors({"bias": np.zeros(1, np.float64), "weight": np.zeros(2, np.float64)}),
    "int-dtype": encode_tensors({"bias": np.zeros(1, np.int64), "weight": np.zeros(2, np.int64)}),
    "unsupported-dtype-code": raw(
        {"bias": entry("F16", [1], 0, 2), "weight": entry("F32", [2], 2, 10)}, b"\0" * 10
    ),
    "wrong-shape": encode_tensors({"bias": np.zeros(1, np.float32), "weight": np.zeros(3, np.float32)}),
    "wrong-rank": encode_tensors({"bias": np.zeros(1, np.float32), "weight": np.zeros((2, 1), np.float32)}),
    "missing-tensor": encode_tensors({"weight": np.zeros(2, np.float32)}),
    "extra-tensor": encode_tensors({**initial_model(RECIPE, 0), "backdoor": np.ones(4, np.float32)}),
    "nan": encode_tensors({"bias": np.zeros(1, np.float32), "weight": np.array([0, np.nan], np.float32)}),
    "inf": encode_tensors({"bias": np.array([np.inf], np.float32), "weight": np.zeros(2, np.float32)}),
    "-inf": encode_tensors({"bias": np.zeros(1, np.float32), "weight": np.array([-np.inf, 0], np.float32)}),
    "offsets-beyond-the-data": raw(
        {"bias": entry("F32", [1], 0, 4), "weight": entry("F32", [2], 4, 12)}, f32(0, 0)
    ),
    "offsets-overlapping": raw(
        {"bias": entry("F32", [1], 0, 4), "weight": entry("F32", [2], 0, 8)}, f32(0, 0, 0)
    ),
    "offsets-reversed": raw(
        {"bias": entry("F32", [1], 4, 0), "weight": entry("F32", [2], 4, 12)}, f32(0, 0, 0)
    ),
    "offsets-negative": raw(
        {"bias": entry("F32", [1], -4, 0), "weight": entry("F32", [2], 0, 8)}, f32(0, 0, 0)
    ),
    "offsets-leave-a-gap": raw(
        {"bias": entry("F32", [1], 4, 8), "weight": entry("F32", [2], 8, 16)}, f32(0, 0, 0, 0)
    ),
    "trailing-bytes": good_blob() + b"\0" * 64,
    "shape-product-huge-but-no-data": raw(
        {"bias": entry("F32", [2**40, 2**40], 0, 4), "weight": entry("F32", [2], 4, 12)}, f32(0, 0, 0)
    ),
    "shape-negative": raw(
        {"bias": entry("F32", [-1], 0, 4), "weight": entry("F32", [2], 4, 12)}, f32(0, 0, 0)
    ),
    "shape-not-a-list": raw(
        {"bias": entry("F32", 1, 0, 4), "weight": entry("F32", [2], 4, 12)}, f32(0, 0, 0)
    ),  # type: ignore[arg-type]
    "entry-missing-offsets": raw(
        {"bias": {"dtype": "F32", "shape": [1]}, "weight": entry("F32", [2], 4, 12)}, f32(0, 0, 0)
    ),
    "metadata-not-strings": raw(
        {"__metadata__": {"k": 1}, "bias": entry("F32", [1], 0, 4), "weight": entry("F32", [2], 4, 12)},
        f32(0, 0, 0),
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BLOBS))
def test_the_codec_refuses_each_hostile_blob_against_the_models_specs(name):
    with pytest.raises(TensorError):
        decode_tensors(HOSTILE_BLOBS[name], param_specs(RECIPE))


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "downloaded"])
@pytest.mark.parametrize("name", sorted(HOSTILE_BLOBS))
def test_a_hostile_model_whose_digest_matches_fails_the_task_before_any_data_is_opened(
    name, inline, tmp_path
):
    """The dataset names no file: an agent that accepted the blob would go on to open it and report
    dataset_unavailable; the blob is refused first (invalid_task) and nothing is uploaded."""
    client = StubClient(HOSTILE_BLOBS[name])
    site = bare_agent(client, {"cohort": f"file://{tmp_path}/absent.csv?label=label"})
    site.handle(task_serving(HOSTILE_BLOBS[name], inline=inline))
    assert client.failures == [FailureCode.INVALID_TASK.value]
    assert client.uploads == []
    assert client.downloads == (0 if inline else 1)


def test_the_control_a_well_formed_blob_passes_the_model_checks_and_reaches_the_dataset(tmp_path):
    client = StubClient(good_blob())
    site = bare_agent(client, {"cohort": f"file://{tmp_path}/absent.csv?label=label"})
    site.handle(task_serving(good_blob(), inline=False))
    assert client.failures == [FailureCode.DATASET_UNAVAILABLE.value]


def deeply_nested_header(depth: int = 200_000) -> bytes:
    return raw(b"[" * depth + b"]" * depth, b"")


def test_a_deeply_nested_header_is_a_tensor_error():
    with pytest.raises(TensorError):
        decode_tensors(deeply_nested_header(), param_specs(RECIPE))


def test_a_model_with_a_deeply_nested_header_is_an_invalid_task(tmp_path):
    blob = deeply_nested_header()
    client = StubClient(blob)
    bare_agent(client, {"cohort": f"file://{tmp_path}/absent.csv?label=label"}).handle(
        task_serving(blob, inline=False)
    )
    assert client.failures == [FailureCode.INVALID_TASK.value]


def test_a_header_naming_a_tensor_twice_decodes_to_the_entry_that_was_checked():
    """Two parsers read the header (Python's json for the checks, safetensors' own for the data): a name given
    twice must not let the checked entry differ from the loaded one (float64 data passing as float32)."""
    weight64 = np.arange(2, dtype=np.float64).tobytes()  # 16 bytes: also 4 float32 values
    header = (
        b'{"bias":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"weight":{"dtype":"F64","shape":[2],"data_offsets":[4,20]},'
        b'"weight":{"dtype":"F32","shape":[4],"data_offsets":[4,20]}}'
    )
    blob = raw(header, f32(0) + weight64)
    specs = param_specs(RECIPE)
    wanted = {s.name: s for s in specs}
    try:
        tensors, _ = decode_tensors(blob, specs)
    except TensorError:
        return  # refused: fine
    for name, arr in tensors.items():
        assert arr.shape == wanted[name].shape
        assert str(arr.dtype) == wanted[name].dtype


def test_a_model_far_larger_than_the_recipes_is_refused_from_its_header_before_its_data_is_copied():
    """A blob with the right names but a huge shape: refused by the shape check against the recipe's
    specs, which needs the header only."""
    big = encode_tensors({"bias": np.zeros(1, np.float32), "weight": np.zeros(1 << 20, np.float32)})
    with pytest.raises(TensorError, match="expected shape"):
        decode_tensors(big, param_specs(RECIPE))


# --- ids crafted for path traversal or injection ------------------------------------------------------------

EVIL_IDS = {
    "dotdot": "../../../../escaped",
    "absolute": "/tmp/fedhealth-escaped",
    "nul": "st\x00../../escaped",
    "newline": 'st-1"\n{"study_id": "forged", "metrics": {}}',
    "very-long": "s" * 5000,
    "unicode": "étude-∑-😀-\u202eexe.txt",
    "sql": "st'; DROP TABLE gov_audit_entries; --",
    "backslash": "..\\..\\escaped",
}


def write_csv(path: Path) -> str:
    rows = [f"p{i:04d},{i % 7 / 3:.3f},{i % 5 - 2},{i % 2}" for i in range(40)]
    path.write_text("patient_id,age,marker,label\n" + "\n".join(rows) + "\n")
    return f"file://{path}?label=label&id=patient_id"


def everything_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("which", sorted(EVIL_IDS))
def test_crafted_study_and_task_ids_stay_data_in_the_site_home(tmp_path, which):
    """The real agent and gates on a real home train a task whose study and task ids are crafted: nothing is
    written outside the home, the results record stays one JSON line per task holding the id verbatim, and
    the site database holds the id as data (no statement injected). An id over 128 characters is refused
    (invalid_task) and leaves nothing outside the home either."""
    evil = EVIL_IDS[which]
    outside = tmp_path / "outside"
    outside.mkdir()
    home = make_home(tmp_path / "site")
    spec = plain_spec()
    approve(home, spec)
    site, client = agent(home, {"cohort": write_csv(outside / "cohort.csv")})
    before = everything_under(tmp_path)
    site.handle(task(spec).model_copy(update={"study_id": evil, "task_id": evil}))
    created = everything_under(tmp_path) - before
    assert all(home.root in p.parents for p in created), sorted(map(str, created))
    assert not Path("/tmp/fedhealth-escaped").exists()
    if len(evil) > 128:  # the privacy ledger keys reservations by these ids: 1 to 128 characters
        assert [f.code for f in client.failures] == [FailureCode.INVALID_TASK]
        assert client.results == []
    else:
        assert client.failures == []
        assert len(client.results) == 1
        lines = (home.root / "results.jsonl").read_text().splitlines()
        assert [json.loads(line)["study_id"] for line in lines] == [evil]
    engine = sqlite_engine(home.database_path)
    try:
        assert "gov_audit_entries" in inspect(engine).get_table_names()
        entries = GOVERNANCE_METADATA.tables["gov_audit_entries"]
        with engine.connect() as conn:
            payloads = [row[0] for row in conn.execute(select(entries.c.payload))]
    finally:
        engine.dispose()
    received = [p for p in payloads if (json.loads(p) if isinstance(p, str) else p).get("task_id") == evil]
    assert received, "the task's receipt is not in the site's log under its id"


@pytest.mark.parametrize("which", sorted(EVIL_IDS))
def test_recipe_state_and_checkpoints_of_a_crafted_study_id_live_in_a_hashed_folder_of_the_home(
    tmp_path, which
):
    evil = EVIL_IDS[which]
    root = tmp_path / "site" / "recipe-state"
    store = SiteStateStore(root)
    store.save(evil, 3, {"c": np.ones(2, np.float32)})
    [folder] = list(root.iterdir())
    assert folder.parent == root
    assert folder.name == hashlib.sha256(evil.encode()).hexdigest()[:32]
    assert [p.name for p in folder.iterdir()] == ["round-3.safetensors"]
    np.testing.assert_array_equal(store.load(evil, 4)["c"], np.ones(2, np.float32))  # type: ignore[index]
    settings = AgentSettings(
        orchestrator_url="https://x.invalid",
        site=SITE,
        identity=IdentityKey.generate(),
        home=tmp_path / "site",
    )
    site = SiteAgent(settings, client=StubClient())  # type: ignore[arg-type]
    checkpoints = site._checkpoints(task(plain_spec()).model_copy(update={"study_id": evil}))
    assert checkpoints is not None
    assert checkpoints.parent == tmp_path / "site" / "checkpoints"
    assert len(checkpoints.name) == 32
    assert all(c in "0123456789abcdef" for c in checkpoints.name)


@pytest.mark.parametrize(
    "dataset", ["../../etc/passwd", "/etc/passwd", "cohort\x00../x", "cohort/../../x", "COHORT", "c" * 5000]
)
def test_a_task_naming_a_dataset_other_than_its_specs_is_refused_before_any_dataset_is_opened(
    tmp_path, dataset
):
    """The task's dataset is free text on the wire; the site opens only its spec's (a lowercase name) and
    refuses a task naming anything else before it looks the name up."""
    home = make_home(tmp_path / "site")
    spec = plain_spec()
    approve(home, spec)
    site, client = agent(
        home, {"cohort": f"file://{tmp_path}/absent.csv?label=label", dataset: "file:///etc/passwd"}
    )
    site.handle(task(spec).model_copy(update={"dataset": dataset}))
    assert [f.code for f in client.failures] == [FailureCode.SPEC_MISMATCH]
    assert client.results == []


@pytest.mark.parametrize("dataset", ["../../etc/passwd", "/etc/passwd", "a\x00b", "Cohort", "c" * 64])
def test_a_spec_cannot_name_a_dataset_that_is_not_a_plain_lowercase_name(dataset):
    with pytest.raises(ValueError, match="dataset"):
        plain_spec(dataset=dataset)


# --- recipe params: changed after approval, or beyond the recipe's bounds ---------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"local_epochs": 10_000},  # the recipe's maximum, 10 000 epochs in place of 1
        {"batch_size": 1_000_000},
        {"local_steps": 1_000_000},
        {"learning_rate": 100.0},
    ],
)
def test_recipe_params_raised_by_the_orchestrator_after_approval_are_refused_before_the_model_or_data(
    tmp_path, params
):
    """The params are part of the spec hash: a spec whose recipe params differ from the approved one is not
    approved, whatever else it shares with it; refused before the model is fetched or any data opened."""
    home = make_home(tmp_path / "site")
    approved = plain_spec()
    approve(home, approved)
    raised = plain_spec(recipe=logreg_recipe(2, **{"learning_rate": 0.5, **params}))
    site, client = agent(home, {"cohort": write_csv(tmp_path / "cohort.csv")})
    fetched: list[str] = []
    site.client.get_model = lambda digest, **_: fetched.append(digest) or b""  # type: ignore[method-assign]
    site.handle(task(raised).model_copy(update={"model_inline": None}))
    assert [f.code for f in client.failures] == [FailureCode.STUDY_APPROVAL]
    assert fetched == []
    assert client.results == []


def test_a_task_running_other_recipe_params_than_its_approved_spec_is_refused(tmp_path):
    """The spec (the approved thing) is unchanged; only the task's own recipe, which the agent trains with,
    carries the orchestrator's params."""
    home = make_home(tmp_path / "site")
    spec = plain_spec()
    approve(home, spec)
    site, client = agent(home, {"cohort": write_csv(tmp_path / "cohort.csv")})
    site.handle(
        task(spec).model_copy(update={"recipe": logreg_recipe(2, learning_rate=0.5, local_epochs=10_000)})
    )
    assert [f.code for f in client.failures] == [FailureCode.SPEC_MISMATCH]
    assert client.results == []


@pytest.mark.parametrize(
    "recipe",
    [
        RecipeSpec(name="logreg", params={"n_features": 2, "local_epochs": 10_001}),
        RecipeSpec(name="logreg", params={"n_features": 2, "batch_size": 1_000_001}),
        RecipeSpec(name="logreg", params={"n_features": 1_000_001}),
        RecipeSpec(name="logreg", params={"n_features": 2, "local_steps": 10**12}),
        RecipeSpec(name="synthetic", params={"n_params": 100_000_001}),
        RecipeSpec(name="logreg", params={"n_features": 2, "learning_rate": 101.0}),
    ],
    ids=["epochs", "batch", "width", "steps", "synthetic-size", "learning-rate"],
)
def test_params_beyond_the_recipes_bounds_are_refused_at_the_site_even_when_the_steward_approved_them(
    tmp_path, recipe
):
    """The recipe's own bounds are the site's limit that no approval lifts: a steward who approved the spec
    (by hash) still gets invalid_recipe, before the model is fetched (a 100M-parameter model would be 400 MB)
    or any data opened."""
    home = make_home(tmp_path / "site")
    spec = plain_spec(recipe=recipe)
    approve(home, spec)
    site, client = agent(home, {"cohort": write_csv(tmp_path / "cohort.csv")})
    fetched: list[str] = []
    site.client.get_model = lambda digest, **_: fetched.append(digest) or b""  # type: ignore[method-assign]
    t = task(plain_spec()).model_copy(update={"recipe": recipe, "spec": spec, "model_inline": None})
    site.handle(t)
    assert [f.code for f in client.failures] == [FailureCode.INVALID_RECIPE]
    assert fetched == []
    assert client.results == []
