"""``GeneratorStage``: the layers ``[a, b)`` of the generator, their caches and lifecycle.

This is the interface the distributed runtime drives (one instance per
generator rank) and the reference pipeline drives (one instance over all
layers, or a chain of them). Weights, caches and every call run on the
stage's ``device`` (the rank's, ``runtime.device``); inputs must already be
there (the transport delivers them there; the reference pipeline moves them).
Every cache index comes from the stage's own
``CacheLifecycle`` window; nothing here computes an index on the side.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from protocol import ChunkId, digest_bytes

from ppstage.config import PPStageConfig
from ppstage.core.lifecycle import (
    CacheLifecycle,
    CallKind,
    ChunkWindow,
    LifecyclePlan,
    LifecycleState,
)
from ppstage.errors import PPStageError
from ppstage.model.transformer import Block, Head, LayerCache, PatchEmbed, RotaryTable, TimeEmbedding


class StageInputError(PPStageError):
    """A tensor handed to a stage does not fit the call (shape or dtype)."""


def _no_mesh(t: Tensor) -> Tensor:
    return t


def _resolved(device: torch.device | str | None) -> torch.device:
    """``device`` with an index where it has one (``cuda`` -> ``cuda:<current>``), so that
    comparing it with a tensor's device is exact; CPU when None."""
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class GeneratorStage:
    """Layers ``layer_range = [a, b)``, optionally one shard of a tensor-parallel mesh.

    ``reduce`` sums the row-sharded partial outputs over the mesh (the runtime
    passes an all-reduce on the stage's mesh group); identity when ``tp_size == 1``.
    ``device`` (default CPU) holds the weights, the KV and cross-attention caches
    and every tensor a call makes; the weights' bytes do not depend on it (drawn
    on the CPU, then moved), the outputs do (CPU and GPU kernels round differently).
    """

    _MOD_CACHE_SIZE = 16

    def __init__(
        self,
        config: PPStageConfig,
        layer_range: tuple[int, int],
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        reduce: Callable[[Tensor], Tensor] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        m = config.model
        a, b = layer_range
        if not 0 <= a < b <= m.layers:
            raise ValueError(f"layer range {layer_range} outside [0, {m.layers})")
        if tp_size > 1 and reduce is None:
            raise ValueError("a tensor-parallel shard needs a reduce over its mesh")
        self.config = config
        self.device = _resolved(device)
        self.layer_range = (a, b)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.is_first = a == 0
        self.is_last = b == m.layers
        self.lifecycle = CacheLifecycle(config.cache_geometry())
        self._reduce = reduce if reduce is not None else _no_mesh
        dev = self.device
        self._time = TimeEmbedding(m, dev)
        self._rope = RotaryTable(m, dev)
        self.patch_embed = PatchEmbed(m, dev) if self.is_first else None
        self.head = Head(m, dev) if self.is_last else None
        self.blocks = [Block(m, i, tp_rank, tp_size, dev) for i in range(a, b)]
        capacity = self.lifecycle.geometry.capacity
        self.caches = [
            LayerCache(m.heads // tp_size, capacity, m.dim // m.heads, dev) for _ in self.blocks
        ]
        self._conditioning: Tensor | None = None
        self._roll_after_recompute = False
        self._mods: dict[float, tuple[Tensor, list[tuple[Tensor, ...]]]] = {}

    # -- chunk protocol ----------------------------------------------------
    def begin_chunk(self, plan: LifecyclePlan, conditioning: Tensor) -> ChunkWindow:
        """Apply the plan's resets and roll; keep ``conditioning`` for cross-attention."""
        m = self.config.model
        want = (m.text_tokens, m.text_dim)
        if (
            tuple(conditioning.shape) != want
            or conditioning.dtype != torch.float32
            or conditioning.device != self.device
        ):
            raise StageInputError(
                f"conditioning {tuple(conditioning.shape)} {conditioning.dtype} on {conditioning.device}, "
                f"expected {want} float32 on {self.device}",
                chunk=ChunkId.of(plan),
            )
        window = self.lifecycle.begin_chunk(plan)
        # Order matters (ChunkWindow): reset, cross-attn reset, recompute rebuild, roll.
        if window.reset_kv:
            for c in self.caches:
                c.reset_kv()
        if window.reset_crossattn:
            for c in self.caches:
                c.reset_crossattn()
        if window.recompute is not None:
            for c in self.caches:
                c.reset_kv()  # the rebuild writes [0, local_end) into a clean buffer
            self._roll_after_recompute = True
        else:
            self._roll(window)
            self._rebase(window)
        self._conditioning = conditioning.detach().clone()
        return window

    @torch.no_grad()
    def run_call(self, kind: CallKind, timestep: float, x: Tensor) -> Tensor:
        """One generator call through this stage's layers.

        First stage: ``x`` is latents ``[F, C, H, W]`` (denoise) or context frames
        ``[n, C, H, W]`` (recompute); later stages: hidden ``[tokens, dim]``. The last
        stage returns the flow prediction ``[F|n, C, H, W]``, others the hidden.
        """
        self.lifecycle.record_call(kind)  # the call-count contract comes first
        w = self.lifecycle.window
        if kind == "recompute":
            assert w.recompute is not None  # record_call refused an unplanned recompute
            positions: tuple[int, ...] = w.recompute.positions
            write = (0, w.recompute.local_end)
        else:
            start = w.position_start  # rotary position: timeline frame - position_offset
            positions = tuple(range(start, start + self.config.cache.chunk_frames))
            write = (w.write_start, w.write_end)
        h = self._embed(x, len(positions), w)
        rope = self._rope.for_frames(positions)
        temb, mods = self._modulation(timestep)
        bias = None
        lo, hi = w.bias_keys
        if kind == "denoise" and w.attention_bias != 1.0 and lo < hi:
            bias = (lo, hi, math.log(w.attention_bias))
        assert self._conditioning is not None
        for block, cache, mod in zip(self.blocks, self.caches, mods):
            h = block(h, mod, cache, rope, write, bias, self._conditioning, self._reduce)
        if kind == "recompute" and self._roll_after_recompute:
            self._roll(w)
        return self.head(h, temb) if self.head is not None else h

    def end_chunk(self) -> LifecycleState:
        self._roll_after_recompute = False
        return self.lifecycle.end_chunk()

    # -- digests -----------------------------------------------------------
    def state_digest(self) -> str:
        return self.lifecycle.digest()

    def weight_fingerprint(self) -> str:
        parts: list[bytes] = []
        named = [("time", self._time)]
        if self.patch_embed is not None:
            named.append(("patch_embed", self.patch_embed))
        named += [(f"block.{blk.index}", blk) for blk in self.blocks]
        if self.head is not None:
            named.append(("head", self.head))
        for prefix, module in named:
            for name, t in module.named_tensors():
                parts += [f"{prefix}.{name}".encode(), t.contiguous().cpu().numpy().tobytes()]
        return digest_bytes(*parts)

    # -- internals ---------------------------------------------------------
    def _roll(self, w: ChunkWindow) -> None:
        self._roll_after_recompute = False
        if w.roll_tokens:
            end = w.write_start + w.roll_tokens  # local_end before the roll
            for c in self.caches:
                c.roll(w.sink_tokens, w.roll_tokens, end)

    def _rebase(self, w: ChunkWindow) -> None:
        # After the roll, before the first write: the kept keys move to the positions
        # the lifecycle derived (a rebuild chunk writes them there instead).
        if w.rebase_shift:
            rotation = self._rope.shift(-w.rebase_shift)
            lo, hi = w.rebase_keys
            for c in self.caches:
                c.rerotate(lo, hi, rotation)

    def _embed(self, x: Tensor, n_frames: int, w: ChunkWindow) -> Tensor:
        m = self.config.model
        if self.patch_embed is not None:
            want: tuple[int, ...] = (n_frames, m.latent_channels, m.latent_height, m.latent_width)
        else:
            want = (n_frames * m.tokens_per_frame, m.dim)
        if tuple(x.shape) != want or x.dtype != torch.float32 or x.device != self.device:
            raise StageInputError(
                f"stage {self.layer_range} got {tuple(x.shape)} {x.dtype} on {x.device}, "
                f"expected {want} float32 on {self.device}",
                chunk=w.id,
            )
        return self.patch_embed(x) if self.patch_embed is not None else x

    def _modulation(self, timestep: float) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
        key = float(timestep)
        hit = self._mods.get(key)
        if hit is None:
            if len(self._mods) >= self._MOD_CACHE_SIZE:
                self._mods.clear()
            temb = self._time(key)
            hit = self._mods[key] = (temb, [b.modulation(temb) for b in self.blocks])
        return hit
