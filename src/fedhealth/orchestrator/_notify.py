"""Wake-ups for long-polling agents: a waiter per poll, woken the moment a task for its site is created."""

from __future__ import annotations

import asyncio
from collections import defaultdict


class TaskNotifier:
    """Runs on the event loop. ``waiter(site)`` must be taken *before* checking the database for work, so a
    task created between the check and the wait still wakes the poll."""

    def __init__(self) -> None:
        self._waiters: defaultdict[str, set[asyncio.Future[None]]] = defaultdict(set)
        self.shutting_down = False

    def waiter(self, site: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[site].add(future)
        future.add_done_callback(lambda f: self._waiters[site].discard(f))
        return future

    def notify(self, sites: list[str] | set[str] | tuple[str, ...]) -> None:
        for site in sites:
            for future in list(self._waiters.get(site, ())):
                if not future.done():
                    future.set_result(None)

    def shutdown(self) -> None:
        """Answer every waiting poll now (with no task), so a stopping server is not held up by long polls."""
        self.shutting_down = True
        self.notify(list(self._waiters))

    def waiting_sites(self) -> set[str]:
        return {site for site, futures in self._waiters.items() if futures}
