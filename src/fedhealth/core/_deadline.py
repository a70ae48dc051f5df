"""A deadline for the work the current thread does, checked where that work can stop.

A site trains a round's update inside the round's deadline: past it, the orchestrator has closed the round
and takes no update, so training on would only hold the site (and its next task) for nothing. The agent
runs a task's training under :func:`work_deadline`; training loops call :func:`check_deadline` at each step
(the built-in recipes do, and a recipe plug-in may), which raises :class:`DeadlinePassedError` once the
deadline has passed. With no deadline set (tests, the in-memory runtime, a notebook) it does nothing.

The deadline lives in a context variable: it holds for the thread (or task) that set it, not for threads
that thread starts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from fedhealth.core._errors import FedHealthError

_DEADLINE: ContextVar[float | None] = ContextVar("fedhealth_work_deadline", default=None)


class DeadlinePassedError(FedHealthError):
    """The work ran past the deadline it was given."""


@contextmanager
def work_deadline(seconds: float) -> Iterator[None]:
    """Within the block, :func:`check_deadline` raises once ``seconds`` from now have passed (at once if
    ``seconds`` is not positive). An enclosing deadline that ends sooner still holds."""
    at = time.monotonic() + seconds
    outer = _DEADLINE.get()
    token = _DEADLINE.set(at if outer is None else min(at, outer))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check_deadline() -> None:
    """Raise :class:`DeadlinePassedError` if the current deadline (if any) has passed."""
    at = _DEADLINE.get()
    if at is not None and time.monotonic() > at:
        raise DeadlinePassedError("the work ran past its deadline")
