"""What a site keeps between its training rounds of a study for the study's recipe (SCAFFOLD's client control
variate c_i): tensors that never leave the site.

They live in the site home, one folder per study (named by a hash of the study id), one safetensors file
per round (0600, written whole then renamed). A round reads the state of the latest earlier round, and the
previous round's file is kept until the next one is written, so a task rerun after a crash (the state of
its round already written, its upload not yet done) starts from the same state and sends the same update.
Without a home (tests, the in-process federation) the state is kept in memory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from fedhealth.core import (
    PRIVATE_FILE_MODE,
    decode_tensors,
    encode_tensors,
    make_private_dir,
    sha256_hex,
    sync_folder,
)

Params = dict[str, np.ndarray]
_FILE = re.compile(r"^round-(\d{1,9})\.safetensors\Z")


class SiteStateStore:
    """Per-study recipe state at one site: ``load`` before training round r, ``save`` after it."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._memory: dict[str, dict[int, Params]] = {}

    def _folder(self, study_id: str) -> Path:
        assert self.root is not None
        return self.root / sha256_hex(study_id.encode())[:32]

    def _rounds(self, study_id: str) -> dict[int, Path]:
        folder = self._folder(study_id)
        if not folder.is_dir():
            return {}
        found = {}
        for path in folder.iterdir():
            match = _FILE.match(path.name)
            if match:
                found[int(match.group(1))] = path
        return found

    def load(self, study_id: str, round_number: int) -> Params | None:
        """The state the site's latest training round before ``round_number`` left; None if none did."""
        if self.root is None:
            kept = {r: s for r, s in self._memory.get(study_id, {}).items() if r < round_number}
            return dict(kept[max(kept)]) if kept else None
        earlier = {r: p for r, p in self._rounds(study_id).items() if r < round_number}
        if not earlier:
            return None
        tensors, _ = decode_tensors(earlier[max(earlier)].read_bytes())
        return tensors

    def save(self, study_id: str, round_number: int, state: Params) -> None:
        """Keep ``state`` as what round ``round_number`` left; drop the states of rounds before the one before
        it."""
        if self.root is None:
            rounds = self._memory.setdefault(study_id, {})
            rounds[round_number] = dict(state)
            for r in [r for r in rounds if r < round_number - 1]:
                del rounds[r]
            return
        folder = self._folder(study_id)
        make_private_dir(folder)
        target = folder / f"round-{round_number}.safetensors"
        partial = folder / f".round-{round_number}.partial"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(encode_tensors(state))
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, target)
        sync_folder(folder)  # the new round's name, durable before the older rounds' files go
        for r, path in self._rounds(study_id).items():
            if r < round_number - 1:
                path.unlink(missing_ok=True)
