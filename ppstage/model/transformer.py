"""The embedded causal video generator: small and direct, in the style of gpt-fast.

Wan-style: latent frames ``[F, C, H, W]`` are patch-embedded into
``tokens_per_frame`` tokens each; every block is adaLN-modulated self-attention
(rotary position on the *time* axis: a token's position is its frame index on
the stream timeline) over the KV cache, cross-attention to the conditioning,
and an MLP; the head unpatchifies a flow prediction.

Weights are a pure function of ``(seed, name)``: block ``i`` draws from a
generator seeded by ``(seed, "block", i)``, so a process owning layers
``[a, b)`` builds only those. Tensor parallelism slices the *full* weights
(heads of q/k/v and of the out-projection, a slice of the MLP hidden dim), so
a shard is exactly a slice of the ``tp_size == 1`` weights. Row-sharded
layers (attention out, MLP out) return partial sums; ``reduce`` adds the
partials of the mesh and only then is the bias added, once.

Device: every weight and table is drawn and derived on the CPU (so its bytes
are the same wherever it ends up) and then moved to the ``device`` the module
is built for; caches are allocated there and the forward pass runs there.

Nothing here knows about chunks or plans: ``LayerCache`` takes explicit
indices, which ``GeneratorStage`` reads from ``CacheLifecycle``'s window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ppstage.config import ModelConfig
from ppstage.model.seeds import seeded_generator

Reduce = Callable[[Tensor], Tensor]
Device = torch.device | str


def _on(device: Device, *tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.to(device) for t in tensors)


def _linear_weights(
    g: torch.Generator, out_f: int, in_f: int, gain: float = 1.0
) -> tuple[Tensor, Tensor]:
    w = torch.randn(out_f, in_f, generator=g) * (gain / math.sqrt(in_f))
    b = torch.randn(out_f, generator=g) * 0.02
    return w, b


class LayerCache:
    """KV cache of one layer (only this shard's heads) plus its cross-attention K/V.

    ``k`` is stored *after* rotary, so a cached key never needs its position again.
    """

    def __init__(self, heads: int, capacity: int, head_dim: int, device: Device = "cpu") -> None:
        self.k = torch.zeros(heads, capacity, head_dim, device=device)
        self.v = torch.zeros(heads, capacity, head_dim, device=device)
        self.cross_k: Tensor | None = None
        self.cross_v: Tensor | None = None
        self.cross_is_init = False

    def reset_kv(self) -> None:
        self.k.zero_()
        self.v.zero_()

    def reset_crossattn(self) -> None:
        # Stale, not freed: recomputed from the stored conditioning at the next call.
        self.cross_is_init = False

    def rerotate(self, lo: int, hi: int, rotation: Tensor) -> None:
        """Move the cached keys ``[lo, hi)`` to other positions: multiply by ``rotation`` (re-base).

        Values carry no position, so only ``k`` changes.
        """
        if lo < hi:
            self.k[:, lo:hi] = apply_rotary(self.k[:, lo:hi], rotation)

    def roll(self, sink: int, roll: int, end: int) -> None:
        """Drop ``roll`` tokens after the ``sink`` tokens of ``[0, end)`` (shift left)."""
        if roll <= 0:
            return
        for buf in (self.k, self.v):
            buf[:, sink : end - roll] = buf[:, sink + roll : end].clone()
            buf[:, end - roll : end] = 0.0


class RotaryTable:
    """Rotations ``exp(i * position * freq)`` for frame positions ``[0, rope_max_frames)``.

    Pairs are interleaved (llama / gpt-fast convention): dims ``(2j, 2j+1)`` rotate together.
    Rotations are computed on the CPU and moved to ``device``.
    """

    def __init__(self, cfg: ModelConfig, device: Device = "cpu") -> None:
        hd = cfg.dim // cfg.heads
        freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        angles = torch.arange(cfg.rope_max_frames, dtype=torch.float64)[:, None] * freqs[None, :]
        self.device = torch.device(device)
        self.table = torch.polar(torch.ones_like(angles), angles).to(torch.complex64).to(self.device)
        self.host_freqs = freqs  # stays on the CPU: ``shift`` computes like the table, then moves
        self.tokens_per_frame = cfg.tokens_per_frame
        self.max_frames = cfg.rope_max_frames

    def for_frames(self, frames: Sequence[int]) -> Tensor:
        """Per-token rotations ``[tokens, 1, 1, head_dim/2]``; a frame's tokens share its position."""
        if min(frames) < 0 or max(frames) >= self.max_frames:
            raise ValueError(f"frame positions {tuple(frames)} outside the rotary table")
        idx = torch.tensor(frames, dtype=torch.long).repeat_interleave(self.tokens_per_frame).to(self.device)
        return self.table[idx][:, None, None, :]

    def shift(self, delta: int) -> Tensor:
        """The rotation ``exp(i * delta * freq)`` ``[head_dim/2]`` that moves a rotated key by ``delta``.

        Computed like the table (float64 angles, then complex64); ``delta`` may be
        negative (a re-base moves keys down) and is not bounded by the table.
        """
        angles = float(delta) * self.host_freqs
        return torch.polar(torch.ones_like(angles), angles).to(torch.complex64).to(self.device)


def apply_rotary(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate ``x`` ``[tokens, ..., head_dim]`` by ``rope`` (broadcast over the middle dims)."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rope).flatten(-2)


class TimeEmbedding:
    """Sinusoidal timestep embedding -> MLP. Built on every stage (it is tiny)."""

    def __init__(self, cfg: ModelConfig, device: Device = "cpu") -> None:
        g = seeded_generator(cfg.seed, "time_embed")
        self.half = cfg.dim // 2
        w1, b1 = _linear_weights(g, cfg.dim, 2 * self.half)
        w2, b2 = _linear_weights(g, cfg.dim, cfg.dim)
        freqs = torch.exp(-math.log(10000.0) * torch.arange(self.half, dtype=torch.float64) / self.half)
        self.w1, self.b1, self.w2, self.b2, self.freqs = _on(device, w1, b1, w2, b2, freqs)

    def __call__(self, timestep: float) -> Tensor:
        ang = float(timestep) * self.freqs
        emb = torch.cat((ang.cos(), ang.sin())).float()
        return F.linear(F.silu(F.linear(emb, self.w1, self.b1)), self.w2, self.b2)

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        yield from (("w1", self.w1), ("b1", self.b1), ("w2", self.w2), ("b2", self.b2))


class PatchEmbed:
    """``[F, C, H, W]`` -> ``[F * tokens_per_frame, dim]`` (plus a spatial position embedding)."""

    def __init__(self, cfg: ModelConfig, device: Device = "cpu") -> None:
        g = seeded_generator(cfg.seed, "patch_embed")
        p, c = cfg.patch_size, cfg.latent_channels
        self.cfg = cfg
        w, b = _linear_weights(g, cfg.dim, c * p * p)
        pos = torch.randn(cfg.tokens_per_frame, cfg.dim, generator=g) * 0.5
        self.w, self.b, self.pos = _on(device, w, b, pos)

    def __call__(self, x: Tensor) -> Tensor:
        cfg, p = self.cfg, self.cfg.patch_size
        f, c, h, w = x.shape
        patches = x.reshape(f, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        tokens = F.linear(patches.reshape(f * cfg.tokens_per_frame, c * p * p), self.w, self.b)
        return (tokens.view(f, cfg.tokens_per_frame, cfg.dim) + self.pos).view(-1, cfg.dim)

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        yield from (("w", self.w), ("b", self.b), ("pos", self.pos))


class Head:
    """Final adaLN norm + projection, unpatchified to a flow prediction ``[F, C, H, W]``."""

    def __init__(self, cfg: ModelConfig, device: Device = "cpu") -> None:
        g = seeded_generator(cfg.seed, "head")
        p, c = cfg.patch_size, cfg.latent_channels
        self.cfg = cfg
        mod_w, mod_b = _linear_weights(g, 2 * cfg.dim, cfg.dim, gain=0.5)
        w, b = _linear_weights(g, c * p * p, cfg.dim)
        self.mod_w, self.mod_b, self.w, self.b = _on(device, mod_w, mod_b, w, b)

    def __call__(self, h: Tensor, temb: Tensor) -> Tensor:
        cfg, p = self.cfg, self.cfg.patch_size
        shift, scale = F.linear(F.silu(temb), self.mod_w, self.mod_b).view(2, cfg.dim)
        x = F.layer_norm(h, (cfg.dim,)) * (1 + scale) + shift
        out = F.linear(x, self.w, self.b)
        hp, wp = cfg.latent_height // p, cfg.latent_width // p
        f = h.shape[0] // cfg.tokens_per_frame
        out = out.view(f, hp, wp, cfg.latent_channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(f, cfg.latent_channels, cfg.latent_height, cfg.latent_width)

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        yield from (("mod_w", self.mod_w), ("mod_b", self.mod_b), ("w", self.w), ("b", self.b))


def full_block_weights(cfg: ModelConfig, index: int) -> dict[str, Tensor]:
    """Every weight of block ``index`` at ``tp_size == 1``, in one fixed draw order."""
    g = seeded_generator(cfg.seed, "block", index)
    d, hid = cfg.dim, cfg.dim * cfg.mlp_ratio
    w: dict[str, Tensor] = {}
    w["mod_w"], w["mod_b"] = _linear_weights(g, 6 * d, d, gain=0.5)
    w["qkv_w"], w["qkv_b"] = _linear_weights(g, 3 * d, d, gain=2.0)  # sharp attention: frames matter
    w["out_w"], w["out_b"] = _linear_weights(g, d, d)
    w["xnorm_w"] = 1.0 + 0.1 * torch.randn(d, generator=g)
    w["xnorm_b"] = 0.1 * torch.randn(d, generator=g)
    w["xq_w"], w["xq_b"] = _linear_weights(g, d, d)
    w["xkv_w"], w["xkv_b"] = _linear_weights(g, 2 * d, cfg.text_dim)
    w["xout_w"], w["xout_b"] = _linear_weights(g, d, d)
    w["fc1_w"], w["fc1_b"] = _linear_weights(g, hid, d)
    w["fc2_w"], w["fc2_b"] = _linear_weights(g, d, hid)
    return w


def shard_block_weights(
    w: dict[str, Tensor], cfg: ModelConfig, tp_rank: int, tp_size: int
) -> dict[str, Tensor]:
    """Slice full block weights to shard ``tp_rank`` of ``tp_size`` (heads and MLP hidden)."""
    if tp_size == 1:
        return w
    heads, hd = cfg.heads, cfg.dim // cfg.heads
    hl, hid_l = heads // tp_size, cfg.dim * cfg.mlp_ratio // tp_size
    hs = slice(tp_rank * hl, (tp_rank + 1) * hl)
    ms = slice(tp_rank * hid_l, (tp_rank + 1) * hid_l)
    cols = slice(tp_rank * hl * hd, (tp_rank + 1) * hl * hd)

    def heads_of(t: Tensor, groups: int) -> Tensor:  # column shard of a fused q/k/v projection
        t = t.view(groups, heads, hd, *t.shape[1:])[:, hs]
        return t.reshape(groups * hl * hd, *t.shape[3:]).contiguous()

    s = dict(w)
    s["qkv_w"], s["qkv_b"] = heads_of(w["qkv_w"], 3), heads_of(w["qkv_b"], 3)
    s["out_w"] = w["out_w"][:, cols].contiguous()
    s["xq_w"], s["xq_b"] = heads_of(w["xq_w"], 1), heads_of(w["xq_b"], 1)
    s["xkv_w"], s["xkv_b"] = heads_of(w["xkv_w"], 2), heads_of(w["xkv_b"], 2)
    s["xout_w"] = w["xout_w"][:, cols].contiguous()
    s["fc1_w"], s["fc1_b"] = w["fc1_w"][ms].contiguous(), w["fc1_b"][ms].contiguous()
    s["fc2_w"] = w["fc2_w"][:, ms].contiguous()
    return s


class Block:
    """One transformer block (or its tensor-parallel shard).

    ``w`` holds the weights as generated (and sliced); the forward pass uses
    derived copies laid out for ``addmm`` (transposed, contiguous) with the
    attention scale folded into the query projections. On one CPU core the op
    count is the cost, so the forward pass is written for few, small ops.
    """

    def __init__(
        self, cfg: ModelConfig, index: int, tp_rank: int = 0, tp_size: int = 1, device: Device = "cpu"
    ) -> None:
        if not 0 <= tp_rank < tp_size or cfg.heads % tp_size or (cfg.dim * cfg.mlp_ratio) % tp_size:
            raise ValueError(f"cannot shard {cfg.heads} heads as rank {tp_rank} of {tp_size}")
        self.index = index
        self.tp_size = tp_size
        self.dim = cfg.dim
        self.head_dim = cfg.dim // cfg.heads
        self.local_heads = cfg.heads // tp_size
        w = shard_block_weights(full_block_weights(cfg, index), cfg, tp_rank, tp_size)

        scale = 1.0 / math.sqrt(self.head_dim)
        dl = self.local_heads * self.head_dim
        q_scale = torch.ones(3 * dl)
        q_scale[:dl] = scale

        def t(name: str) -> Tensor:
            return w[name].t().contiguous()

        self._qkv = (w["qkv_b"] * q_scale, (w["qkv_w"] * q_scale[:, None]).t().contiguous())
        self._out = (w["out_b"], t("out_w"))
        self._xq = (w["xq_b"] * scale, (w["xq_w"] * scale).t().contiguous())
        self._xkv = (w["xkv_b"], t("xkv_w"))
        self._xout = (w["xout_b"], t("xout_w"))
        self._fc1 = (w["fc1_b"], t("fc1_w"))
        self._fc2 = (w["fc2_b"], t("fc2_w"))
        # Derived on the CPU above (same bytes on every device), then moved.
        self.w = {name: v.to(device) for name, v in w.items()}
        for attr in ("_qkv", "_out", "_xq", "_xkv", "_xout", "_fc1", "_fc2"):
            setattr(self, attr, _on(device, *getattr(self, attr)))

    def modulation(self, temb: Tensor) -> tuple[Tensor, ...]:
        """shift, 1 + scale, gate for attention, then for the MLP (each ``[dim]``)."""
        mod = F.linear(F.silu(temb), self.w["mod_w"], self.w["mod_b"]).view(6, self.dim).clone()
        mod[1] += 1.0
        mod[4] += 1.0
        return tuple(mod.unbind(0))

    def _row_linear(self, x: Tensor, bw: tuple[Tensor, Tensor], reduce: Reduce) -> Tensor:
        """A row-sharded projection: partial sums reduced over the mesh, bias added once after."""
        if self.tp_size == 1:
            return torch.addmm(bw[0], x, bw[1])
        return reduce(torch.mm(x, bw[1])) + bw[0]

    def __call__(
        self,
        h: Tensor,
        mod: tuple[Tensor, ...],
        cache: LayerCache,
        rope: Tensor,
        write: tuple[int, int],
        bias: tuple[int, int, float] | None,
        conditioning: Tensor,
        reduce: Reduce,
    ) -> Tensor:
        """Write this call's K/V at ``cache[write[0]:write[1]]`` and attend to ``cache[:write[1]]``.

        ``bias = (lo, hi, log_bias)`` is added to the scores of keys ``[lo, hi)``.
        """
        d, T = self.dim, h.shape[0]
        hl, hd = self.local_heads, self.head_dim
        shift1, scale1, gate1, shift2, scale2, gate2 = mod
        start, end = write

        # Self-attention over the cache; K is cached after rotary.
        x = torch.addcmul(shift1, torch.layer_norm(h, (d,)), scale1)
        qkv = torch.addmm(self._qkv[0], x, self._qkv[1]).view(T, 3, hl, hd)
        qk = apply_rotary(qkv[:, :2], rope).transpose(0, 2)  # [hl, 2, T, hd]
        cache.k[:, start:end] = qk[:, 1]
        cache.v[:, start:end] = qkv[:, 2].transpose(0, 1)
        scores = torch.bmm(qk[:, 0], cache.k[:, :end].transpose(1, 2))
        if bias is not None:
            lo, hi, log_bias = bias
            scores[:, :, lo:hi] += log_bias
        attn = torch.bmm(scores.softmax(dim=-1), cache.v[:, :end])
        o = self._row_linear(attn.transpose(0, 1).reshape(T, hl * hd), self._out, reduce)
        h = torch.addcmul(h, gate1, o)

        # Cross-attention to the conditioning; K/V cached until the next reset.
        if not cache.cross_is_init:
            ck, cv = torch.addmm(self._xkv[0], conditioning, self._xkv[1]).chunk(2, dim=-1)
            cache.cross_k = ck.reshape(-1, hl, hd).permute(1, 2, 0).contiguous()  # [hl, hd, tokens]
            cache.cross_v = cv.reshape(-1, hl, hd).transpose(0, 1).contiguous()  # [hl, tokens, hd]
            cache.cross_is_init = True
        x = torch.layer_norm(h, (d,), self.w["xnorm_w"], self.w["xnorm_b"])
        q = torch.addmm(self._xq[0], x, self._xq[1]).view(T, hl, hd).transpose(0, 1)
        attn = torch.bmm(torch.bmm(q, cache.cross_k).softmax(dim=-1), cache.cross_v)
        h = h + self._row_linear(attn.transpose(0, 1).reshape(T, hl * hd), self._xout, reduce)

        # MLP (SiLU: a third of GELU-tanh's cost on one CPU core).
        x = torch.addcmul(shift2, torch.layer_norm(h, (d,)), scale2)
        o = self._row_linear(F.silu(torch.addmm(self._fc1[0], x, self._fc1[1])), self._fc2, reduce)
        return torch.addcmul(h, gate2, o)

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        yield from sorted(self.w.items())
