"""DDPM++ and NCSN++ (Song et al. 2021, arXiv 2011.13456) as configured in EDM (Karras et al. 2022, App. F.2, Table 7).

One network, ``SongUNet``; five switches select the variant (``VARIANTS``):

=====================  =============  ===============================
switch                 DDPM++         NCSN++
=====================  =============  ===============================
embedding_type         positional     fourier (scale 16)
encoder_type           standard       residual ("progressive input")
decoder_type           standard       standard (EDM's and Song's CIFAR-10 NCSN++ use no progressive output)
resample_filter        (1, 1)         (1, 3, 3, 1) (FIR)
channel_mult_noise     1              2
=====================  =============  ===============================

Layout, top to bottom: noise embedding (+ label, + augment) -> two-layer SiLU MLP -> encoder (a 3x3 conv, then per level
an optional downsampling block and ``num_blocks`` blocks; the residual encoder also carries a downsampled copy of the
input alongside) -> decoder (two blocks at the lowest resolution, the first with attention, or an upsampling block; then
``num_blocks + 1`` blocks that each take a skip) -> GroupNorm, SiLU, 3x3 output conv (per level and upsampled-summed in
the skip decoder). A block is BigGAN-style: GroupNorm, SiLU, conv (resampling inside), + embedding (added, not
scale-shift), GroupNorm, SiLU, dropout, conv; residual sums scaled by sqrt(1/2); single-head self-attention after it.
With ``context_dim > 0`` (cross-attention conditioning, issue 27) every block with self-attention then attends to the
context tokens [N, L, context_dim] (``xattn.FeatureMapCrossAttention``, single head, output starting at zero); these
``xattn.*`` parameters exist only then, so context-free networks and EDM's weights are unchanged.

Parameter names and shapes follow EDM's released ``SongUNet`` (map_*, enc/dec ``{res}x{res}_*``, norm0/conv0/affine/
norm1/conv1/skip/norm2/qkv/proj), so its weights map one to one: drop its fixed ``resample_filter`` buffers, which are
not stored here. Its inits too (Xavier-uniform, 1e-5 for the residual branch outputs, sqrt(0.2) for qkv), except that
the output conv starts at exactly zero (EDM: 1e-5), so the denoiser returns c_skip x at init.

Architecture adapted from yang-song/score_sde_pytorch (``models/ncsnpp.py``, ``layerspp.py``, ``layers.py``),
Copyright 2020 The Google Research Authors, Apache License 2.0; the code here is a rewrite.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F

from edmkit.nn.unet import concat_cond, context_tokens, num_groups
from edmkit.nn.xattn import FeatureMapCrossAttention

VARIANTS = MappingProxyType({
    "ddpmpp": MappingProxyType({"embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard",
                                "resample_filter": (1, 1), "channel_mult_noise": 1}),
    "ncsnpp": MappingProxyType({"embedding_type": "fourier", "encoder_type": "residual", "decoder_type": "standard",
                                "resample_filter": (1, 3, 3, 1), "channel_mult_noise": 2}),
})


def positional_embedding(c: torch.Tensor, *, num_channels: int, max_positions: int = 10_000) -> torch.Tensor:
    """Sinusoidal noise embedding of DDPM++ (Song et al. 2021, after Vaswani et al. 2017): ``[N] -> [N, num_channels]``.

    ``[sin(c f_i), cos(c f_i)]`` with ``f_i = max_positions^(-i / (C/2 - 1))``, i = 0 .. C/2 - 1 (last frequency 1/max_positions).
    """
    half = num_channels // 2
    freqs = max_positions ** -(torch.arange(half, dtype=torch.float32, device=c.device) / (half - 1))
    y = c.to(torch.float32).outer(freqs)  # [N, C/2]
    return torch.cat([y.sin(), y.cos()], dim=1)


def fourier_embedding(c: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Gaussian Fourier noise embedding of NCSN++ (Song et al. 2021; Tancik et al. 2020): ``[N] -> [N, 2 len(freqs)]``.

    ``[sin(2 pi f c), cos(2 pi f c)]`` with fixed ``f ~ N(0, scale^2)``.
    """
    y = c.to(torch.float32).outer(2 * math.pi * freqs.to(torch.float32))  # [N, C/2]
    return torch.cat([y.sin(), y.cos()], dim=1)


