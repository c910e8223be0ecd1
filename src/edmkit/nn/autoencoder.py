"""edmkit's own small KL autoencoder (the "KL-f" autoencoders of latent diffusion, Rombach et al. 2022, Sec. 3,
without their perceptual and adversarial losses), so small datasets have a latent space without any download.

Encoder: 3x3 conv, then per level ``num_blocks`` residual blocks and a stride-2 downsampling (all but the last level),
GroupNorm + SiLU, a 3x3 conv to 2 x latent_channels (posterior mean and log-variance). Decoder: the mirror image,
with nearest-neighbour upsampling. The downsampling factor is 2^(levels - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the posterior log-variance (as in latent diffusion's DiagonalGaussianDistribution)


def _norm(channels: int) -> torch.nn.GroupNorm:
    return torch.nn.GroupNorm(min(8, channels), channels, eps=1e-6)


class ResBlock(torch.nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm0, self.conv0 = _norm(in_channels), torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1, self.conv1 = _norm(out_channels), torch.nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = torch.nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(self.conv0(F.silu(self.norm0(x))))))
        return (x if self.skip is None else self.skip(x)) + h


class KLAutoencoder(torch.nn.Module):
    """x [N, C, H, W] in [-1, 1] <-> latents [N, c, H/f, W/f]; ``encode`` returns the posterior (mean, logvar)."""

    def __init__(self, *, channels: int = 1, latent_channels: int = 4, model_channels: int = 32, channel_mult: tuple[int, ...] = (1, 2),
                 num_blocks: int = 1) -> None:
        super().__init__()
        if latent_channels < 1 or model_channels < 1 or num_blocks < 1 or not channel_mult:
            raise ValueError("the autoencoder needs >= 1 latent channel, model channel, block and level")
        widths = [model_channels * m for m in channel_mult]
        self.channels, self.latent_channels, self.factor = channels, latent_channels, 2 ** (len(widths) - 1)
        enc: list[torch.nn.Module] = [torch.nn.Conv2d(channels, widths[0], 3, padding=1)]
        c = widths[0]
        for level, w in enumerate(widths):
            for _ in range(num_blocks):
                enc.append(ResBlock(c, w))
                c = w
            if level < len(widths) - 1:
                enc.append(torch.nn.Conv2d(c, c, 3, stride=2, padding=1))
        enc += [_norm(c), torch.nn.SiLU(), torch.nn.Conv2d(c, 2 * latent_channels, 3, padding=1)]
        self.encoder = torch.nn.Sequential(*enc)
        dec: list[torch.nn.Module] = [torch.nn.Conv2d(latent_channels, c, 3, padding=1)]
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(num_blocks):
                dec.append(ResBlock(c, w))
                c = w
            if level > 0:
                dec += [torch.nn.Upsample(scale_factor=2, mode="nearest"), torch.nn.Conv2d(c, c, 3, padding=1)]
        dec += [_norm(c), torch.nn.SiLU(), torch.nn.Conv2d(c, channels, 3, padding=1)]
        self.decoder = torch.nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [N, C, H, W] in [-1, 1] -> posterior (mean, logvar), each [N, c, H/f, W/f]; H must be divisible by f."""
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the autoencoder's factor {self.factor}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [N, c, h, w] -> images [N, C, h f, w f] (unclamped; [-1, 1] when trained)."""
        return self.decoder(z)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, e^logvar) || N(0, 1)) per element: (mean^2 + e^logvar - 1 - logvar) / 2 (Kingma & Welling 2014, App. B)."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar)
