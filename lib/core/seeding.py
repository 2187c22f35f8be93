"""Seeds: the one stable string -> seed helper, and seeding of the global generators.

Every random draw that must not depend on process, order or platform is seeded from the text of
what it is about (a case id, a round, a source and index) through :func:`stable_seed`. Python's
``hash()`` is salted per process, so it is never used for that.

``stable_seed`` hashes ``sep.join(parts)`` with SHA-256 and reads ``nbytes`` of the digest as an
integer. The separator, width and byte order are parameters because data generated before this
helper existed used several spellings of the same idea; each call site keeps its own, so seeded
data and results stay identical to every digit. ``digest="crc32"`` (zlib's CRC-32 of the text)
serves the foreground-sampling seeds of planning and the preprocessing cache.
"""

from __future__ import annotations

import hashlib
import random
import zlib

import numpy as np


def stable_seed(*parts: object, sep: str = "/", nbytes: int = 4, byteorder: str = "big",
                digest: str = "sha256") -> int:
    """A non-negative seed that depends only on the text of ``parts``.

    Args:
        parts: values joined as ``sep.join(str(p) for p in parts)``.
        sep: separator between the parts.
        nbytes: digest bytes read (4: a 32-bit seed).
        byteorder: ``"big"`` (the hex prefix of the digest) or ``"little"``.
        digest: ``"sha256"`` or ``"crc32"`` (32 bits; ``nbytes`` and ``byteorder`` unused).

    Example:
        ``stable_seed(0, "split", "COLONOG", nbytes=6)`` is the same on every machine and run.
    """
    text = sep.join(str(p) for p in parts).encode()
    if digest == "crc32":
        return zlib.crc32(text)
    if digest != "sha256":
        raise ValueError(f"digest must be 'sha256' or 'crc32', got {digest!r}")
    return int.from_bytes(hashlib.sha256(text).digest()[:nbytes], byteorder)


def stable_rng(*parts: object, **kwargs) -> np.random.Generator:
    """``numpy.random.default_rng(stable_seed(*parts, **kwargs))``."""
    return np.random.default_rng(stable_seed(*parts, **kwargs))


def seed_everything(seed: int) -> None:
    """Seed Python's and NumPy's global generators (torch: :func:`lib.ml.device.seed_torch`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
