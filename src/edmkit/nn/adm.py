"""The ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"), as EDM configures it (App. F).

Adapted from OpenAI's guided-diffusion (github.com/openai/guided-diffusion, ``guided_diffusion/unet.py``,
MIT licence, Copyright (c) 2021 OpenAI): the residual block with adaptive group norm (``use_scale_shift_norm``),
resampling inside the block, zero-initialised last convolutions, multi-head self-attention and the
positional-embedding + 2-layer-MLP noise embedding. Module and parameter names and shapes follow EDM's
released ``DhariwalUNet`` (NVlabs/edm, read for names only, not copied) so its weights map one-to-one:
``map_augment``, ``map_layer0``, ``map_layer1``, ``map_label``, ``enc.{res}x{res}_conv|_down|_block{i}``,
``dec.{res}x{res}_in0|_in1|_up|_block{i}``, ``out_norm``, ``out_conv``; in a block ``norm0 conv0 affine norm1
conv1 skip norm2 qkv proj``. The qkv channels are laid out [heads, channels_per_head, (q, k, v)] as in EDM.

Symbols: ``x`` [N, C, H, W] the preconditioned input c_in x, ``c_noise`` [N] the noise label, ``emb`` [N, E] the
embedding (E = 4 model_channels), ``labels`` [N, label_dim] one-hot (zeros = the trainer's null label),
``augment_labels`` [N, augment_dim] (zeros = not augmented), ``cond`` [N, cond_channels, H, W] (zeros = none).
EDM ImageNet-64 (App. F, Table 7): model_channels 192, channel_mult (1, 2, 3, 4), num_blocks 3, attention at
32, 16, 8 with 64 channels per head, dropout 0.1, label_dim 1000 -> about 296M parameters.

Initialisation: PyTorch's default U(+-1/sqrt(fan_in)) for weights and biases (what EDM's ``kaiming_uniform`` x
sqrt(1/3) gives), unit-Gaussian class embedding (ADM's ``nn.Embedding``), and exactly zero for every
residual branch's last conv (``conv1``), every attention ``proj``, the augment map (EDM) and ``out_conv``,
so the network outputs exactly zero at init and the denoiser returns c_skip x.

Context (``context_dim > 0``, issue 27): every block with self-attention then cross-attends from its pixels to the
context tokens [N, L, context_dim] with the same heads (``xattn.FeatureMapCrossAttention``, output starting at zero);
a null context row (zeros) leaves the block exactly as without context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edmkit.nn.mp import resample
from edmkit.nn.unet import concat_cond, context_tokens, num_groups, positional_embedding
from edmkit.nn.xattn import FeatureMapCrossAttention


def group_norm(channels: int) -> torch.nn.GroupNorm:
    """ADM's GroupNorm: 32 groups (fewer for narrow layers, at least 4 channels a group, as in EDM), eps 1e-5, affine."""
    return torch.nn.GroupNorm(num_groups(channels), channels, eps=1e-5)


def zero_conv(in_channels: int, out_channels: int, kernel: int) -> torch.nn.Conv2d:
    """A conv whose weight and bias start at exactly zero (ADM's ``zero_module``)."""
    conv = torch.nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    torch.nn.init.zeros_(conv.weight)
    torch.nn.init.zeros_(conv.bias)
    return conv


