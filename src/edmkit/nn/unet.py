"""The EDM2 U-Net, with every rung of the EDM2 config ladder A-G as switches (arXiv 2312.02696, Sec. 2, Table 1, Fig. 21).

Layout, top to bottom: noise/label embedding -> encoder (one 3x3 conv, then per level an optional
downsampling block and ``num_blocks`` blocks) -> decoder (per level an upsampling block, or two
blocks at the lowest resolution, then ``num_blocks + 1`` blocks that take a skip each) -> output conv.

Config G (the default): no biases (a constant-ones channel is appended to the input instead), every
learned layer a weight-normalized ``MPConv``, every fixed-function op magnitude-preserving, output conv
with a learned gain initialised to 0. The earlier rungs switch parts back (``config.LADDER``); each
switch lives in exactly one place:

- ``biases``, ``he_init``, ``weight_norm``, ``forced_weight_norm``: ``learned_layer`` (-> ``MPConv`` flags);
  ``biases`` also drops the ones channel (``UNet.forward``).
- ``groupnorm_affine``: ``Block.norm*`` modules (``torch.nn.GroupNorm``, A-B) vs ``group_rms_norm`` (C-E);
  ``pixel_norm`` (F+): no group norms, ``Block.pre_skip`` pixel-normalizes encoder inputs instead, and the
  per-block conditioning becomes a scale only (A-E: adaptive group norm, scale and shift).
- ``cosine_attention``: ``Block._attention``; ``adm_attention``: ``UNet.__init__`` (attention at res/2).
- ``fourier_embedding``: ``UNet.__init__`` / ``UNet._embedding``.
- ``mp_fixed``: ``act`` / ``add`` / ``cat`` below, and the learned gains ``emb_gain`` / ``out_gain``.

Optional conditioning on augment labels (non-leaky augmentation, EDM App. C; ``augment_dim > 0``): a
bias-free linear embedding of the labels added to the noise embedding (MP sum in G), zeros when not given.
Optional conditioning image (cascade super-resolution, SR3; ``cond_channels > 0``): concatenated to the input
channels, zeros when not given (``edmkit.sampling.cascade``; its noise-augmentation level rides on the augment labels).
Optional context token sequence (cross-attention conditioning; ``context_dim > 0``): every block with self-attention
also attends from its pixels to the context tokens (``Block._cross_attention``), magnitude-preserving in the same way
(MP layers, cosine attention) and MP-summed into the main path with balance ``xattn_balance * xattn_gate``, the gate
learned from 0 so the network starts unchanged. A null context row (all zeros, the trainer's dropped context) skips
the branch exactly (``context_tokens``), as the zero one-hot is the null label.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from edmkit.config import LadderSwitches, ladder_switches
from edmkit.nn.mp import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, pixel_norm, resample


def act(x: torch.Tensor, *, mp: bool) -> torch.Tensor:
    """SiLU, magnitude-preserving in config G (EDM2 Eq. 81)."""
    return mp_silu(x) if mp else F.silu(x)


def add(a: torch.Tensor, b: torch.Tensor, *, mp: bool, t: float) -> torch.Tensor:
    """Residual sum: plain ``a + b`` (A-F) or MP sum with balance t (G, EDM2 Eq. 88)."""
    return mp_sum(a, b, t=t) if mp else a + b


def cat(a: torch.Tensor, b: torch.Tensor, *, mp: bool, t: float) -> torch.Tensor:
    """Channel concatenation of ``[N, Ca, H, W]`` and ``[N, Cb, H, W]``: plain (A-F) or MP concat (G, EDM2 Eq. 103)."""
    return mp_cat(a, b, t=t) if mp else torch.cat([a, b], dim=1)


def num_groups(channels: int, *, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """ADM's 32 group-norm groups, fewer for narrow layers (at least 4 channels a group, as in EDM)."""
    return max(g for g in range(1, max_groups + 1) if channels % g == 0 and (channels // g >= min_channels_per_group or g == 1))


def group_rms_norm(x: torch.Tensor, *, groups: int) -> torch.Tensor:
    """Group normalization without mean subtraction or learned scale (EDM2 config C): unit RMS per group of ``[N, C, H, W]``."""
    N, C, H, W = x.shape
    return normalize(x.reshape(N, groups, C // groups, H, W), dim=(2, 3, 4)).reshape(N, C, H, W)


def positional_embedding(c: torch.Tensor, *, num_channels: int, max_positions: int = 10_000) -> torch.Tensor:
    """Sinusoidal positional embedding (Vaswani et al. 2017, as in ADM / EDM config A): ``[N] -> [N, num_channels]``.

    ``[cos(c f_i), sin(c f_i)]`` with ``f_i = max_positions^(-i / (num_channels / 2))``.
    """
    half = num_channels // 2
    freqs = (1 / max_positions) ** (torch.arange(half, dtype=torch.float32, device=c.device) / half)
    y = c.to(torch.float32).outer(freqs)  # [N, C/2]
    return torch.cat([y.cos(), y.sin()], dim=1).to(c.dtype)


def learned_layer(in_channels: int, out_channels: int, kernel: tuple[int, ...] = (), *, switches: LadderSwitches, zero_init: bool = False) -> MPConv:
    """One conv / linear layer as a rung builds it (EDM2 Sec. 2.2-2.3).

    Biases in A-B; ADM init (``zero_init`` layers start at 0) in A-B, He-uniform in C, unit Gaussian
    then weight normalization from D on; forced weight normalization from E on.
    """
    s = switches
    init = "randn" if s.weight_norm else "he" if s.he_init else "zero" if zero_init else "adm"
    return MPConv(in_channels, out_channels, kernel, bias=s.biases, weight_norm=s.weight_norm, forced=s.forced_weight_norm, init=init)


def group_norm_module(channels: int, *, switches: LadderSwitches) -> torch.nn.GroupNorm | None:
    """A learned-affine GroupNorm module where the rung has one (A-B); None otherwise (C-E use ``group_rms_norm``, F+ none)."""
    if switches.pixel_norm or not switches.groupnorm_affine:
        return None
    return torch.nn.GroupNorm(num_groups(channels), channels, eps=1e-5, affine=True)


def norm(x: torch.Tensor, module: torch.nn.GroupNorm | None, *, switches: LadderSwitches) -> torch.Tensor:
    """The residual-branch normalization of a rung: GroupNorm (A-B), group RMS norm (C-E), none (F+: pixel norm elsewhere)."""
    if switches.pixel_norm:
        return x
    if module is not None:
        return module(x)
    return group_rms_norm(x, groups=num_groups(x.shape[1]))


class Block(torch.nn.Module):
    """Residual U-Net block (EDM2 Fig. 21 for F-G; ADM's residual block with group norms for A-E).

    F-G: the encoder flavour projects and pixel-normalizes its input, the decoder flavour keeps the main path free.
    A-E: both flavours normalize inside the residual branch (adaptive group norm takes the embedding as scale and shift).
    """

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
        switches: LadderSwitches | None = None,
        context_dim: int = 0,
        xattn_balance: float = 0.3,
    ) -> None:
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"unknown block flavor {flavor!r}")
        s = self.switches = switches or ladder_switches("G")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = max(out_channels // channels_per_head, 1) if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.pre_skip = flavor == "enc" and s.pixel_norm  # F+: skip projection + pixel norm before the residual branch
        layer = functools.partial(learned_layer, switches=s)
        self.emb_gain = torch.nn.Parameter(torch.zeros([])) if s.mp_fixed else None
        self.conv_res0 = layer(out_channels if self.pre_skip else in_channels, out_channels, (3, 3))
        self.emb_linear = layer(emb_channels, out_channels * (1 if s.pixel_norm else 2))  # [scale] (F+) or [scale, shift] (A-E)
        self.conv_res1 = layer(out_channels, out_channels, (3, 3), zero_init=True)
        self.conv_skip = layer(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = layer(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = layer(out_channels, out_channels, (1, 1), zero_init=True) if self.num_heads else None
        self.norm0 = group_norm_module(in_channels, switches=s)
        self.norm1 = group_norm_module(out_channels, switches=s)
        self.norm2 = group_norm_module(out_channels, switches=s) if self.num_heads else None
        xattn = bool(self.num_heads and context_dim)  # cross-attention beside self-attention (context_dim > 0)
        self.xattn_balance = xattn_balance
        self.xattn_q = layer(out_channels, out_channels, (1, 1)) if xattn else None
        self.xattn_kv = layer(context_dim, out_channels * 2) if xattn else None  # linear on tokens [N, L, D_ctx]
        self.xattn_proj = layer(out_channels, out_channels, (1, 1)) if xattn else None
        self.xattn_gate = torch.nn.Parameter(torch.zeros([])) if xattn else None  # balance multiplier: 0 = branch off

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [N, C_in, H, W], emb [N, E], context (tokens [N, L, D_ctx], keep [N] bool) from ``context_tokens`` or None."""
        s, mp = self.switches, self.switches.mp_fixed
        x = resample(x, mode=self.resample_mode)
        if self.pre_skip:
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = pixel_norm(x)  # config F: normalize activations at the start of encoder blocks only

        y = self.conv_res0(act(norm(x, self.norm0, switches=s), mp=mp))
        c = self.emb_linear(emb, gain=self.emb_gain) if mp else self.emb_linear(emb)  # [N, C_out] or [N, 2 C_out]
        if s.pixel_norm:
            c = c + 1  # gain 0 at init (G) -> identity modulation
            y = act(y * c[:, :, None, None].to(y.dtype), mp=mp)
        else:
            scale, shift = c[:, :, None, None].to(y.dtype).chunk(2, dim=1)  # adaptive group norm (ADM)
            y = act(norm(y, self.norm1, switches=s) * (scale + 1) + shift, mp=mp)
        if self.training and self.dropout > 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if not self.pre_skip and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = add(x, y, mp=mp, t=self.res_balance)

        if self.num_heads:
            x = add(x, self._attention(norm(x, self.norm2, switches=s)), mp=mp, t=self.attn_balance)
        if self.xattn_q is not None and context is not None:
            tokens, keep = context
            t = self.xattn_balance * self.xattn_gate
            y = mp_sum(x, self._cross_attention(norm(x, self.norm2, switches=s), tokens), t=t)
            x = torch.where(keep[:, None, None, None], y, x)  # null rows: exactly the network without context
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention; cosine attention from config C on (q, k, v pixel-normalized per head, EDM2 Sec. 2.2)."""
        N, C, H, W = x.shape
        qkv = self.attn_qkv(x).reshape(N, self.num_heads, C // self.num_heads, 3, H * W)
        if self.switches.cosine_attention:
            qkv = pixel_norm(qkv.reshape(N * self.num_heads, C // self.num_heads, 3, H * W)).reshape(qkv.shape)
        # [N, heads, C/heads, 3, HW] -> q, k, v each [N, heads, HW, C/heads], contiguous (SDPA on CPU is ~8x slower on strided input)
        q, k, v = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.attn_proj(y.transpose(2, 3).reshape(N, C, H, W))

    def _cross_attention(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Cross-attention from pixels x [N, C, H, W] to context tokens [N, L, D_ctx]: q from x (1x1 MP conv), k and v
        from the tokens (MP linear); cosine attention from config C on, as in ``_attention``. Returns [N, C, H, W]."""
        N, C, H, W = x.shape
        heads, d, L = self.num_heads, C // self.num_heads, tokens.shape[1]
        q = self.xattn_q(x).reshape(N * heads, d, H * W)
        kv = self.xattn_kv(tokens.to(x.dtype)).transpose(1, 2).reshape(N * heads, d, 2, L)  # [N heads, d, 2, L]
        if self.switches.cosine_attention:
            q, kv = pixel_norm(q), pixel_norm(kv)  # unit RMS per head over d
        q = q.reshape(N, heads, d, H * W).transpose(2, 3).contiguous()  # [N, heads, HW, d]
        k, v = kv.reshape(N, heads, d, 2, L).permute(3, 0, 1, 4, 2).contiguous().unbind(0)  # each [N, heads, L, d]
        y = F.scaled_dot_product_attention(q, k, v)  # [N, heads, HW, d]
        return self.xattn_proj(y.transpose(2, 3).reshape(N, C, H, W))


def encoder_blocks(*, in_channels: int, resolution: int, block_channels: list[int], num_blocks: int, emb_channels: int,
                   attn_resolutions: tuple[int, ...], switches: LadderSwitches, **block_kw) -> torch.nn.ModuleDict:
    """The U-Net encoder (EDM2 Fig. 21): a 3x3 conv, then per level an optional downsampling block and ``num_blocks`` blocks.

    Shared by ``UNet`` and the noise-aware classifier (``edmkit.diffusion.classifier``). Keys ``{res}x{res}_conv|_down|_block{i}``;
    the conv takes ``x`` alone, every block ``(x, emb)``. Output channels: ``block_channels[-1]``.
    """
    enc = torch.nn.ModuleDict()
    c_out = in_channels
    for level, c in enumerate(block_channels):
        res = resolution >> level
        if level == 0:
            enc[f"{res}x{res}_conv"] = learned_layer(c_out, c, (3, 3), switches=switches)
            c_out = c
        else:
            enc[f"{res}x{res}_down"] = Block(c_out, c_out, emb_channels, flavor="enc", resample_mode="down", switches=switches, **block_kw)
        for i in range(num_blocks):
            enc[f"{res}x{res}_block{i}"] = Block(
                c_out, c, emb_channels, flavor="enc", attention=res in attn_resolutions, switches=switches, **block_kw
            )
            c_out = c
    return enc


def concat_cond(x: torch.Tensor, cond: torch.Tensor | None, *, cond_channels: int) -> torch.Tensor:
    """SR3 / cascaded diffusion: the conditioning image (zeros when None) as extra input channels, for every backbone.

    [N, C, H, W] -> [N, C + cond_channels, H, W]; a network without conditioning channels refuses one.
    """
    if not cond_channels:
        if cond is not None:
            raise ValueError("a conditioning image given to a network without conditioning channels (cond_channels = 0)")
        return x
    cond = x.new_zeros(x.shape[0], cond_channels, *x.shape[2:]) if cond is None else cond.to(x.dtype)
    if cond.shape[1] != cond_channels or cond.shape[-2:] != x.shape[-2:]:
        expected = (cond_channels, *x.shape[2:])
        raise ValueError(f"conditioning image {tuple(cond.shape[1:])} does not match {expected}: pass [N, *{expected}]")
    return torch.cat([x, cond], dim=1)


def context_tokens(context: torch.Tensor | None, *, context_dim: int, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cross-attention conditioning, for every backbone: check context [N, L, context_dim] and mark its non-null rows.

    Returns (context, keep [N] bool: rows that are not all zeros), or None for no context. A row of zeros is the null
    context (the trainer's dropped context): the networks keep their no-context result for it exactly (``torch.where``
    on ``keep``), while still running the branch, so every parameter gets a gradient (DDP) and nothing syncs with the
    host. A network without cross-attention (context_dim = 0) refuses a context.
    """
    if context is None:
        return None
    if not context_dim:
        raise ValueError("a context given to a network without cross-attention (context_dim = 0)")
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != context_dim:
        raise ValueError(f"context of shape {tuple(context.shape)} does not match [N={batch}, L, D={context_dim}]: pass [N, L, {context_dim}] tokens")
    return context, context.flatten(1).ne(0).any(dim=1)  # keep [N]


class UNet(torch.nn.Module):
    """EDM2 U-Net backbone F(x; c_noise, labels) for square images; ``ladder`` picks the EDM2 rung A-G (Table 1)."""

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
        ladder: str | LadderSwitches = "G",
        augment_dim: int = 0,
        augment_balance: float = 0.5,
        cond_channels: int = 0,
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        levels = len(channel_mult)
        if resolution % 2 ** (levels - 1):
            raise ValueError(f"resolution {resolution} is not divisible by 2^{levels - 1} ({levels} levels)")
        s = self.switches = ladder if isinstance(ladder, LadderSwitches) else ladder_switches(ladder)
        self.label_dim = label_dim
        self.augment_dim, self.augment_balance = augment_dim, augment_balance
        self.cond_channels = cond_channels  # cascade SR: conditioning-image channels concatenated to the input (SR3)
        self.context_dim = context_dim  # cross-attention context token width (0 = none)
        self.model_channels = model_channels
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        block_channels = [model_channels * m for m in channel_mult]
        emb_channels = model_channels * emb_mult
        block_kw = dict(channels_per_head=channels_per_head, dropout=dropout, switches=s, context_dim=context_dim)
        layer = functools.partial(learned_layer, switches=s)
        if s.adm_attention and levels > 1:  # config A: ADM also attends at the second-highest resolution (B drops it)
            attn_resolutions = tuple(attn_resolutions) + (resolution // 2,)

        self.emb_fourier = MPFourier(model_channels) if s.fourier_embedding else None
        self.emb_noise = layer(model_channels, emb_channels)
        self.emb_label = layer(label_dim, emb_channels) if label_dim else None
        # no bias even in A-B: zero augment labels ("not augmented", as at sampling) then add exactly zero
        self.emb_augment = learned_layer(augment_dim, emb_channels, switches=dataclasses.replace(s, biases=False)) if augment_dim else None
        self.out_gain = torch.nn.Parameter(torch.zeros([])) if s.mp_fixed else None
        self.emb_mlp = None if s.fourier_embedding else layer(emb_channels, emb_channels)  # ADM's second embedding layer

        # + conditioning image (SR3) + constant-ones channel (C+, replaces biases)
        self.enc = encoder_blocks(in_channels=channels + cond_channels + (0 if s.biases else 1), resolution=resolution,
                                  block_channels=block_channels, num_blocks=num_blocks, emb_channels=emb_channels,
                                  attn_resolutions=attn_resolutions, **block_kw)
        c_out = block_channels[-1]
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
        self.out_norm = group_norm_module(c_out, switches=s)  # A-E: ADM's norm + SiLU before the output conv
        self.out_conv = layer(c_out, channels, (3, 3), zero_init=True)

    def _embedding(self, c_noise: torch.Tensor, labels: torch.Tensor | None, *, batch: int, device: torch.device,
                   augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Noise (label, augment) embedding [N, E]: Fourier features + linear (C+) or positional + 2-layer MLP (A-B)."""
        mp = self.switches.mp_fixed
        if self.emb_fourier is not None:
            emb = self.emb_noise(self.emb_fourier(c_noise))  # [N, E]
        else:
            emb = self.emb_mlp(F.silu(self.emb_noise(positional_embedding(c_noise, num_channels=self.model_channels))))
        if self.emb_label is not None:
            if labels is None:
                labels = torch.zeros(batch, self.label_dim, device=device)
            emb = add(emb, self.emb_label(labels.to(emb.dtype) * math.sqrt(self.label_dim)), mp=mp, t=self.label_balance)
        if self.emb_augment is not None:  # EDM App. C: zeros (no augmentation) when not given, e.g. at sampling
            if augment_labels is None:
                augment_labels = torch.zeros(batch, self.augment_dim, device=device)
            emb = add(emb, self.emb_augment(augment_labels.to(emb.dtype)), mp=mp, t=self.augment_balance)
        elif augment_labels is not None:
            raise ValueError("augment labels given to a network without augment conditioning (augment_dim = 0)")
        return act(emb, mp=mp)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x [N, C, H, W] (unit variance), c_noise [N], labels [N, label_dim] one-hot or None,
        augment_labels [N, augment_dim] or None (zeros), cond [N, cond_channels, H, W] conditioning image or None
        (zeros), context [N, L, context_dim] tokens or None (zeros). Returns [N, C, H, W]."""
        ctx = context_tokens(context, context_dim=self.context_dim, batch=x.shape[0])
        emb = self._embedding(c_noise, labels, batch=x.shape[0], device=x.device, augment_labels=augment_labels)

        x = concat_cond(x, cond, cond_channels=self.cond_channels)  # [N, C + C_cond, H, W]
        return self.trunk(x, emb, ctx)

    def trunk(self, x: torch.Tensor, emb: torch.Tensor, ctx: tuple[torch.Tensor, torch.Tensor] | None = None, *,
              after_block: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Encoder, decoder and output conv of x [N, C (+ C_cond), H, W] given the embedding emb [N, E].

        ``after_block(name, x)``, if given, runs after every block (``"enc.<key>"`` / ``"dec.<key>"``) and returns the
        tensor that goes on: the video U-Net (``nn/video.py``) puts its temporal attention there.
        """
        s, mp = self.switches, self.switches.mp_fixed
        if not s.biases:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # [N, C+1, H, W]
        x = x.contiguous(memory_format=torch.channels_last)  # NHWC: faster convolutions on CPU (oneDNN) and GPU (cuDNN)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb, ctx)
            x = x if after_block is None else after_block(f"enc.{name}", x)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = cat(x, skips.pop(), mp=mp, t=self.concat_balance)
            x = block(x, emb, ctx)
            x = x if after_block is None else after_block(f"dec.{name}", x)
        if not s.pixel_norm:
            x = act(norm(x, self.out_norm, switches=s), mp=mp)
        return self.out_conv(x, gain=self.out_gain) if mp else self.out_conv(x)
