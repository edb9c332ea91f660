"""Seeds shared by every process: one definition, used everywhere.

``derive_seed`` turns a name tuple into a torch seed, so any process can
rebuild the same weights or noise without shipping them. (The output digest,
``tensor_digest``, lives in ``ppstage.digests``.)
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``repr`` of ``parts``: stable across processes and runs."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def seeded_generator(*parts: object) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(*parts))
    return g


def seeded_randn(shape: tuple[int, ...], *parts: object, std: float = 1.0) -> torch.Tensor:
    """Standard-normal float32 values determined by ``parts`` alone."""
    g = seeded_generator(*parts)
    out = torch.randn(shape, generator=g, dtype=torch.float32)
    return out if std == 1.0 else out * std
