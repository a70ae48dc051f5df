"""What a collective recipe's site program sees of its session: secure sum, broadcast, barrier.

Placeholder with exactly the protocol of the collective contract (notes/collective-api.md), created by the
"recipes" change so that :class:`fedhealth.learning.CollectiveRecipe` can name it; the "collective" change
owns this module and adds the in-memory implementation beside it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Collectives(Protocol):
    @property
    def site(self) -> str: ...  # this site
    @property
    def sites(self) -> tuple[str, ...]: ...  # the session's participants, sorted; sites[0] is the leader
    def secure_sum(self, values: np.ndarray) -> np.ndarray: ...
    # float64 (any shape) -> float64 sum over every participant, same shape. Fixed point 2^-40 in the
    # 2^64 ring: the result equals sum(round(x * 2^40)) / 2^40 exactly; |partial sums| < 2^23.
    def broadcast(self, data: bytes | None) -> bytes: ...  # the leader passes bytes, the others None
    def barrier(self) -> None: ...