def multi_head_attention(qkv: torch.Tensor, *, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention softmax(q^T k / sqrt(d)) v (Vaswani et al. 2017, as in ADM) over the pixels of ``qkv``.

    ``qkv`` [N, 3C, H, W], channels laid out [heads, C / heads, (q, k, v)] (EDM's layout) -> [N, C, H, W].
    """
    N, C3, H, W = qkv.shape
    C = C3 // 3
    qkv = qkv.reshape(N, num_heads, C // num_heads, 3, H * W)
    # -> q, k, v each [N, heads, HW, C/heads], contiguous (SDPA on CPU is much slower on strided input)
    q, k, v = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)
    y = F.scaled_dot_product_attention(q, k, v)  # [N, heads, HW, C/heads]
    return y.transpose(2, 3).reshape(N, C, H, W)


class ADMBlock(torch.nn.Module):
    """ADM residual block with adaptive group norm (guided-diffusion ``ResBlock``, ``use_scale_shift_norm=True``),
    optional 2x resampling (average pool / nearest) and optional multi-head self-attention after it; with attention and
    ``context_dim > 0`` a multi-head cross-attention to the context tokens follows (``xattn.FeatureMapCrossAttention``)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, resample_mode: str = "keep",
                 attention: bool = False, channels_per_head: int = 64, dropout: float = 0.0, context_dim: int = 0) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resample_mode = resample_mode
        self.dropout = dropout
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.norm0 = group_norm(in_channels)
        self.conv0 = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = torch.nn.Linear(emb_channels, 2 * out_channels)  # [scale, shift]
        self.norm1 = group_norm(out_channels)
        self.conv1 = zero_conv(out_channels, out_channels, 3)
        self.skip = torch.nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        if self.num_heads:
            self.norm2 = group_norm(out_channels)
            self.qkv = torch.nn.Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = zero_conv(out_channels, out_channels, 1)
        self.xattn = (FeatureMapCrossAttention(out_channels, context_dim, num_heads=self.num_heads, norm=group_norm(out_channels))
                      if self.num_heads and context_dim else None)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [N, C_in, H, W], emb [N, E], context (tokens [N, L, D_ctx], keep [N]) from ``context_tokens`` or None
        -> [N, C_out, H', W'] (H' = H/2, H or 2H by ``resample_mode``)."""
        h = resample(F.silu(self.norm0(x)), mode=self.resample_mode)  # ADM resamples between activation and conv
        h = self.conv0(h)  # [N, C_out, H', W']
        scale, shift = self.affine(emb)[:, :, None, None].to(h.dtype).chunk(2, dim=1)  # each [N, C_out, 1, 1]
        h = F.silu(self.norm1(h) * (scale + 1) + shift)  # adaptive group norm (ADM Sec. 3)
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = resample(x, mode=self.resample_mode)
        x = h + (self.skip(x) if self.skip is not None else x)
        if self.num_heads:
            x = x + self.attention(x)
        if self.xattn is not None and context is not None:
            x = self.xattn(x, context)
        return x

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention branch: proj(MHA(qkv(norm2(x)))), [N, C, H, W] -> [N, C, H, W]."""
        return self.proj(multi_head_attention(self.qkv(self.norm2(x)), num_heads=self.num_heads))


def check_geometry(*, resolution: int, channel_mult: tuple[int, ...], attn_resolutions: tuple[int, ...],
                   model_channels: int, channels_per_head: int) -> None:
    """Raise a one-line ValueError naming the fix when the U-Net cannot be built for ``resolution``."""
    levels = len(channel_mult)
    if levels < 1:
        raise ValueError("channel_mult is empty; give at least one level, e.g. channel_mult=(1, 2)")
    if resolution % 2 ** (levels - 1):
        raise ValueError(f"resolution {resolution} is not divisible by 2^{levels - 1} ({levels} levels); "
                         f"use a resolution that is a multiple of {2 ** (levels - 1)} or fewer channel_mult entries")
    present = tuple(resolution >> level for level in range(levels))
    missing = [r for r in attn_resolutions if r not in present]
    if missing:
        raise ValueError(f"attention at {missing} but the {resolution}x{resolution} U-Net's levels are at {present}; "
                         f"set attn_resolutions to a subset of {present}")
    attn_levels = [lv for lv, r in enumerate(present) if r in attn_resolutions] + [levels - 1]  # + the middle block
    for width in sorted({model_channels * channel_mult[lv] for lv in attn_levels}):
        if width % channels_per_head:
            raise ValueError(f"attention width {width} is not a multiple of channels_per_head {channels_per_head}; "
                             f"choose channels_per_head dividing {width}")


class ADMUNet(torch.nn.Module):
    """ADM U-Net backbone F(x, c_noise, labels, augment_labels, cond) -> [N, out_channels, H, W] (EDM App. F)."""

    def __init__(self, *, resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, cond_channels: int = 0, model_channels: int = 192,
                 channel_mult: tuple[int, ...] = (1, 2, 3, 4), num_blocks: int = 3,
                 attn_resolutions: tuple[int, ...] = (32, 16, 8), channels_per_head: int = 64,
                 dropout: float = 0.1, context_dim: int = 0) -> None:
        super().__init__()
        check_geometry(resolution=resolution, channel_mult=tuple(channel_mult), attn_resolutions=tuple(attn_resolutions),
                       model_channels=model_channels, channels_per_head=channels_per_head)
        self.label_dim, self.augment_dim, self.cond_channels = label_dim, augment_dim, cond_channels
        self.model_channels, self.context_dim = model_channels, context_dim
        emb_channels = 4 * model_channels
        block_kw = dict(emb_channels=emb_channels, channels_per_head=channels_per_head, dropout=dropout, context_dim=context_dim)

        # Embedding: positional(c_noise) (+ augment) -> linear -> SiLU -> linear (+ label) -> SiLU (ADM's time_embed).
        self.map_augment = torch.nn.Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        if self.map_augment is not None:
            torch.nn.init.zeros_(self.map_augment.weight)  # EDM: augmentation conditioning starts switched off
        self.map_layer0 = torch.nn.Linear(model_channels, emb_channels)
        self.map_layer1 = torch.nn.Linear(emb_channels, emb_channels)
        self.map_label = torch.nn.Linear(label_dim, emb_channels, bias=False) if label_dim else None
        if self.map_label is not None:
            torch.nn.init.normal_(self.map_label.weight)  # ADM's class nn.Embedding: N(0, 1) per class

        widths = [model_channels * m for m in channel_mult]
        self.enc = self._encoder(in_channels + cond_channels, resolution, widths, num_blocks, attn_resolutions, block_kw)
        self.dec = self._decoder(resolution, widths, num_blocks, attn_resolutions, block_kw)
        self.out_norm = group_norm(widths[0])
        self.out_conv = zero_conv(widths[0], out_channels, 3)

    @staticmethod
    def _encoder(in_channels, resolution, widths, num_blocks, attn_resolutions, block_kw) -> torch.nn.ModuleDict:
        """Per level: a 3x3 conv (first level) or a downsampling block, then ``num_blocks`` blocks."""
        enc = torch.nn.ModuleDict()
        c = in_channels
        for level, width in enumerate(widths):
            res = resolution >> level
            if level == 0:
                enc[f"{res}x{res}_conv"] = torch.nn.Conv2d(c, width, 3, padding=1)
                c = width
            else:
                enc[f"{res}x{res}_down"] = ADMBlock(c, c, resample_mode="down", **block_kw)
            for i in range(num_blocks):
                enc[f"{res}x{res}_block{i}"] = ADMBlock(c, width, attention=res in attn_resolutions, **block_kw)
                c = width
        return enc

    def _decoder(self, resolution, widths, num_blocks, attn_resolutions, block_kw) -> torch.nn.ModuleDict:
        """Per level, lowest first: two middle blocks (the first with attention) or an upsampling block, then
        ``num_blocks + 1`` blocks that each take one encoder output as a skip (concatenated)."""
        skips = [m.out_channels for m in self.enc.values()]  # the encoder's outputs, in order
        dec = torch.nn.ModuleDict()
        c = widths[-1]
        for level, width in reversed(list(enumerate(widths))):
            res = resolution >> level
            if level == len(widths) - 1:
                dec[f"{res}x{res}_in0"] = ADMBlock(c, c, attention=True, **block_kw)
                dec[f"{res}x{res}_in1"] = ADMBlock(c, c, **block_kw)
            else:
                dec[f"{res}x{res}_up"] = ADMBlock(c, c, resample_mode="up", **block_kw)
            for i in range(num_blocks + 1):
                dec[f"{res}x{res}_block{i}"] = ADMBlock(c + skips.pop(), width, attention=res in attn_resolutions, **block_kw)
                c = width
        return dec

    def embedding(self, c_noise: torch.Tensor, labels: torch.Tensor | None,
                  augment_labels: torch.Tensor | None) -> torch.Tensor:
        """Conditioning vector [N, 4 model_channels] from c_noise [N], labels and augment labels (None = zeros)."""
        emb = positional_embedding(c_noise, num_channels=self.model_channels)  # [N, model_channels]
        if self.map_augment is not None:
            if augment_labels is not None:  # None = zeros = not augmented, which adds exactly nothing
                emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        elif augment_labels is not None:
            raise ValueError("augment labels given to a network without augment conditioning; build it with augment_dim > 0")
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))  # [N, E]
        if self.map_label is not None and labels is not None:  # None = the zero one-hot (null label), adds nothing
            emb = emb + self.map_label(labels.to(emb.dtype))
        return F.silu(emb)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, C_in, H, W], c_noise [N], labels [N, label_dim] or None, augment_labels [N, augment_dim] or None,
        cond [N, cond_channels, H, W] or None (zeros), context [N, L, context_dim] or None (zeros). Returns [N, out_channels, H, W]."""
        emb = self.embedding(c_noise, labels, augment_labels)
        ctx = context_tokens(context, context_dim=self.context_dim, batch=x.shape[0])
        x = concat_cond(x, cond, cond_channels=self.cond_channels)  # [N, C_in + C_cond, H, W]

        x = x.contiguous(memory_format=torch.channels_last)  # NHWC: faster convolutions on CPU (oneDNN) and GPU (cuDNN)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb, ctx)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)  # [N, C + C_skip, H, W]
            x = block(x, emb, ctx)
        return self.out_conv(F.silu(self.out_norm(x)))
