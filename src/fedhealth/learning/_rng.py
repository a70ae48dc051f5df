"""The one source of randomness for a site's task."""

from __future__ import annotations

import zlib

import numpy as np

from fedhealth.core import ConfigError


def task_rng(seed: int, round: int, site: str) -> np.random.Generator:
    """A generator determined by (study seed, round number, site name) and nothing else.

    Rerunning a study with the same seed hands every site the same stream in every round, so the model
    reproduces bit for bit; distinct sites and rounds get independent streams (``SeedSequence`` mixes the
    three words). The site name enters as its CRC-32, enough to separate the sites of one study.
    """
    if seed < 0 or round < 0:
        raise ConfigError(f"seed and round must be non-negative, got seed={seed}, round={round}")
    return np.random.default_rng(np.random.SeedSequence([seed, round, zlib.crc32(site.encode())]))
