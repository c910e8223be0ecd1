"""A noise-aware classifier p(y | x, σ) for classifier guidance and rejection sampling: the network and its preconditioning.

Symbols: x = y_img + σ n a noisy image (EDM σ-space, data in [-1, 1]); y a class in [0, K); c_in, c_noise
the formulation's preconditioning (``edmkit.diffusion.precond.FORMULATIONS``), so the network sees unit-variance input
and the same noise embedding as the denoiser.

Network: the U-Net's encoder (``edmkit.nn.unet.encoder_blocks``, EDM2 config G: magnitude-preserving,
forced weight normalization) conditioned on c_noise through the same Fourier embedding, then global average
pooling, pixel normalization and an MP linear head -> K logits. It sits beside the denoiser's preconditioning
(not in ``nn``) because it applies the formulation's c_in and c_noise itself.

Training is :mod:`edmkit.training.classifier`; files are read by ``checkpoint.load_classifier``; rejection
sampling is :mod:`edmkit.sampling.rejection`.
"""

from __future__ import annotations

import torch

from edmkit.config import ExperimentConfig, ladder_switches
from edmkit.diffusion.precond import FORMULATIONS
from edmkit.nn.mp import MPFourier, mp_silu, normalize
from edmkit.nn.unet import encoder_blocks, learned_layer

CLEAN_SIGMA = 0.002  # "clean" = the smallest σ of the default sampling grid (EDM σ_min)


class NoisyClassifier(torch.nn.Module):
    """Logits of p(y | x, σ): U-Net encoder blocks + global average pool + MP linear head (config G)."""

    def __init__(self, *, resolution: int, channels: int, num_classes: int, model_channels: int = 32,
                 channel_mult: tuple[int, ...] = (1, 2, 2), num_blocks: int = 1, attn_resolutions: tuple[int, ...] = (),
                 channels_per_head: int = 64, emb_mult: int = 4, sigma_data: float = 0.5, formulation: str = "edm") -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        s = ladder_switches("G")
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        self.sigma_data = sigma_data
        self.precond = FORMULATIONS[formulation]
        block_channels = [model_channels * m for m in channel_mult]
        emb_channels = model_channels * emb_mult
        self.emb_fourier = MPFourier(model_channels)
        self.emb_noise = learned_layer(model_channels, emb_channels, switches=s)
        self.enc = encoder_blocks(in_channels=channels + 1, resolution=resolution, block_channels=block_channels,  # + ones channel
                                  num_blocks=num_blocks, emb_channels=emb_channels, attn_resolutions=tuple(attn_resolutions),
                                  switches=s, channels_per_head=channels_per_head)
        self.head = learned_layer(block_channels[-1], num_classes, switches=s)
        self.head_gain = torch.nn.Parameter(torch.ones([]))  # learned logit temperature

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Args: x [N, C, H, W] noisy images (σ-space), sigma [N] or scalar. Returns logits [N, K] float32."""
        if x.shape[1:] != (self.channels, self.resolution, self.resolution):
            raise ValueError(f"classifier takes [N, {self.channels}, {self.resolution}, {self.resolution}] images, got {list(x.shape)}")
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        _, _, c_in, c_noise = self.precond(sigma, sigma_data=self.sigma_data)
        emb = mp_silu(self.emb_noise(self.emb_fourier(c_noise.flatten())))  # [N, E]
        h = torch.cat([c_in * x, torch.ones_like(x[:, :1])], dim=1)  # [N, C+1, H, W]
        for name, block in self.enc.items():
            h = block(h) if name.endswith("_conv") else block(h, emb)
        h = normalize(h.mean(dim=(2, 3)), dim=1)  # global average pool [N, C_last], unit RMS
        return self.head(h, gain=self.head_gain)  # [N, K]


def build_classifier(cfg: ExperimentConfig) -> NoisyClassifier:
    """The classifier a config describes; ``cfg.network.label_dim`` is its class count."""
    n = cfg.network
    return NoisyClassifier(resolution=n.resolution, channels=n.channels, num_classes=n.label_dim, model_channels=n.model_channels,
                           channel_mult=n.channel_mult, num_blocks=n.num_blocks, attn_resolutions=n.attn_resolutions,
                           channels_per_head=n.channels_per_head, sigma_data=n.sigma_data, formulation=n.formulation)
