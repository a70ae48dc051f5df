"""The answer deadline of fedhealth.transport (docs/security.md, "Clients and transport") attacked from the
parts of a request the earlier tests did not pace: a server that takes the request's body slowly, a deadline
set in one thread and not in another, a keep-alive connection reused after a request with a deadline."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from fedhealth.transport import DeadlineTransport, answer_deadline


@contextmanager
def slow_reader(*, every_s: float, piece: int, for_s: float) -> Iterator[int]:
    """A server that reads what it is sent a little at a time (``piece`` bytes every ``every_s``), answering
    nothing, for ``for_s`` seconds; yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    ended = threading.Event()

    def run() -> None:
        listener.settimeout(5)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            until = time.monotonic() + for_s
            while time.monotonic() < until and not ended.is_set():
                try:
                    if not conn.recv(piece):
                        return
                except OSError:
                    return
                ended.wait(every_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        ended.set()
        listener.close()
        thread.join(timeout=10)


def test_a_request_body_the_server_takes_slowly_is_abandoned_at_the_answers_deadline():
    """Each send of a plain socket returns as soon as a little of the body is taken: a timeout set once for
    the whole write let a server that drains a few KiB now and then hold an upload for as long as it liked."""
    body = b"x" * (48 << 20)  # about 8 s at the pace below
    with (
        slow_reader(every_s=0.01, piece=64 << 10, for_s=20) as port,
        httpx.Client(transport=DeadlineTransport(verify=False), timeout=30) as client,
    ):
        started = time.monotonic()
        with answer_deadline(started + 1.5), pytest.raises(httpx.TimeoutException):
            client.post(f"http://127.0.0.1:{port}/upload", content=body)
        assert time.monotonic() - started < 4.0


@contextmanager
def quick_server() -> Iterator[int]:
    """An HTTP/1.1 server answering every GET with a short 200, keeping connections alive."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_deadline_belongs_to_its_thread_and_request_not_to_the_pooled_connection():
    """The deadline is the calling thread's (a ContextVar): another thread of the same client, with none, is
    not refused by a deadline that passed here, and a kept-alive connection reused after the block carries
    no deadline of the request that opened it."""
    with (
        quick_server() as port,
        httpx.Client(transport=DeadlineTransport(verify=False), timeout=10) as client,
    ):
        url = f"http://127.0.0.1:{port}/"
        assert client.get(url).status_code == 200  # a pooled connection, opened without a deadline
        outcome: list[object] = []
        with answer_deadline(time.monotonic() - 1):  # passed already, in this thread
            with pytest.raises(httpx.TimeoutException):
                client.get(url)

            def other() -> None:
                outcome.append(client.get(url).status_code)

            thread = threading.Thread(target=other)
            thread.start()
            thread.join(timeout=10)
        assert outcome == [200]
        with answer_deadline(time.monotonic() + 5):
            assert client.get(url).status_code == 200
        assert client.get(url).status_code == 200  # after the block: no deadline left behind
