"""Test content generation."""

from __future__ import annotations

import os


def make_file(directory: str, name: str, size: int, seed: int = 1) -> str:
    """Write C{size} deterministic pseudo-random bytes (fast, incompressible)."""
    import random

    rnd = random.Random(seed)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rnd.randbytes(n))
            left -= n
    return path
