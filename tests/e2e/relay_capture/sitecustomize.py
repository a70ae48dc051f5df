"""Test instrumentation for the collective e2e tests, loaded by the services' processes through PYTHONPATH.

With ``FEDHEALTH_TEST_RELAY_CAPTURE`` set to a file, every call the orchestrator's collective relay takes in
(site, index, op, the first values of a sum) and every call it completes are appended to that file as JSON
lines: what the orchestrator held, for the test to compare with the sites' own values. Production code is
not changed; without the variable this module does nothing.
"""

from __future__ import annotations

import json
import os
import threading
import time

_PATH = os.environ.get("FEDHEALTH_TEST_RELAY_CAPTURE")

if _PATH:
    import numpy as np

    from fedhealth.secagg import _collective_relay
    from fedhealth.secagg._session import CollectiveOp, decode_call

    _lock = threading.Lock()
    _receive = _collective_relay.CollectiveRelay.receive
    _complete = _collective_relay.CollectiveRelay._complete

    def _write(record: dict[str, object]) -> None:
        record["time"] = time.time()
        with _lock, open(_PATH, "a") as f:
            f.write(json.dumps(record) + "\n")

    def receive(self, site, index, body):  # type: ignore[no-untyped-def]
        if not self.received(site, index):
            op, payload = decode_call(body)
            record: dict[str, object] = {"event": "received", "site": site, "index": index, "op": op.name}
            if op is CollectiveOp.SUM:
                record["head"] = np.frombuffer(payload, dtype="<u8")[:16].tolist()
            _write(record)
        return _receive(self, site, index, body)

    def complete(self, op):  # type: ignore[no-untyped-def]
        _write({"event": "completed", "index": self.index, "op": op.name})
        return _complete(self, op)

    _collective_relay.CollectiveRelay.receive = receive  # type: ignore[method-assign]
    _collective_relay.CollectiveRelay._complete = complete  # type: ignore[method-assign]
