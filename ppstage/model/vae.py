"""Toy VAE: latents ``[F, 4, 8, 8]`` <-> uint8 pixels ``[F, 3, 64, 64]`` (spatial x8).

Each latent pixel maps to an 8x8 RGB patch through a fixed linear map and a
``tanh`` squash; pixels are quantised to uint8. Encoding inverts the squash
and applies the pseudo-inverse of the map. The round trip is *lossy* (uint8
quantisation, saturation of the squash, a small 3x3 pixel blur that the
encoder does not undo), which is what makes R0a's decoded anchor differ from
R0's latent anchor. The maps are built on the CPU and moved to ``device``;
encode and decode run there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ppstage.config import ModelConfig
from ppstage.model.seeds import seeded_generator


class ToyVAE:
    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
        g = seeded_generator(cfg.seed, "vae")
        s, c = cfg.vae_scale, cfg.latent_channels
        self.scale, self.channels = s, c
        dec_w = torch.randn(3 * s * s, c, generator=g) * (0.9 / c**0.5)
        dec_b = torch.randn(3 * s * s, generator=g) * 0.2
        enc_w = torch.linalg.pinv(dec_w.double()).float()  # on the CPU: LAPACK, the same bytes everywhere
        blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 12.0, 2.0], [1.0, 2.0, 1.0]])
        blur = (blur / blur.sum()).expand(3, 1, 3, 3).contiguous()
        self.dec_w, self.dec_b, self.enc_w, self.blur = (t.to(device) for t in (dec_w, dec_b, enc_w, blur))

    def decode(self, latents: Tensor) -> Tensor:
        """``[F, C, h, w]`` float32 -> ``[F, 3, h*s, w*s]`` uint8."""
        f, c, h, w = latents.shape
        s = self.scale
        y = torch.tanh(torch.einsum("pc,fchw->fhwp", self.dec_w, latents.float()) + self.dec_b)
        img = y.view(f, h, w, 3, s, s).permute(0, 3, 1, 4, 2, 5).reshape(f, 3, h * s, w * s)
        img = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), self.blur, groups=3)
        return ((img + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def encode(self, pixels: Tensor) -> Tensor:
        """``[F, 3, H, W]`` uint8 -> ``[F, C, H/s, W/s]`` float32."""
        f, _, hh, ww = pixels.shape
        s = self.scale
        h, w = hh // s, ww // s
        y = (pixels.float() / 127.5 - 1.0).clamp(-0.995, 0.995)
        y = y.view(f, 3, h, s, w, s).permute(0, 2, 4, 1, 3, 5).reshape(f, h, w, 3 * s * s)
        z = torch.einsum("cp,fhwp->fchw", self.enc_w, torch.atanh(y) - self.dec_b)
        return z.contiguous()
