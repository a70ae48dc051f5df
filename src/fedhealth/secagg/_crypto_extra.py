"""Crypto helpers SecAgg+ needs beyond :mod:`fedhealth.crypto`'s recipes, built on the same primitives.

- :func:`apply_masks` expands 32-byte seeds into uint32 masks with AES-256-CTR and adds or subtracts them
  into a vector in place (numpy's uint32 arithmetic wraps mod 2**32): a mask over 1e6 parameters costs one
  4 MB keystream (about 1 ms with AES-NI) and one add, with no allocation per mask.
- :func:`seeded_permutation` turns a public seed into a permutation (Fisher-Yates over the AES-CTR keystream
  with rejection sampling, so it is exactly uniform); every party computes the same one.
- :func:`context_json` and :func:`derive` are :func:`fedhealth.core.canonical_json` and
  :func:`fedhealth.crypto.derive_key` for the contexts this package builds itself (strings, integers and lists
  of strings only), without the recursive finiteness check that cannot fail on them. A 50-site round derives
  a few thousand keys, and that check was a third of its compute. The bytes and keys are identical (tested).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from fedhealth.crypto import KEY_BYTES, keystream

_BLOCK = 16
_ZERO_NONCE = b"\x00" * _BLOCK


CHUNK = 1 << 16  # uint32 entries per step: 256 KiB, so the target chunk stays in cache across all masks


def _aes_ctr(seed: bytes) -> Any:
    if len(seed) != KEY_BYTES:
        raise ValueError("a mask seed is 32 bytes")
    return Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()


def apply_masks(
    target: NDArray[np.uint32],
    add: Sequence[bytes] = (),
    subtract: Sequence[bytes] = (),
    *,
    vectors: Sequence[NDArray[np.uint32]] = (),
) -> None:
    """``target += sum(vectors) + sum(PRG(s) for s in add) - sum(PRG(s) for s in subtract)`` mod 2**32.

    In place. ``PRG(seed)`` is the AES-256-CTR keystream under ``seed`` read as little-endian uint32. Each
    seed must key exactly one stream (a fresh HKDF output per mask), so the all-zero counter block is safe.
    The work runs chunk by chunk with every stream advancing together: each target chunk is read and written
    while it sits in cache, and no buffer larger than a chunk is allocated.
    """
    if target.dtype != np.uint32 or target.ndim != 1 or not target.flags.writeable:
        raise ValueError("masks apply to writeable 1-D uint32 vectors")
    if any(v.dtype != np.uint32 or v.shape != target.shape for v in vectors):
        raise ValueError("vectors to add must be uint32 of the target's shape")
    streams = [(_aes_ctr(s), np.add) for s in add] + [(_aes_ctr(s), np.subtract) for s in subtract]
    if not streams and not vectors:
        return
    n = target.size
    zeros = bytes(4 * min(CHUNK, n))
    scratch = bytearray(4 * min(CHUNK, n) + _BLOCK - 1)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        part = target[start:stop]
        for vector in vectors:
            np.add(part, vector[start:stop], out=part)
        width = stop - start
        block = zeros if 4 * width == len(zeros) else zeros[: 4 * width]
        words = np.frombuffer(scratch, dtype="<u4", count=width)
        for encryptor, op in streams:
            encryptor.update_into(block, scratch)
            op(part, words, out=part)
    for encryptor, _ in streams:
        encryptor.finalize()


def mask_of(seed: bytes, length: int) -> NDArray[np.uint32]:
    """``PRG(seed)`` as a fresh vector (for tests and small vectors)."""
    out = np.zeros(length, dtype=np.uint32)
    apply_masks(out, add=[seed])
    return out


def uniform_noise(seed: bytes, length: int, chunk: int = CHUNK) -> Iterator[NDArray[np.uint32]]:
    """The AES-CTR keystream under ``seed`` as uint32, in chunks of ``chunk`` entries.

    Each chunk is a view of one reused buffer: it is valid until the next one is drawn.
    """
    encryptor = _aes_ctr(seed)
    zeros = bytes(4 * min(chunk, length))
    scratch = bytearray(4 * min(chunk, length) + _BLOCK - 1)
    for start in range(0, length, chunk):
        width = min(length, start + chunk) - start
        encryptor.update_into(zeros if 4 * width == len(zeros) else zeros[: 4 * width], scratch)
        yield np.frombuffer(scratch, dtype="<u4", count=width)


def seeded_permutation(seed: bytes, n: int) -> list[int]:
    """A uniformly random permutation of ``range(n)`` determined by the 32-byte ``seed``."""
    perm = list(range(n))
    # 8 bytes per draw; rejection happens with probability < n / 2**64, so twice the need is plenty
    need = max(n, 1)
    stream = keystream(seed, 16 * need)
    pos = 0
    for i in range(n - 1, 0, -1):
        bound = i + 1
        limit = (1 << 64) - (1 << 64) % bound
        while True:
            if pos + 8 > len(stream):  # astronomically unlikely; extend deterministically
                stream += keystream(seed, len(stream) + 16 * need)[len(stream) :]
            draw = int.from_bytes(stream[pos : pos + 8], "little")
            pos += 8
            if draw < limit:
                break
        j = draw % bound
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def context_json(context: Mapping[str, str | int | list[str]]) -> bytes:
    """Canonical JSON (sorted keys, no whitespace, UTF-8) of strings, ints and lists of strings."""
    return json.dumps(context, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def derive(secret: bytes, context: Mapping[str, str | int | list[str]], *, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 of ``secret`` with ``context_json(context)`` as info: equal to ``crypto.derive_key``."""
    if not context.get("purpose"):
        raise ValueError("a derivation context must name its purpose")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=context_json(context)).derive(
        secret
    )
