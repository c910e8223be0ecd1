"""The EDM2 magnitude-preserving U-Net (EDM2 config G, arXiv 2312.02696, Sec. 2 and Fig. 21).

Layout, top to bottom: noise/label embedding -> encoder (one 3x3 conv, then per level an optional
downsampling block and ``num_blocks`` blocks) -> decoder (per level an upsampling block, or two
blocks at the lowest resolution, then ``num_blocks + 1`` blocks that take a skip each) -> output conv
with a learned gain initialised to 0. There are no biases: a constant-ones channel is appended to the
input instead. Every learned layer is an ``MPConv``; every fixed-function op is magnitude-preserving.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edmkit.nn.mp import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, pixel_norm, resample


class Block(torch.nn.Module):
    """Residual U-Net block (EDM2 Fig. 21): encoder flavour pixel-normalizes its input, decoder flavour keeps the main path free."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        flavor: str,
        resample_mode: str = "keep",
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256.0,
    ) -> None:
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"unknown block flavor {flavor!r}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = max(out_channels // channels_per_head, 1) if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = pixel_norm(x)  # config F: normalize activations at the start of encoder blocks only

        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # [N, C_out]; gain 0 at init -> identity modulation
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout > 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine self-attention (EDM2 config C): q, k, v pixel-normalized per head."""
        N, C, H, W = x.shape
        qkv = self.attn_qkv(x).reshape(N, self.num_heads, C // self.num_heads, 3, H * W)
        q, k, v = pixel_norm(qkv.reshape(N * self.num_heads, C // self.num_heads, 3, H * W)).reshape(qkv.shape).unbind(3)
        # q, k, v: [N, heads, C/heads, HW] -> SDPA wants [N, heads, HW, C/heads]
        y = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
        return self.attn_proj(y.transpose(2, 3).reshape(N, C, H, W))


class UNet(torch.nn.Module):
    """EDM2 U-Net backbone F(x; c_noise, labels) for square images (EDM2 config G)."""

    def __init__(
        self,
        *,
        resolution: int,
        channels: int,
        label_dim: int = 0,
        model_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (),
        channels_per_head: int = 64,
        dropout: float = 0.0,
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        emb_mult: int = 4,
    ) -> None:
        super().__init__()
        levels = len(channel_mult)
        if resolution % 2 ** (levels - 1):
            raise ValueError(f"resolution {resolution} is not divisible by 2^{levels - 1} ({levels} levels)")
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        block_channels = [model_channels * m for m in channel_mult]
        emb_channels = model_channels * emb_mult
        block_kw = dict(channels_per_head=channels_per_head, dropout=dropout)

        self.emb_fourier = MPFourier(model_channels)
        self.emb_noise = MPConv(model_channels, emb_channels)
        self.emb_label = MPConv(label_dim, emb_channels) if label_dim else None
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        self.enc = torch.nn.ModuleDict()
        c_out = channels + 1  # + constant-ones channel
        for level, c in enumerate(block_channels):
            res = resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(c_out, c, (3, 3))
                c_out = c
            else:
                self.enc[f"{res}x{res}_down"] = Block(c_out, c_out, emb_channels, flavor="enc", resample_mode="down", **block_kw)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = Block(
                    c_out, c, emb_channels, flavor="enc", attention=res in attn_resolutions, **block_kw
                )
                c_out = c
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = torch.nn.ModuleDict()
        for level, c in reversed(list(enumerate(block_channels))):
            res = resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = Block(c_out, c_out, emb_channels, flavor="dec", attention=True, **block_kw)
                self.dec[f"{res}x{res}_in1"] = Block(c_out, c_out, emb_channels, flavor="dec", **block_kw)
            else:
                self.dec[f"{res}x{res}_up"] = Block(c_out, c_out, emb_channels, flavor="dec", resample_mode="up", **block_kw)
            for i in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = Block(
                    c_out + skips.pop(), c, emb_channels, flavor="dec", attention=res in attn_resolutions, **block_kw
                )
                c_out = c
        self.out_conv = MPConv(c_out, channels, (3, 3))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x [N, C, H, W] (unit variance), c_noise [N], labels [N, label_dim] one-hot or None. Returns [N, C, H, W]."""
        emb = self.emb_noise(self.emb_fourier(c_noise))  # [N, E]
        if self.emb_label is not None:
            if labels is None:
                labels = torch.zeros(x.shape[0], self.label_dim, device=x.device)
            emb = mp_sum(emb, self.emb_label(labels.to(emb.dtype) * math.sqrt(self.label_dim)), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # [N, C+1, H, W]
        x = x.contiguous(memory_format=torch.channels_last)  # NHWC: faster convolutions on CPU (oneDNN) and GPU (cuDNN)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)
