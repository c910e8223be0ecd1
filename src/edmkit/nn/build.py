"""Build a backbone from its configuration: the one registry of networks (``NETWORKS``, chosen by ``network.arch``).

Every backbone follows one contract, so preconditioning, the uncertainty head, losses, samplers, guidance,
restoration, post-hoc EMA, DDP and checkpoints work unchanged for all of them:

    F(x, c_noise, labels=None, augment_labels=None, cond=None, context=None) -> tensor shaped like x

x [N, C, H, W] the preconditioned input, c_noise [N] the formulation's noise label, labels [N, label_dim] one-hot
(None or zeros: the trainer's null label, for classifier-free guidance), augment_labels [N, augment_dim] (None or
zeros: not augmented), cond [N, cond_channels, H, W] a conditioning image (None: zeros), context [N, L, context_dim]
a token sequence for cross-attention (None or zeros: the null context; only ``config.CONTEXT_ARCHS`` take one, and only
when context_dim > 0, so the others keep their signature). ``video-unet`` takes clips x [N, C, T, H, W] instead and
``segments`` [N, T] (joint image-video batches) in place of augment_labels / cond / context. The denoiser around a backbone is ``checkpoint.build_denoiser``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from edmkit.config import NetworkConfig
from edmkit.nn.unet import UNet


def _edm2_unet(n: NetworkConfig) -> torch.nn.Module:
    """The EDM2 U-Net (config ladder A-G as switches)."""
    return UNet(resolution=n.resolution, channels=n.channels, label_dim=n.label_dim, model_channels=n.model_channels,
                channel_mult=n.channel_mult, num_blocks=n.num_blocks, attn_resolutions=n.attn_resolutions,
                channels_per_head=n.channels_per_head, dropout=n.dropout, ladder=n.ladder, augment_dim=n.augment_dim,
                cond_channels=n.cond_channels, context_dim=n.context_dim)


def _common(n: NetworkConfig) -> dict:
    """The constructor arguments every other backbone shares."""
    return dict(resolution=n.resolution, in_channels=n.channels, out_channels=n.channels, label_dim=n.label_dim,
                augment_dim=n.augment_dim, cond_channels=n.cond_channels, model_channels=n.model_channels,
                channel_mult=n.channel_mult, num_blocks=n.num_blocks, attn_resolutions=n.attn_resolutions, dropout=n.dropout,
                context_dim=n.context_dim)


def _song_unet(variant: str) -> Callable[[NetworkConfig], torch.nn.Module]:
    def build(n: NetworkConfig) -> torch.nn.Module:
        """DDPM++ or NCSN++ (Song et al. 2021) as configured by EDM App. F."""
        from edmkit.nn.songunet import VARIANTS, SongUNet

        return SongUNet(**_common(n), **VARIANTS[variant])

    return build


def _adm(n: NetworkConfig) -> torch.nn.Module:
    """ADM (Dhariwal & Nichol 2021) with scale-shift conditioning and multi-head attention."""
    from edmkit.nn.adm import ADMUNet

    return ADMUNet(**_common(n), channels_per_head=n.channels_per_head)


def _dit(n: NetworkConfig) -> torch.nn.Module:
    """DiT (Peebles & Xie 2023): patches, 2-D sin-cos positions, adaLN-Zero transformer blocks."""
    from edmkit.nn.dit import DiT

    return DiT(resolution=n.resolution, in_channels=n.channels, out_channels=n.channels, label_dim=n.label_dim,
               augment_dim=n.augment_dim, cond_channels=n.cond_channels, model_channels=n.model_channels, depth=n.num_blocks,
               channels_per_head=n.channels_per_head, patch_size=n.patch_size, dropout=n.dropout, context_dim=n.context_dim)


def _hdit(n: NetworkConfig) -> torch.nn.Module:
    """HDiT (Crowson et al. 2024): the hourglass transformer; widths model_channels x channel_mult, one level each."""
    from edmkit.nn.hdit import HDiT

    levels = len(n.channel_mult)
    return HDiT(resolution=n.resolution, in_channels=n.channels, out_channels=n.channels, label_dim=n.label_dim,
                augment_dim=n.augment_dim, cond_channels=n.cond_channels, widths=tuple(n.model_channels * m for m in n.channel_mult),
                depths=n.depths or (n.num_blocks,) * levels, attention=n.attn_kinds or ("global",) * levels, patch_size=n.patch_size,
                head_channels=n.channels_per_head, window_size=n.window_size, mapping_channels=n.mapping_channels, dropout=n.dropout, context_dim=n.context_dim)


def _video_unet(n: NetworkConfig) -> torch.nn.Module:
    """The factorized space-time U-Net (Ho et al. 2022 on EDM2's layers): clips [N, C, T, H, W]; n.frames is the training length."""
    from edmkit.nn.video import VideoUNet

    return VideoUNet(resolution=n.resolution, channels=n.channels, label_dim=n.label_dim, model_channels=n.model_channels,
                     channel_mult=n.channel_mult, num_blocks=n.num_blocks, attn_resolutions=n.attn_resolutions,
                     channels_per_head=n.channels_per_head, dropout=n.dropout)


# name -> builder; the names are config.ARCHS (``--arch``)
NETWORKS: dict[str, Callable[[NetworkConfig], torch.nn.Module]] = {
    "edm2-unet": _edm2_unet,
    "ddpmpp": _song_unet("ddpmpp"),
    "ncsnpp": _song_unet("ncsnpp"),
    "adm": _adm,
    "dit": _dit,
    "hdit": _hdit,
    "video-unet": _video_unet,
}


def build_network(n: NetworkConfig) -> torch.nn.Module:
    """The backbone that ``n`` describes (``n.arch`` picks it from :data:`NETWORKS`)."""
    if n.arch not in NETWORKS:
        raise ValueError(f"unknown arch {n.arch!r}; valid: {', '.join(NETWORKS)}")
    return NETWORKS[n.arch](n)


def network_cost(n: NetworkConfig) -> tuple[int, float]:
    """(parameters, GFLOPs per image (video-unet: per clip of n.frames) of one forward pass) of the backbone, measured on the ``meta`` device.

    FLOPs are torch's flop counter (``torch.utils.flop_counter``): 2 per multiply-add of matmuls and convolutions,
    so half of this is the "Gflops" (multiply-adds) that DiT reports. Nothing is allocated.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build_network(n)
        x = torch.zeros(1, n.channels, *((n.frames,) if n.frames else ()), n.resolution, n.resolution)
        labels = torch.zeros(1, n.label_dim) if n.label_dim else None
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(x, torch.zeros(1), labels)
    return sum(p.numel() for p in net.parameters()), counter.get_total_flops() / 1e9
