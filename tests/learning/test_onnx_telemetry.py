"""Nothing phones home (docs/security.md): onnxruntime 1.29 and later sends telemetry to Microsoft from
Linux, keeps a persistent device identifier in ``~/.cache/Microsoft`` and reads its only off switch
(``ORT_DISABLE_TELEMETRY``) once, when it is imported. A hospital's process that loads a model package
(``fedhealth.load_model`` checks its ONNX file with onnxruntime) or exports one must neither connect out nor
leave that identifier behind.

Each process runs with every proxy variable naming a local listener, so an outgoing connection shows up
there as a ``CONNECT``; the control imports onnxruntime before fedhealth and is seen connecting. onnxruntime
sends nothing where it sees a CI service's variable (``CI``, ``GITHUB_ACTIONS``, ``JENKINS_URL``...), which a
hospital's host does not set, so both processes run with a bare environment: ``PATH``, ``HOME`` and the
proxy variables. Each is timed from its ``ready`` line (its ONNX session has run), not from its start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import PROXY_VARIABLES, proxy_recorder

SCRIPT = """
import sys, time
{first}
import numpy as np
from onnx import TensorProto, helper

x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
session.run(None, {{"x": np.ones((1, 2), np.float32)}})
print("ready", flush=True)
time.sleep(float(sys.argv[1]))
"""
FEDHEALTH_FIRST = "import fedhealth\nimport onnxruntime"
ONNXRUNTIME_FIRST = "import onnxruntime\nimport fedhealth"


def _start(first: str, home: Path, port: int) -> subprocess.Popen[bytes]:
    # a bare environment: no ORT_DISABLE_TELEMETRY, no CI variable, no proxy but the listener
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    env |= dict.fromkeys(PROXY_VARIABLES, f"http://127.0.0.1:{port}")
    home.mkdir()
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT.format(first=first), "600"],  # lives until the test kills it
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _ready(process: subprocess.Popen[bytes]) -> tuple[float, bytes]:
    """Reads the process's output up to its ``ready`` line; returns when that came and what it printed."""
    assert process.stdout is not None
    printed = b""
    for line in iter(process.stdout.readline, b""):
        printed += line
        if line.strip() == b"ready":
            return time.monotonic(), printed
    raise AssertionError(f"ended before its ONNX session ran: {printed.decode(errors='replace')}")


@pytest.mark.timeout(300)
def test_a_process_that_imports_fedhealth_sends_onnxruntime_telemetry_nowhere_and_keeps_no_device_id(
    tmp_path,
):
    with proxy_recorder() as (ours_port, ours_seen), proxy_recorder() as (control_port, control_seen):
        # side by side: how long after its session the control connects (about 8 s here) bounds how long
        # ours is watched after its own
        control = _start(ONNXRUNTIME_FIRST, tmp_path / "control", control_port)
        ours = _start(FEDHEALTH_FIRST, tmp_path / "ours", ours_port)
        control_ready, control_printed = _ready(control)
        ours_ready, ours_printed = _ready(ours)
        while not control_seen and time.monotonic() - control_ready < 120:
            time.sleep(0.1)
        took = time.monotonic() - control_ready
        while time.monotonic() - ours_ready < took + 5:  # as long as the control needed, and a margin
            time.sleep(0.1)
        # both still running: ours did not end (or crash) before onnxruntime could connect
        alive = {name: p.poll() is None for name, p in (("ours", ours), ("control", control))}
        for process in (ours, control):
            process.kill()
        outputs = {
            name: (printed + p.communicate()[0]).decode(errors="replace")
            for name, p, printed in (("ours", ours, ours_printed), ("control", control, control_printed))
        }
        assert alive == {"ours": True, "control": True}, outputs
    # the control: onnxruntime imported first is seen connecting out, so a connection from ours would show
    assert control_seen
    assert b"CONNECT mobile.events.data.microsoft.com" in control_seen[0]
    assert (tmp_path / "control" / ".cache" / "Microsoft").exists()
    assert ours_seen == []
    assert not (tmp_path / "ours" / ".cache" / "Microsoft").exists()


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)


def test_importing_fedhealth_turns_onnxruntimes_telemetry_off_even_when_the_environment_turned_it_on():
    out = _python(
        "import os, fedhealth; print(os.environ['ORT_DISABLE_TELEMETRY'])",
        dict(os.environ, ORT_DISABLE_TELEMETRY="0"),
    )
    assert out.stdout.strip() == "1"


def test_a_process_that_imported_onnxruntime_before_fedhealth_is_warned_that_its_telemetry_is_on():
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    late = _python("import onnxruntime, fedhealth", env)
    assert "RuntimeWarning: onnxruntime was imported before fedhealth with its telemetry on" in late.stderr
    # control: switched off in the environment, or fedhealth imported first, nothing to warn of
    quiet = _python("import onnxruntime, fedhealth", dict(env, ORT_DISABLE_TELEMETRY="1"))
    first = _python("import fedhealth, onnxruntime", env)
    assert "RuntimeWarning" not in quiet.stderr
    assert "RuntimeWarning" not in first.stderr