def resample(x: torch.Tensor, resample_filter: tuple[int, ...], *, mode: str, stride_only: bool = False) -> torch.Tensor:
    """2x FIR down- or upsampling of ``[N, C, H, W]`` (Song et al. 2021 after StyleGAN2; (1, 1) is box / nearest).

    The separable filter ``f f^T / (sum f)^2`` is applied per channel: "down" filters and keeps every second pixel
    (padding ``(k-1)//2``, or none when ``stride_only``, for an input padded beforehand); "up" is the transposed
    operation with gain 4, so a constant image stays constant. Returns ``[N, C, H/2, W/2]`` or ``[N, C, 2H, 2W]``.
    """
    f = torch.as_tensor(resample_filter, dtype=x.dtype, device=x.device)
    f = f.outer(f) / f.sum().square()  # [k, k]
    C, pad = x.shape[1], (len(resample_filter) - 1) // 2
    if mode == "down":
        return F.conv2d(x, f.tile(C, 1, 1, 1), groups=C, stride=2, padding=0 if stride_only else pad)
    if mode == "up":
        return F.conv_transpose2d(x, (4 * f).tile(C, 1, 1, 1), groups=C, stride=2, padding=pad)
    raise ValueError(f"unknown resample mode {mode!r}; valid: down, up")


def xavier_linear(in_features: int, out_features: int, *, bias: bool = True, scale: float = 1.0) -> torch.nn.Linear:
    """Linear layer, Xavier-uniform weights times ``scale``, zero bias (EDM's init of the Song networks)."""
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        torch.nn.init.xavier_uniform_(layer.weight).mul_(scale)
        if bias:
            layer.bias.zero_()
    return layer


def group_norm(channels: int) -> torch.nn.GroupNorm:
    """GroupNorm with 32 groups, fewer for narrow layers (at least 4 channels a group), eps 1e-6 (score_sde, EDM)."""
    return torch.nn.GroupNorm(num_groups(channels), channels, eps=1e-6)


