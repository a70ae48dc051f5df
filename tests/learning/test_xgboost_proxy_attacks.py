"""A local account against the site's XGBoost proxy (docs/boosting.md, XGBoost): it listens on 127.0.0.1
only and answers only its own process. tests/learning/test_xgboost_proxy_callers.py tries one Allreduce from
another process; here every method, the listening address, and a connection of another process from the
very port an admitted connection of the agent used (a local account reads that port in the world-readable
/proc/net/tcp, and takes it once the agent's connection is gone)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedhealth.learning import _xgboost_proxy
from fedhealth.learning._xgboost_proxy import SERVICE
from support import allreduce_request

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the caller check reads Linux's /proc")


def _gather_request(data: bytes, root: int | None = None) -> bytes:
    """AllgatherRequest / BroadcastRequest: sequence 0, rank 1, the bytes (field 3), root (field 4)."""
    out = bytes([0x08, 0, 0x10, 1, 0x1A, len(data)]) + data
    return out + (bytes([0x20, root]) if root is not None else b"")


def _listening(port: int) -> list[str]:
    """The local addresses of the sockets listening on ``port`` (the kernel's TCP tables, as printed)."""
    found = []
    for name in ("tcp", "tcp6"):
        path = Path(f"/proc/net/{name}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local_ip, _, local_port = fields[1].partition(":")
            if fields[3] == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
                found.append(local_ip)
    return found


def test_the_proxy_listens_on_the_loopback_address_only(proxy):
    server, _, address = proxy
    assert address == f"127.0.0.1:{server.port}"
    listening = _listening(server.port)
    assert listening, "the proxy's listening socket is not in the kernel's tables"
    loopback = {
        "0100007F",
        "7F000001",
        "0000000000000000FFFF00000100007F",
        "00000000000000000000FFFF7F000001",
    }
    assert set(listening) <= loopback, listening  # not 0.0.0.0, not [::]: no other interface reaches it


def test_every_method_of_the_proxy_refuses_another_process(proxy):
    server, session, address = proxy
    calls = {
        "Allreduce": allreduce_request(np.zeros(4)),
        "Allgather": _gather_request(b"\x01\x02\x03\x04"),
        "AllgatherV": _gather_request(b"\x05\x06"),
        "Broadcast": _gather_request(b"", root=0),
    }
    attacker = textwrap.dedent(
        f"""
        import grpc
        calls = {calls!r}
        with grpc.insecure_channel({address!r}) as channel:
            for method, request in calls.items():
                try:
                    channel.unary_unary("/{SERVICE}/" + method)(request, timeout=20)
                    print(method, "ANSWERED")
                except grpc.RpcError as exc:
                    print(method, exc.code().name)
        """
    )
    out = subprocess.run([sys.executable, "-c", attacker], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == [f"{m} PERMISSION_DENIED" for m in calls]
    assert session.sums == []  # nothing reached the session
    assert server.error is None
    with grpc.insecure_channel(address) as channel:  # the worker is still answered
        channel.unary_unary(f"/{SERVICE}/Allreduce")(calls["Allreduce"], timeout=20)
    assert len(session.sums) == 1


def test_without_proc_the_proxy_says_so_once_and_answers(proxy, monkeypatch, caplog):
    server, session, address = proxy
    monkeypatch.setattr(_xgboost_proxy, "own_peer_socket", lambda peer, port: None)
    with caplog.at_level(logging.WARNING, logger=_xgboost_proxy.__name__):
        for _ in range(2):
            with grpc.insecure_channel(address) as channel:  # a new connection each time
                channel.unary_unary(f"/{SERVICE}/Allreduce")(allreduce_request(np.ones(2)), timeout=20)
    assert len(session.sums) == 2
    warnings = [r for r in caplog.records if "cannot be checked" in r.getMessage()]
    assert len(warnings) == 1
    assert server.refused == 0


# --- a connection of another process from the port of a closed connection of the agent --------------------

# A gRPC call over a plain socket (HTTP/2 by hand: the client preface, SETTINGS, one HEADERS frame of literal
# fields, one DATA frame): the attacker must choose its source port, which grpc's channels cannot.
_RAW_CALL = textwrap.dedent(
    '''
    import socket
    import struct

    def _frame(kind, flags, stream, payload):
        head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
        return head + struct.pack(">I", stream) + payload

    def _literal(name, value):
        name, value = name.encode(), value.encode()
        return bytes([0x00, len(name)]) + name + bytes([len(value)]) + value

    def raw_call(source_port, server_port, path, message, linger_reset):
        """One unary call from 127.0.0.1:source_port; whether a DATA frame (a reply) came back."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if linger_reset:  # closing sends RST: the port is free at once, no TIME_WAIT
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.bind(("127.0.0.1", source_port))
        sock.settimeout(20)
        sock.connect(("127.0.0.1", server_port))
        headers = b"".join(
            _literal(k, v)
            for k, v in (
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "127.0.0.1:%d" % server_port),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        body = b"\\x00" + struct.pack(">I", len(message)) + message
        sock.sendall(
            b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n"
            + _frame(4, 0, 0, b"")
            + _frame(4, 1, 0, b"")
            + _frame(1, 4, 1, headers)
            + _frame(0, 1, 1, body)
        )
        buffer, answered = b"", False
        try:
            while True:
                while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                    length, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
                    stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                    buffer = buffer[9 + length :]
                    if kind == 0 and stream == 1 and length > 0:
                        answered = True
                    if kind == 1 and stream == 1 and flags & 1:  # trailers: the call is over
                        return answered
                    if kind in (3, 7):  # RST_STREAM, GOAWAY
                        return answered
                chunk = sock.recv(65536)
                if not chunk:
                    return answered
                buffer += chunk
        finally:
            sock.close()
    '''
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_hand_made_call_of_another_process_is_refused(proxy):
    # the control of the test below: the hand-made client is a gRPC client the proxy checks like any
    server, session, _ = proxy
    attacker = _RAW_CALL + textwrap.dedent(
        f"""
        request = {allreduce_request(np.full(2, 7.0))!r}
        path = "/{SERVICE}/Allreduce"
        print("ANSWERED" if raw_call({_free_port()}, {server.port}, path, request, True) else "REFUSED")
        """
    )
    out = subprocess.run([sys.executable, "-c", attacker], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "REFUSED"
    assert session.sums == []
    assert server.refused == 1


def test_another_process_on_the_port_of_a_closed_connection_of_the_agent_is_refused(proxy):
    server, session, _ = proxy
    namespace: dict[str, Any] = {}
    exec(_RAW_CALL, namespace)
    path = f"/{SERVICE}/Allreduce"
    port = _free_port()
    # the agent's own connection (this process) from ``port``: checked, admitted and answered
    assert namespace["raw_call"](port, server.port, path, allreduce_request(np.ones(2)), True)
    assert len(session.sums) == 1
    assert set(server._peers) == {f"ipv4:127.0.0.1:{port}"}
    # that connection is gone; a program of another account takes its port (read in /proc/net/tcp)
    attacker = _RAW_CALL + textwrap.dedent(
        f"""
        request = {allreduce_request(np.full(2, 7.0))!r}
        print("ANSWERED" if raw_call({port}, {server.port}, {path!r}, request, True) else "REFUSED")
        """
    )
    out = subprocess.run([sys.executable, "-c", attacker], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # the guarantee: another process gets nothing, and nothing of its goes into this site's part of a sum
    assert out.stdout.strip() == "REFUSED"
    assert len(session.sums) == 1
    assert server.refused == 1


def test_a_connection_is_looked_up_in_the_tcp_table_once_while_it_stays_open(proxy, monkeypatch):
    # reading the kernel's TCP table takes milliseconds: XGBoost's worker makes many calls on one connection
    server, session, address = proxy
    looked_up: list[str] = []
    real = _xgboost_proxy.own_peer_socket

    def counted(peer: str, port: int) -> Any:
        looked_up.append(peer)
        return real(peer, port)

    monkeypatch.setattr(_xgboost_proxy, "own_peer_socket", counted)
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Allreduce")
        for _ in range(3):
            call(allreduce_request(np.ones(2)), timeout=20)
    assert len(session.sums) == 3
    assert len(looked_up) == 1
    assert server.refused == 0
