"""The orchestrator's connections send a response's head and a small body in one write (one TLS record,
one send), keep the order of every write, and flush before closing."""

from __future__ import annotations

import asyncio

from fedhealth.orchestrator._serve import _CoalescedWrites


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_writes_of_one_turn_go_out_as_one_in_order_and_large_ones_are_not_joined():
    async def main() -> None:
        raw = _Transport()
        transport = _CoalescedWrites(raw)  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"small body")
        assert raw.writes == []  # not yet: at the end of this turn
        await asyncio.sleep(0)
        assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nsmall body"]
        big = b"x" * (_CoalescedWrites.JOIN_LIMIT + 1)
        transport.write(b"head")
        transport.write(big)  # the head first, then the large body as it is
        assert raw.writes[1:] == [b"head", big]
        transport.write(b"last")
        transport.close()  # flushes before closing
        assert raw.writes[-1] == b"last"
        assert raw.closed
        assert transport.get_extra_info("peername") == "info:peername"

    asyncio.run(main())
