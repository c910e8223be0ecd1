"""Build a backbone from its configuration: the one place networks are constructed from a ``NetworkConfig``.

The denoiser around a backbone (preconditioning, learned uncertainty) is ``checkpoint.build_denoiser``.
"""

from __future__ import annotations

import torch

from edmkit.config import NetworkConfig
from edmkit.nn.unet import UNet


def build_network(n: NetworkConfig) -> torch.nn.Module:
    """The EDM2 U-Net (config ladder A-G as switches) that ``n`` describes; F(x, c_noise, labels) -> same shape as x."""
    return UNet(resolution=n.resolution, channels=n.channels, label_dim=n.label_dim, model_channels=n.model_channels,
                channel_mult=n.channel_mult, num_blocks=n.num_blocks, attn_resolutions=n.attn_resolutions,
                channels_per_head=n.channels_per_head, dropout=n.dropout, ladder=n.ladder, augment_dim=n.augment_dim,
                cond_channels=n.cond_channels)
