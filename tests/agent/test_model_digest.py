"""The site trains only the model its task names: the bytes it receives, inline or downloaded, must hash to
the task's model digest, or the task fails with a reason and nothing is trained or uploaded."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from fedhealth.agent import AgentSettings, SiteAgent
from fedhealth.core import encode_tensors
from fedhealth.crypto import IdentityKey
from fedhealth.protocol import FailureCode, StudySpec, Task, TaskFailure, TaskKind, TaskPoll
from fedhealth.runtime import initial_model
from support import synthetic_recipe

SITE = "site-a"


class StubClient:
    """Stands in for the orchestrator: serves one model blob, records what the agent sends."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.downloads = 0
        self.uploads: list[str] = []
        self.failures: list[tuple[str, str]] = []

    def get_model(
        self, digest: str, *, max_elapsed_s: float | None = None, max_bytes: int | None = None
    ) -> bytes:
        self.downloads += 1
        return self.blob

    def upload_result(self, task_id: str, body: bytes, *, max_elapsed_s: float | None = None) -> None:
        self.uploads.append(task_id)

    def report_failure(
        self, task_id: str, failure: TaskFailure, *, max_elapsed_s: float | None = None
    ) -> None:
        self.failures.append((failure.code, failure.reason))

    def next_task(self, wait: float) -> TaskPoll:  # pragma: no cover - the tests call handle() directly
        raise AssertionError("not polled")

    def close(self) -> None:
        pass


def _task(digest: str, inline: bytes | None) -> Task:
    spec = StudySpec(
        name="s",
        dataset="none",
        recipe=synthetic_recipe(100),
        rounds=1,
        train_sites=[SITE],
    )
    return Task(
        task_id="t-1",
        study_id="study-1",
        round=1,
        kind=TaskKind.TRAIN,
        dataset="none",
        recipe=spec.recipe,
        model_digest=digest,
        model_inline=base64.b64encode(inline).decode() if inline is not None else None,
        seed=0,
        deadline=datetime.now(UTC) + timedelta(minutes=1),
        spec=spec,
    )


@pytest.fixture
def model_blob() -> bytes:
    recipe = synthetic_recipe(100)
    return encode_tensors(initial_model(recipe, 0))


def _agent(client: StubClient) -> SiteAgent:
    settings = AgentSettings(orchestrator_url="https://x.invalid", site=SITE, identity=IdentityKey.generate())
    return SiteAgent(settings, client=client)  # type: ignore[arg-type]


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "downloaded"])
def test_a_model_matching_its_digest_is_trained_and_uploaded(model_blob, inline):
    client = StubClient(model_blob)
    digest = hashlib.sha256(model_blob).hexdigest()
    _agent(client).handle(_task(digest, model_blob if inline else None))
    assert client.failures == []
    assert client.uploads == ["t-1"]
    assert client.downloads == (0 if inline else 1)


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "downloaded"])
def test_a_model_that_does_not_match_its_digest_fails_the_task_and_nothing_is_uploaded(
    model_blob, inline, caplog
):
    tampered = bytearray(model_blob)
    tampered[-1] ^= 0x01  # one flipped bit in the last float
    digest = hashlib.sha256(model_blob).hexdigest()
    client = StubClient(bytes(tampered))
    _agent(client).handle(_task(digest, bytes(tampered) if inline else None))
    assert client.uploads == []
    [(code, reason)] = client.failures
    assert code == "invalid_task"
    assert reason == FailureCode.INVALID_TASK.message  # the orchestrator gets the code's fixed sentence
    assert f"does not match its digest {digest[:16]}" in caplog.text  # the detail stays in the site's log


def test_an_inline_model_that_is_not_base64_fails_the_task(model_blob, caplog):
    client = StubClient(model_blob)
    task = _task(hashlib.sha256(model_blob).hexdigest(), None).model_copy(
        update={"model_inline": "not*base64"}
    )
    _agent(client).handle(task)
    assert client.uploads == []
    [(code, reason)] = client.failures
    assert code == "invalid_task"
    assert reason == FailureCode.INVALID_TASK.message
    assert "not base64" in caplog.text
