"""Toy text encoder: a prompt -> a deterministic embedding ``[text_tokens, text_dim]``.

Words are lower-cased, each hashed to its own seed (so prompts that share
words share token embeddings), truncated or padded to ``text_tokens``, plus
a fixed position embedding and a little mixing so word order matters.
Embeddings are drawn on the CPU and moved to ``device``: the same seeds give
the same draws on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppstage.config import ModelConfig
from ppstage.model.seeds import seeded_randn

PAD = "<pad>"


class ToyTextEncoder:
    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.pos = seeded_randn((cfg.text_tokens, cfg.text_dim), cfg.seed, "text_pos", std=0.3, device=device)
        d = cfg.text_dim
        self.mix = seeded_randn((d, d), cfg.seed, "text_mix", std=0.3 / d**0.5, device=device)
        self._memo: dict[str, Tensor] = {}

    def encode(self, prompt: str) -> Tensor:
        hit = self._memo.get(prompt)
        if hit is None:
            n = self.cfg.text_tokens
            words = (prompt.lower().split() + [PAD] * n)[:n]
            tok = torch.stack(
                [seeded_randn((self.cfg.text_dim,), self.cfg.seed, "text_token", w) for w in words]
            ).to(self.device)
            x = tok + self.pos
            hit = x + torch.tanh(x @ self.mix).cumsum(0) / n
            if len(self._memo) > 64:
                self._memo.clear()
            self._memo[prompt] = hit
        return hit.clone()
