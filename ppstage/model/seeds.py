"""Seeds shared by every process: one definition, used everywhere.

``derive_seed`` turns a name tuple into a torch seed, so any process can
rebuild the same weights or noise without shipping them. (The output digest,
``tensor_digest``, lives in ``ppstage.digests``.)

Every draw happens on the CPU with a CPU generator and is only then moved to
the device asked for: CUDA's generator produces other values for the same
seed, and the reference pipeline, rank 0 and the last stage must draw the same
bytes wherever they run.
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


def seeded_randn(
    shape: tuple[int, ...], *parts: object, std: float = 1.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Standard-normal float32 values determined by ``parts`` alone, on ``device`` (default CPU).

    Drawn (and scaled by ``std``) on the CPU, then moved: the bytes do not depend on ``device``.
    """
    g = seeded_generator(*parts)
    out = torch.randn(shape, generator=g, dtype=torch.float32)
    out = out if std == 1.0 else out * std
    return out if device is None else out.to(device)
