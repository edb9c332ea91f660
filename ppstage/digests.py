"""Tensor digests: the one definition, shared by the model and the transport.

``tensor_digest`` is the output digest of SPEC section 9 (``latents_out``):
the reference pipeline, the distributed last stage, rank 0's gate, the
transport's spec digests and the replayer all call this one function, so a
digest means the same bytes everywhere. A leaf module (torch and
``protocol.digest_bytes`` only) so that neither the model nor the transport
has to import the other for it.
"""

from __future__ import annotations

import torch

from protocol import digest_bytes

__all__ = ["byte_view", "tensor_digest"]


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor (0-d and empty tensors included).

    Parameters
    ----------
    tensor : torch.Tensor
        Any dtype, any shape, contiguous, on any device.

    Returns
    -------
    torch.Tensor
        ``uint8``, shape ``(tensor.numel() * tensor.element_size(),)``, sharing storage.
    """
    return tensor.reshape(-1).view(torch.uint8)


def tensor_digest(tensor: torch.Tensor) -> str:
    """``protocol.digest_bytes`` (blake2b-128, hex) of a contiguous tensor's bytes.

    Parameters
    ----------
    tensor : torch.Tensor
        Any wire dtype and shape, contiguous; a device tensor is copied to the CPU first.

    Returns
    -------
    str
        32 hex characters. Equal digests mean bitwise-equal bytes (dtype and
        shape are not part of the digest: compare them separately).
    """
    flat = byte_view(tensor)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return digest_bytes(memoryview(flat.numpy()))
