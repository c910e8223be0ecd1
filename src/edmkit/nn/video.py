"""A factorized space-time U-Net for clips [N, C, T, H, W] (``--arch video-unet``), from EDM2's magnitude-preserving layers.

Video Diffusion Models (Ho et al. 2022, Sec. 3) factorize space and time: the U-Net's spatial blocks run on every frame
(frames folded into the batch, [N T, C, H, W]) and a temporal attention block follows each spatially attended block,
attending over time at every pixel. Here both parts are EDM2 config G (Karras et al. 2024): the spatial network is
``nn/unet.py``'s U-Net itself (its ``trunk`` with a hook after every block) and the temporal block is

    y = MP-sum(x, proj(softmax(q k^T / sqrt(d) + B + M) v), t = temporal_balance)      (EDM2 Eq. 88 for the sum)

with q, k, v from one 1x1 MP conv, normalized to unit RMS per head (cosine attention, EDM2 Sec. 2.2). B is a learned
bias per head of the signed frame distance j - i, clipped to +-max_distance, so the network takes any clip length
(Ho et al. use relative position embeddings for the same reason). M is the segment mask of joint image-video
training (Ho et al. Sec. 3, "joint training"): frames i, j with different segment ids get -inf, so an appended
independent image attends only to itself and nothing else attends to it. With B = 0 and one segment the block is
equivariant to permuting the frames.

The noise level and the label are per clip: one embedding per clip, broadcast to its frames (one sigma per example).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edmkit.nn.mp import MPConv, mp_sum, normalize
from edmkit.nn.unet import UNet

MAX_DISTANCE = 16  # relative distances beyond this share the bias of +-16 frames


def relative_bias(table: torch.Tensor, frames: int) -> torch.Tensor:
    """B[h, i, j] = table[h, clip(j - i, -D, D) + D] for a [heads, 2 D + 1] table: [heads, frames, frames]."""
    D = (table.shape[1] - 1) // 2
    pos = torch.arange(frames, device=table.device)
    return table[:, (pos[None, :] - pos[:, None]).clamp(-D, D) + D]


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """M[n, i, j] = 0 where segments[n, i] == segments[n, j], else -inf: [N, T] ids -> [N, T, T] float32."""
    same = segments[:, :, None] == segments[:, None, :]
    return torch.zeros(same.shape, device=segments.device).masked_fill(~same, float("-inf"))


def segment_ids(segments: torch.Tensor | None, *, batch: int, frames: int, device: torch.device) -> torch.Tensor:
    """Segment ids [N, T] int64 of a batch: None is one clip per example (all zeros); [T] applies to every example."""
    if segments is None:
        return torch.zeros(batch, frames, dtype=torch.int64, device=device)
    segments = torch.as_tensor(segments, device=device)
    if segments.ndim == 1:
        segments = segments.expand(batch, -1)
    if tuple(segments.shape) != (batch, frames):
        raise ValueError(f"segment ids of shape {tuple(segments.shape)} do not match the clips' [N={batch}, T={frames}]")
    return segments


class TemporalAttention(torch.nn.Module):
    """Cosine self-attention over the frames of each pixel, relative-distance bias, segment mask, MP sum into x."""

    def __init__(self, channels: int, *, channels_per_head: int = 64, balance: float = 0.3, max_distance: int = MAX_DISTANCE) -> None:
        super().__init__()
        self.num_heads = max(channels // channels_per_head, 1)
        self.balance = balance
        self.qkv = MPConv(channels, channels * 3, (1, 1))
        self.proj = MPConv(channels, channels, (1, 1))
        self.bias = torch.nn.Parameter(torch.zeros(self.num_heads, 2 * max_distance + 1))

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor) -> torch.Tensor:
        """x [N T, C, H, W] (frames of each clip consecutive), mask [N, T, T] (``segment_mask``). Returns [N T, C, H, W]."""
        N, T = mask.shape[:2]
        C, H, W = x.shape[1:]
        h = self.num_heads
        qkv = self.qkv(x).reshape(N, T, h, C // h, 3, H * W)
        qkv = normalize(qkv, dim=3)  # cosine attention: unit RMS per head
        q, k, v = qkv.permute(4, 0, 5, 2, 1, 3).contiguous().unbind(0)  # each [N, HW, heads, T, d]
        bias = relative_bias(self.bias, T).to(q.dtype)[None, None] + mask[:, None, None].to(q.dtype)  # [N, 1, heads, T, T]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [N, HW, heads, T, d]
        y = y.permute(0, 3, 2, 4, 1).reshape(N * T, C, H, W)
        return mp_sum(x, self.proj(y), t=self.balance)


class VideoUNet(torch.nn.Module):
    """The EDM2 U-Net on every frame plus temporal attention after each spatially attended block: F(x [N, C, T, H, W])."""

    def __init__(self, *, resolution: int, channels: int, label_dim: int = 0, model_channels: int = 64,
                 channel_mult: tuple[int, ...] = (1, 2, 2), num_blocks: int = 2, attn_resolutions: tuple[int, ...] = (),
                 channels_per_head: int = 64, dropout: float = 0.0, temporal_balance: float = 0.3) -> None:
        super().__init__()
        self.spatial = UNet(resolution=resolution, channels=channels, label_dim=label_dim, model_channels=model_channels,
                            channel_mult=channel_mult, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
                            channels_per_head=channels_per_head, dropout=dropout)
        self.temporal = torch.nn.ModuleDict({
            f"{part}_{name}": TemporalAttention(block.out_channels, channels_per_head=channels_per_head, balance=temporal_balance)
            for part, blocks in (("enc", self.spatial.enc), ("dec", self.spatial.dec))
            for name, block in blocks.items() if getattr(block, "num_heads", 0)
        })

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, C, T, H, W] clips (unit variance), c_noise [N], labels [N, label_dim] or None, segments [N, T] or [T]
        int ids (None: each example one clip). Returns [N, C, T, H, W]."""
        if x.ndim != 5:
            raise ValueError(f"video-unet takes clips [N, C, T, H, W], got shape {tuple(x.shape)}")
        N, C, T, H, W = x.shape
        mask = segment_mask(segment_ids(segments, batch=N, frames=T, device=x.device))  # [N, T, T]
        emb = self.spatial._embedding(c_noise, labels, batch=N, device=x.device).repeat_interleave(T, dim=0)  # per clip -> [N T, E]

        def temporal(name: str, h: torch.Tensor) -> torch.Tensor:
            key = name.replace(".", "_", 1)  # "enc.8x8_block0" -> "enc_8x8_block0"
            return self.temporal[key](h, mask=mask) if key in self.temporal else h

        y = self.spatial.trunk(x.transpose(1, 2).reshape(N * T, C, H, W), emb, after_block=temporal)  # frames folded: [N T, C, H, W]
        return y.reshape(N, T, C, H, W).transpose(1, 2)
