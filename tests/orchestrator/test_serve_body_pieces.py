"""The orchestrator's HTTP protocol keeps a request body's pieces as the parser gave them (``_serve``): the
app still gets every byte in order, whether it reads each piece at once or they pile up unread, and a body
past uvicorn's high-water mark still pauses reading until the app takes it."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from fedhealth.orchestrator._serve import _CoalescingProtocol


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.paused = 0
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8443), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: Any) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        pass


def _exchange(piece: int, *, read_between: bool) -> tuple[list[bytes], _Transport]:
    body = bytes(range(256)) * 1024  # 256 KiB, past uvicorn's 64 KiB high-water mark
    request = b"POST /c HTTP/1.1\r\nhost: o\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    seen: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        got = bytearray()
        while True:
            message = await receive()
            got += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(bytes(got))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> _Transport:
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        config.load()
        protocol = _CoalescingProtocol(config=config, server_state=ServerState(), app_state={})
        transport = _Transport()
        protocol.connection_made(transport)
        for start in range(0, len(request), piece):
            protocol.data_received(request[start : start + piece])
            if read_between:
                await asyncio.sleep(0)
        for _ in range(50):
            await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport

    transport = asyncio.run(main())
    assert seen == [body]
    return seen, transport


def test_a_body_read_piece_by_piece_arrives_whole_and_in_order() -> None:
    _, transport = _exchange(16 << 10, read_between=True)
    assert transport.written.startswith(b"HTTP/1.1 200 OK")
    assert transport.written.endswith(b"ok")


def test_pieces_that_pile_up_unread_are_joined_and_pause_reading() -> None:
    _, transport = _exchange(9000, read_between=False)
    assert transport.paused  # more than the high-water mark waited for the app
    assert transport.written.endswith(b"ok")
