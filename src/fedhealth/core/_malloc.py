"""glibc's malloc tuned for processes that move multi-megabyte buffers at every collective call.

glibc's malloc, left to itself, gives the top of a thread's heap back to the system whenever more than twice
its (dynamic) mmap threshold is free there, and serves blocks above that threshold with fresh mappings. The
buffers of a collective call (a request body, a secure sum's parts, a reply: each the size of a histogram,
0.1-1 MB) then come back as fresh zeroed pages at every call: about 200 page faults per 0.75 MB call, ~0.5 ms
of CPU, in the XGBoost proxy, the agent's collective channel and the orchestrator's relay alike. Keeping
16 MiB at the top of each heap (and the mmap threshold at glibc's own dynamic ceiling, 32 MiB, since setting
one freezes the other) ends that; the freed memory a process keeps grows by at most 16 MiB per malloc arena.
"""

from __future__ import annotations

import ctypes
import platform

_M_TOP_PAD, _M_MMAP_THRESHOLD = -2, -3
_malloc_tuned = False


def keep_malloc_heaps() -> bool:
    """Tune glibc's malloc for large per-call buffers (once per process; elsewhere a no-op). True if the
    settings are in force."""
    global _malloc_tuned
    if not _malloc_tuned and platform.libc_ver()[0] == "glibc":
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            return False
        _malloc_tuned = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TOP_PAD, 16 << 20))
    return _malloc_tuned
