"""A cryptographically secure random stream: AES-256-CTR under a fresh key from the OS.

Statistical generators (numpy's PCG64DXSM, Mersenne Twister) are fast and well distributed, but whoever sees
enough of their output can predict the rest; noise that is meant to hide a patient must come from a stream
nobody can predict. This one is the AES-256-CTR keystream under a 32-byte key from ``os.urandom`` (the same
construction SecAgg+ uses for its masks), read in order and never rewound.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedhealth.crypto._recipes import KEY_BYTES


class KeystreamReader:
    """Successive bytes of one AES-256-CTR keystream; the key is drawn from ``os.urandom`` and kept only
    in this object (nobody, the caller included, can choose or learn it)."""

    __slots__ = ("_encryptor",)

    def __init__(self) -> None:
        key = os.urandom(KEY_BYTES)
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()

    def read(self, n_bytes: int) -> bytes:
        """The next ``n_bytes`` of the stream."""
        if n_bytes < 0:
            raise ValueError("cannot read a negative number of bytes")
        return self._encryptor.update(bytes(n_bytes))
