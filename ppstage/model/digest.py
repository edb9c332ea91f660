"""Digests and seeds shared by every process: one definition, used everywhere.

``tensor_digest`` is the output digest of SPEC section 9 (``latents_out``):
the reference pipeline, the distributed last stage, rank 0's gate and the
replayer all call this one function, so a digest means the same bytes
everywhere. ``derive_seed`` turns a name tuple into a torch seed, so any
process can rebuild the same weights or noise without shipping them.
"""

from __future__ import annotations

import hashlib

import torch

# One definition of the output digest for everyone (it lives with the wire
# helpers because it must read device tensors too); re-exported here.
from ppstage.distributed.transport._tensors import tensor_digest  # noqa: F401


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
