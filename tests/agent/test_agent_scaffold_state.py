"""A site agent keeps SCAFFOLD's c_i in its home between the rounds of a study, per study: round 2 of a study
trains from round 1's c_i, another study from nothing, and c_i itself never travels (only Δc_i, in the
update)."""

from __future__ import annotations

import base64

import numpy as np
from site_fixtures import SITE, agent, approve, make_home, task

from fedhealth.core import decode_tensors
from fedhealth.data import open_dataset
from fedhealth.learning import CONTROL_VARIATE_PREFIX
from fedhealth.protocol import RecipeSpec, StrategySpec, StudySpec
from fedhealth.runtime import train_on_site

URI = "builtin://breastmnist/0?sites=4&seed=0&limit=12"
PARAMS = {"optimizer": "sgd", "learning_rate": 0.05, "batch_size": 8, "scaffold": True}


def test_the_agent_keeps_c_i_per_study_and_round_two_starts_from_round_one(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDHEALTH_TORCH_THREADS", "1")
    home = make_home(tmp_path / "site")
    spec = StudySpec(
        name="scaffold",
        dataset="breast",
        recipe=RecipeSpec(name="torch", params=PARAMS),
        strategy=StrategySpec(name="scaffold"),
        rounds=3,
        train_sites=[SITE],
    )
    approve(home, spec)
    site_agent, client = agent(home, {"breast": URI})
    bodies: list[bytes] = []
    record = client.upload_result

    def upload(task_id: str, body: bytes, **kwargs: object) -> None:
        bodies.append(body)
        record(task_id, body)

    monkeypatch.setattr(client, "upload_result", upload)

    def variates(body: bytes) -> dict[str, np.ndarray]:
        tensors, _ = decode_tensors(body)
        return {k: v for k, v in tensors.items() if k.startswith(CONTROL_VARIATE_PREFIX)}

    first = task(spec, round=1, task_id="r1")
    site_agent.handle(first)
    assert client.failures == []
    folder = home.root / "recipe-state"
    [saved] = list(folder.rglob("round-1.safetensors"))
    c_1, _ = decode_tensors(saved.read_bytes())
    # c = c_i = 0 in round 1: the update's Δc_i is c_i+ itself, and nothing else of it left the site
    sent = variates(bodies[0])
    assert sent.keys() == c_1.keys()
    for name, value in c_1.items():
        np.testing.assert_allclose(sent[name], value, rtol=1e-6, atol=1e-7)
    assert any(np.abs(v).max() > 0 for v in c_1.values())

    data = open_dataset(URI)
    second = task(spec, round=2, task_id="r2")
    site_agent.handle(second)
    assert client.failures == []
    c_2, _ = decode_tensors(next(folder.rglob("round-2.safetensors")).read_bytes())
    assert second.model_inline is not None
    model, _ = decode_tensors(base64.b64decode(second.model_inline))
    expected = train_on_site(second, SITE, model, data, site_state=c_1).site_state
    assert expected is not None
    for name in c_2:
        np.testing.assert_allclose(c_2[name], expected[name], rtol=1e-5, atol=1e-7)

    other = task(spec, round=2, task_id="o2").model_copy(update={"study_id": "st-2"})
    site_agent.handle(other)
    assert client.failures == []
    fresh = train_on_site(other, SITE, model, data, site_state=None).site_state
    assert fresh is not None
    [other_file] = [p for p in folder.rglob("round-2.safetensors") if p.parent != saved.parent]
    c_other, _ = decode_tensors(other_file.read_bytes())
    for name in c_other:
        np.testing.assert_allclose(c_other[name], fresh[name], rtol=1e-5, atol=1e-7)
    assert not all(np.allclose(c_other[n], c_2[n]) for n in c_2)  # the two studies' c_i differ
