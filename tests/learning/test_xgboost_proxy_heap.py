"""The XGBoost proxy's per-call buffers: a reply array is copied once into the message, and once a proxy
started, glibc keeps freed heap memory for the next call instead of faulting in fresh pages."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedhealth.learning._xgboost_proxy import encode_reply

# In a fresh process (malloc's settings are per process): a thread allocates, touches and frees four 1 MiB
# buffers per round, as a call's request, sum and reply buffers do; page faults counted after two rounds.
_ROUNDS = textwrap.dedent(
    """
    import ctypes, threading
    from fedhealth.core import keep_malloc_heaps

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    def faults():
        return int(open("/proc/thread-self/stat").read().rsplit(")", 1)[1].split()[7])

    def rounds(out):
        for i in range(6):
            if i == 2:
                start = faults()
            buffers = [libc.malloc(1 << 20) for _ in range(4)]
            for b in buffers:
                libc.memset(b, 1, 1 << 20)
            for b in buffers:
                libc.free(b)
        out.append(faults() - start)

    def in_a_thread():
        out = []
        thread = threading.Thread(target=rounds, args=(out,))
        thread.start()
        thread.join()
        return out[0]

    before = in_a_thread()
    tuned = keep_malloc_heaps()
    print(before, tuned, in_a_thread())
    """
)


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc on Linux"
)
def test_after_the_malloc_tuning_large_per_call_buffers_reuse_heap_pages() -> None:
    out = subprocess.run([sys.executable, "-c", _ROUNDS], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, tuned, after = out.stdout.split()
    assert tuned == "True"
    # glibc's defaults give the heap's top back at every free: ~256 fresh pages per MiB and round
    assert int(before) > 2000, "the untuned case no longer faults: the test shows nothing"
    assert int(after) < 50


def test_a_reply_array_is_its_bytes_behind_the_length() -> None:
    values = np.arange(40, dtype="<f8")  # 320 bytes: a two-byte length
    assert encode_reply(values) == b"\x0a\xc0\x02" + values.tobytes()
    assert encode_reply(np.array([7], dtype="<u4")) == b"\x0a\x04\x07\x00\x00\x00"
    assert encode_reply(np.zeros(0, dtype="<f4")) == b"\x0a\x00"