class Conv2d(torch.nn.Module):
    """k x k convolution, optionally after 2x FIR resampling (``mode`` "down" / "up"), with Xavier-uniform init times ``scale``.

    ``fused`` (downsampling only; NCSN++'s residual encoder): convolve the input padded by k//2 + (taps-1)//2, then filter
    with stride 2; the same linear map as score_sde's filter-then-strided-conv, and unlike resampling first at the border.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, mode: str = "keep",
                 resample_filter: tuple[int, ...] = (1, 1), fused: bool = False, scale: float = 1.0) -> None:
        super().__init__()
        self.mode, self.resample_filter, self.fused = mode, tuple(resample_filter), fused
        self.weight = torch.nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
        self.bias = torch.nn.Parameter(torch.zeros(out_channels))
        with torch.no_grad():
            torch.nn.init.xavier_uniform_(self.weight).mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.weight.shape[-1] // 2
        if self.fused and self.mode == "down":
            x = F.conv2d(x, self.weight, padding=pad + (len(self.resample_filter) - 1) // 2)  # [N, C_out, H + 2f, W + 2f]
            return resample(x, self.resample_filter, mode="down", stride_only=True) + self.bias[:, None, None]
        if self.mode != "keep":
            x = resample(x, self.resample_filter, mode=self.mode)
        return F.conv2d(x, self.weight, self.bias, padding=pad)


class Block(torch.nn.Module):
    """Residual block of DDPM++ / NCSN++ (BigGAN-style, Song et al. 2021 App. H), optionally resampling, optionally
    followed by single-head self-attention. The embedding is added between the convs; both sums are scaled by sqrt(1/2).
    With attention and ``context_dim > 0``, a single-head cross-attention to the context tokens follows the self-attention
    (``xattn.FeatureMapCrossAttention``: its own GroupNorm, plain residual, output starting at zero)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, mode: str = "keep", attention: bool = False,
                 dropout: float = 0.0, resample_filter: tuple[int, ...] = (1, 1), context_dim: int = 0) -> None:
        super().__init__()
        self.out_channels, self.dropout = out_channels, dropout
        resampling = {"mode": mode, "resample_filter": resample_filter}
        self.norm0 = group_norm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, **resampling)
        self.affine = xavier_linear(emb_channels, out_channels)
        self.norm1 = group_norm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, 3, scale=1e-5)  # near zero: each block starts close to identity
        self.skip = Conv2d(in_channels, out_channels, 1, **resampling) if in_channels != out_channels or mode != "keep" else None
        self.norm2 = group_norm(out_channels) if attention else None
        self.qkv = Conv2d(out_channels, out_channels * 3, 1, scale=math.sqrt(0.2)) if attention else None
        self.proj = Conv2d(out_channels, out_channels, 1, scale=1e-5) if attention else None
        self.xattn = (FeatureMapCrossAttention(out_channels, context_dim, num_heads=1, norm=group_norm(out_channels))
                      if attention and context_dim else None)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [N, C_in, H, W], emb [N, E], context (tokens [N, L, D_ctx], keep [N]) from ``context_tokens`` or None -> [N, C_out, H', W']."""
        y = self.conv0(F.silu(self.norm0(x)))  # [N, C_out, H', W']
        y = F.silu(self.norm1(y + self.affine(emb)[:, :, None, None].to(y.dtype)))
        y = self.conv1(F.dropout(y, p=self.dropout, training=self.training))
        x = (y + (self.skip(x) if self.skip is not None else x)) * math.sqrt(0.5)
        if self.qkv is not None:
            x = (self.proj(self._attention(self.norm2(x))) + x) * math.sqrt(0.5)
        if self.xattn is not None and context is not None:
            x = self.xattn(x, context)
        return x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """Single-head dot-product self-attention over the H W pixels; qkv channels interleaved (c, {q, k, v}) as in EDM."""
        N, C, H, W = x.shape
        qkv = self.qkv(x).reshape(N, C, 3, H * W).permute(2, 0, 3, 1)[:, :, None]  # [3, N, 1 head, HW, C]
        y = F.scaled_dot_product_attention(*qkv.contiguous().unbind(0))  # [N, 1, HW, C]
        return y[:, 0].transpose(1, 2).reshape(N, C, H, W)


def check_resolution(*, resolution: int, levels: int, attn_resolutions: tuple[int, ...]) -> None:
    """Raise a one-line ValueError, naming the fix, for an image size the level structure or attention cannot take."""
    if resolution < 2 ** (levels - 1) or resolution % 2 ** (levels - 1):
        raise ValueError(f"resolution {resolution} is not divisible by 2^{levels - 1} ({levels} levels in channel_mult): "
                         f"use fewer levels or a resolution divisible by {2 ** (levels - 1)}")
    level_res = [resolution >> level for level in range(levels)]
    if bad := [r for r in attn_resolutions if r not in level_res]:
        raise ValueError(f"attention at {bad} is not a level resolution of a {resolution}x{resolution} network: "
                         f"choose attn_resolutions from {level_res}")


def song_encoder(*, in_channels: int, resolution: int, model_channels: int, channel_mult: tuple[int, ...], num_blocks: int,
                 attn_resolutions: tuple[int, ...], encoder_type: str, block: dict) -> tuple[torch.nn.ModuleDict, list[int]]:
    """The encoder: a 3x3 conv to ``model_channels``, then per level an optional downsampling block and ``num_blocks``
    blocks; the skip / residual encoder adds per level a projection of the input pyramid (``_aux_skip`` / ``_aux_residual``).

    Keys ``{res}x{res}_conv|_down|_aux_skip|_aux_residual|_block{i}`` (EDM's names). Returns it and the channel counts of
    the activations the decoder takes as skips (one per non-aux entry), in order.
    """
    enc, c_aux = torch.nn.ModuleDict(), in_channels
    for level, mult in enumerate(channel_mult):
        res = resolution >> level
        if level == 0:
            enc[f"{res}x{res}_conv"] = Conv2d(in_channels, model_channels, 3)
            c_out = model_channels
        else:
            enc[f"{res}x{res}_down"] = Block(c_out, c_out, mode="down", **block)
            if encoder_type == "skip":  # the 2x-filtered input, added through a 1x1 conv
                enc[f"{res}x{res}_aux_skip"] = Conv2d(c_aux, c_out, 1)
            if encoder_type == "residual":  # the input pyramid carried by strided 3x3 convs, summed with sqrt(1/2)
                enc[f"{res}x{res}_aux_residual"] = Conv2d(c_aux, c_out, 3, mode="down", fused=True,
                                                          resample_filter=block["resample_filter"])
                c_aux = c_out
        for i in range(num_blocks):
            enc[f"{res}x{res}_block{i}"] = Block(c_out, model_channels * mult, attention=res in attn_resolutions, **block)
            c_out = model_channels * mult
    skips = [m.out_channels if isinstance(m, Block) else m.weight.shape[0] for n, m in enc.items() if "_aux_" not in n]
    return enc, skips


def song_decoder(*, skips: list[int], out_channels: int, resolution: int, model_channels: int, channel_mult: tuple[int, ...],
                 num_blocks: int, attn_resolutions: tuple[int, ...], decoder_type: str, block: dict) -> torch.nn.ModuleDict:
    """The decoder: two blocks at the lowest resolution (the first with attention) or an upsampling block, then
    ``num_blocks + 1`` blocks that each take a skip (attention in the last one only); the output head (GroupNorm, SiLU,
    3x3 conv starting at exactly 0) after the last level, or after every level in the skip decoder.

    Keys ``{res}x{res}_in0|_in1|_up|_block{i}|_aux_norm|_aux_conv`` (EDM's names). ``skips`` is consumed from the end.
    """
    dec, c_out, levels = torch.nn.ModuleDict(), skips[-1], len(channel_mult)
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = resolution >> level
        if level == levels - 1:
            dec[f"{res}x{res}_in0"] = Block(c_out, c_out, attention=True, **block)
            dec[f"{res}x{res}_in1"] = Block(c_out, c_out, **block)
        else:
            dec[f"{res}x{res}_up"] = Block(c_out, c_out, mode="up", **block)
        for i in range(num_blocks + 1):
            attention = i == num_blocks and res in attn_resolutions
            dec[f"{res}x{res}_block{i}"] = Block(c_out + skips.pop(), model_channels * mult, attention=attention, **block)
            c_out = model_channels * mult
        if decoder_type == "skip" or level == 0:
            dec[f"{res}x{res}_aux_norm"] = group_norm(c_out)
            dec[f"{res}x{res}_aux_conv"] = Conv2d(c_out, out_channels, 3, scale=0.0)  # exactly 0: D = c_skip x at init
    return dec


class FourierFreqs(torch.nn.Module):
    """The fixed frequencies ``f ~ N(0, scale^2)`` of NCSN++'s Fourier embedding: buffer ``freqs`` [C/2] (EDM's name),
    drawn from a private generator seeded by ``seed`` so that building the network twice gives the same features."""

    def __init__(self, num_channels: int, *, scale: float = 16.0, seed: int = 0) -> None:
        super().__init__()
        freqs = np.random.default_rng(seed).standard_normal(num_channels // 2) * scale
        self.register_buffer("freqs", torch.tensor(freqs, dtype=torch.float32))


class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ backbone F(x; c_noise, labels, augment_labels, cond) for square images (EDM App. F.2, Table 7).

    ``VARIANTS["ddpmpp"]`` / ``VARIANTS["ncsnpp"]`` hold the five switches; the other defaults are EDM's CIFAR-10 ones.
    """

    def __init__(
        self,
        *,
        resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        cond_channels: int = 0,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] = (2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.13,
        embedding_type: str = "positional",
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: tuple[int, ...] = (1, 1),
        channel_mult_noise: int = 1,
        fourier_scale: float = 16.0,
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        for name, value, valid in (("embedding_type", embedding_type, ("positional", "fourier")),
                                   ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                   ("decoder_type", decoder_type, ("standard", "skip"))):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        check_resolution(resolution=resolution, levels=len(channel_mult), attn_resolutions=tuple(attn_resolutions))
        noise_channels = model_channels * channel_mult_noise
        if noise_channels < 4 or noise_channels % 2:
            raise ValueError(f"noise embedding width {noise_channels} must be even and >= 4: raise model_channels")
        if not resample_filter or len(resample_filter) % 2:
            raise ValueError(f"resample_filter {tuple(resample_filter)} needs an even number of taps, e.g. (1, 1) or (1, 3, 3, 1)")
        emb_channels = model_channels * channel_mult_emb
        self.label_dim, self.augment_dim, self.cond_channels = label_dim, augment_dim, cond_channels
        self.noise_channels, self.resample_filter, self.context_dim = noise_channels, tuple(resample_filter), context_dim
        block = {"emb_channels": emb_channels, "dropout": dropout, "resample_filter": self.resample_filter, "context_dim": context_dim}
        levels_kw = {"resolution": resolution, "model_channels": model_channels, "channel_mult": tuple(channel_mult),
                     "num_blocks": num_blocks, "attn_resolutions": tuple(attn_resolutions)}

        # Mapping: noise (+ label + augment) embedding -> two-layer SiLU MLP.
        self.map_noise = FourierFreqs(noise_channels, scale=fourier_scale) if embedding_type == "fourier" else None
        self.map_label = xavier_linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = xavier_linear(augment_dim, noise_channels, bias=False) if augment_dim else None  # zeros add zero
        self.map_layer0 = xavier_linear(noise_channels, emb_channels)
        self.map_layer1 = xavier_linear(emb_channels, emb_channels)

        c_in = in_channels + cond_channels  # the conditioning image rides along as extra input channels (SR3)
        self.enc, skips = song_encoder(in_channels=c_in, encoder_type=encoder_type, **levels_kw, block=block)
        self.dec = song_decoder(skips=skips, out_channels=out_channels, decoder_type=decoder_type, **levels_kw, block=block)

    def _embedding(self, c_noise: torch.Tensor, labels: torch.Tensor | None, augment_labels: torch.Tensor | None) -> torch.Tensor:
        """Noise (+ label + augment) embedding through the mapping MLP: ``[N] -> [N, emb_channels]``; None = zeros."""
        if self.map_noise is not None:
            emb = fourier_embedding(c_noise, self.map_noise.freqs)  # [N, noise_channels]
        else:
            emb = positional_embedding(c_noise, num_channels=self.noise_channels)
        if self.map_label is not None and labels is not None:  # None = zero one-hot = the bias alone
            emb = emb + self.map_label(labels.to(emb.dtype) * math.sqrt(self.label_dim))  # EDM scales the one-hot by sqrt(dim)
        elif self.map_label is not None:
            emb = emb + self.map_label.bias
        if augment_labels is not None:
            if self.map_augment is None:
                raise ValueError("augment labels given to a network without augment conditioning (augment_dim = 0)")
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x [N, C, H, W], c_noise [N], labels [N, label_dim] one-hot or None (zeros), augment_labels
        [N, augment_dim] or None (zeros), cond [N, cond_channels, H, W] or None (zeros), context [N, L, context_dim]
        or None (zeros). Returns [N, out_channels, H, W]."""
        emb = self._embedding(c_noise, labels, augment_labels)
        ctx = context_tokens(context, context_dim=self.context_dim, batch=x.shape[0])
        x, skips = self._encode(concat_cond(x, cond, cond_channels=self.cond_channels), emb, ctx)  # [N, C + C_cond, H, W] in
        return self._decode(x, skips, emb, ctx)

    def _encode(self, x: torch.Tensor, emb: torch.Tensor, ctx: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder pass; returns the lowest-resolution activation and the skips (the aux layers update the last one)."""
        aux, skips = x, []
        for name, layer in self.enc.items():
            if name.endswith("_conv"):
                x = layer(x)
            elif name.endswith("_aux_skip"):
                aux = resample(aux, self.resample_filter, mode="down")  # [N, C_in, H', W']
                x = skips[-1] = x + layer(aux)
            elif name.endswith("_aux_residual"):
                x = skips[-1] = aux = (x + layer(aux)) * math.sqrt(0.5)
            else:
                x = layer(x, emb, ctx)
            if "_aux_" not in name:
                skips.append(x)
        return x, skips

    def _decode(self, x: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, ctx: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Decoder pass; returns the output [N, out_channels, H, W] (skip decoder: upsampled running sum of the heads)."""
        out = None
        for name, layer in self.dec.items():
            if name.endswith("_aux_norm"):
                y = F.silu(layer(x))
            elif name.endswith("_aux_conv"):
                y = layer(y)
                out = y if out is None else resample(out, self.resample_filter, mode="up") + y
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)  # [N, C + C_skip, H, W]
                x = layer(x, emb, ctx)
        return out
