"""A tiny model backend for ppstage, out of tree (docs/models.md walks through it).

Generator: per layer, every token is written into the layer's cache (indices
from ``CacheLifecycle``'s window, never computed here), then updated from the
mean of the cached tokens it may attend to, the prompt and the timestep. No
attention, no tensor parallelism: small enough to read in one sitting, yet a
lifecycle mistake still changes the output. Rank 0: a hashed text encoder and
a nearest-neighbour "VAE".

``backend()`` is the factory both discovery routes name:
``[model] backend = "tiny"`` (entry point, see pyproject.toml) or
``[model] backend = "tiny_backend:backend"`` (module on ``PYTHONPATH``).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from ppstage.config import PPStageConfig
from ppstage.core.lifecycle import CacheGeometry, CacheLifecycle, ChunkWindow, LifecyclePlan, LifecycleState
from ppstage.model.loader import ModelBackend


def backend() -> ModelBackend:
    return ModelBackend(generator=TinyGenerator, stage0=TinyStage0)


def _randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g) / math.sqrt(shape[0])


class TinyGenerator:
    """Layers ``[a, b)`` of the tiny generator (a ``GeneratorBackend``)."""

    def __init__(self, config: PPStageConfig, layer_range: tuple[int, int], *, tp_rank: int = 0,
                 tp_size: int = 1, reduce=None) -> None:
        if tp_size != 1:
            raise ValueError("the tiny backend has no tensor-parallel shards (use tp = 1)")
        m, c = config.model, config.cache
        a, b = layer_range
        self.config = config
        self.is_first, self.is_last = a == 0, b == m.layers
        self.lifecycle = CacheLifecycle(CacheGeometry(
            window_frames=c.window_frames, sink_frames=c.sink_frames,
            tokens_per_frame=m.tokens_per_frame, chunk_frames=c.chunk_frames,
        ))
        # Every rank draws every weight in one order and keeps its own: a shard is
        # exactly part of the whole model, so any split gives the same bytes.
        g = torch.Generator().manual_seed(7919 + m.seed)
        patch = m.latent_channels * m.patch_size ** 2
        self.embed = _randn(g, patch, m.dim)
        self.head = _randn(g, m.dim, patch)
        self.cond = _randn(g, m.text_dim, m.dim)
        layers = [(_randn(g, m.dim, m.dim), _randn(g, m.dim, m.dim)) for _ in range(m.layers)]
        self.layers = layers[a:b]
        self.caches = [torch.zeros(self.lifecycle.geometry.capacity, m.dim) for _ in self.layers]
        self.freqs = torch.arange(1, m.dim + 1, dtype=torch.float32)
        self._cond: Tensor | None = None
        self._roll_after_recompute = False

    def begin_chunk(self, plan: LifecyclePlan, conditioning: Tensor) -> ChunkWindow:
        window = self.lifecycle.begin_chunk(plan)
        if window.reset_kv or window.recompute is not None:
            for cache in self.caches:
                cache.zero_()
        if window.recompute is not None:
            self._roll_after_recompute = True  # the rebuild comes first, then the roll
        else:
            self._roll(window)
        self._cond = conditioning.mean(0) @ self.cond
        return window

    @torch.no_grad()
    def run_call(self, kind, timestep: float, x: Tensor) -> Tensor:
        self.lifecycle.record_call(kind)
        w = self.lifecycle.window
        lo, hi = (0, w.recompute.local_end) if kind == "recompute" else (w.write_start, w.write_end)
        h = self._patchify(x) @ self.embed if self.is_first else x
        t = torch.sin(self.freqs * (float(timestep) / 1000.0))
        for (w1, w2), cache in zip(self.layers, self.caches):
            cache[lo:hi] = h
            context = cache[:hi].mean(0)
            h = h + 0.5 * torch.tanh(h @ w1 + context @ w2 + self._cond + t)
        if kind == "recompute" and self._roll_after_recompute:
            self._roll(w)
        return self._unpatchify(h @ self.head, x) if self.is_last else h

    def end_chunk(self) -> LifecycleState:
        self._roll_after_recompute = False
        return self.lifecycle.end_chunk()

    def state_digest(self) -> str:
        return self.lifecycle.digest()

    def weight_fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for t in (self.embed, self.head, self.cond, *(w for pair in self.layers for w in pair)):
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def _roll(self, w: ChunkWindow) -> None:
        self._roll_after_recompute = False
        if w.roll_tokens:
            sink, roll, end = w.sink_tokens, w.roll_tokens, w.write_start + w.roll_tokens
            for cache in self.caches:
                cache[sink:end - roll] = cache[sink + roll:end].clone()
                cache[end - roll:end] = 0.0

    def _patchify(self, x: Tensor) -> Tensor:  # [F, C, H, W] -> [F * tokens, C * p * p]
        p = self.config.model.patch_size
        f, c, hh, ww = x.shape
        x = x.reshape(f, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(f * (hh // p) * (ww // p), c * p * p)

    def _unpatchify(self, y: Tensor, like: Tensor) -> Tensor:
        m = self.config.model
        p, hp, wp = m.patch_size, m.latent_height // m.patch_size, m.latent_width // m.patch_size
        f = y.shape[0] // (hp * wp)
        y = y.reshape(f, hp, wp, m.latent_channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return y.reshape(f, m.latent_channels, m.latent_height, m.latent_width).contiguous()


class TinyStage0:
    """Rank 0's models (a ``Stage0Backend``): hashed words -> conditioning; nearest-neighbour pixels."""

    def __init__(self, config: PPStageConfig) -> None:
        self.m = config.model

    def encode_text(self, prompt: str) -> Tensor:
        seed = int.from_bytes(hashlib.blake2b(prompt.lower().encode(), digest_size=8).digest(), "little")
        g = torch.Generator().manual_seed(seed % 2**63)
        return torch.randn(self.m.text_tokens, self.m.text_dim, generator=g)

    def vae_decode(self, latents: Tensor) -> Tensor:  # [F, C, h, w] -> [F, 3, h*s, w*s] uint8
        rgb = torch.tanh(latents[:, :3]).repeat_interleave(self.m.vae_scale, 2).repeat_interleave(self.m.vae_scale, 3)
        return ((rgb + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def vae_encode(self, pixels: Tensor) -> Tensor:  # [F, 3, H, W] uint8 -> [F, C, h, w]
        s = self.m.vae_scale
        rgb = torch.nn.functional.avg_pool2d(pixels.float() / 127.5 - 1, s).clamp(-0.999, 0.999)
        rest = torch.zeros(rgb.shape[0], self.m.latent_channels - 3, *rgb.shape[2:])
        return torch.cat([torch.atanh(rgb), rest], dim=1)
