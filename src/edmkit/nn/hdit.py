"""The Hourglass Diffusion Transformer, HDiT (Crowson et al. 2024, "Scalable High-Resolution Pixel-Space Image
Synthesis with Hourglass Diffusion Transformers", ICML 2024), under edmkit's backbone contract (``nn/build.py``).

Adapted from k-diffusion (github.com/crowsonkb/k-diffusion, ``k_diffusion/models/image_transformer_v2.py`` and
``k_diffusion/models/axial_rope.py``, MIT licence, Copyright (c) 2022 Katherine Crowson): token merge / split per
level with lerp skips, AdaRMSNorm, cosine-similarity attention with axial rotary position embedding (RoPE), GEGLU
feed-forward, the mapping network, shifted-window attention, zero-initialised residual outputs and output layer.
Changes: pure PyTorch with ``scaled_dot_product_attention`` (no einops, NATTEN, flash-attn, torch.compile);
neighbourhood attention is the same attention under a boolean mask (exact, but O(L^2) memory where NATTEN's kernel is
O(L k^2)); shifted-window masks come from group ids (:func:`window_groups`); the noise level c_noise enters through
edmkit's ``MPFourier`` features, one-hot labels through a linear map (N(0, 1) init, as k-diffusion's class
embedding) and augment labels through a bias-free linear map, so zero labels add exactly zero (the trainer's null
label, "not augmented"); a conditioning image is concatenated to the input by ``concat_cond``. Added: a context
token sequence [N, L, context_dim] (``context_dim > 0``) enters every layer through a pre-norm cosine cross-attention
sub-layer (no RoPE: context tokens have no image position) between self-attention and feed-forward, its output
zero-initialised like every residual branch; a null context row (zeros) skips it exactly (``unet.context_tokens``).

Symbols: ``x`` [N, C, H, W] the preconditioned input; tokens [N, h, w, D] (h = H / p at the first level, halved at
each further level), ``pos`` [h, w, 2] token centres (y, x) on [-1, 1], ``theta`` [heads, h, w, d/4] RoPE angles of a
head of width d, ``emb`` [N, M] the mapping network's output (M = mapping width), ``scale`` the learned per-head
attention temperature (initially 10), ``fac`` the learned lerp weight of a skip (initially 0.5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edmkit.nn.mp import MPFourier
from edmkit.nn.unet import concat_cond, context_tokens

ATTENTION = ("global", "window", "neighborhood")  # config.HDIT_ATTENTION (kept there so configs validate without torch)


# ---------------------------------------------------------------------------------------------
# Pure functions, one per formula.

def rms_norm(x: torch.Tensor, scale: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019; HDiT Sec. 4): x / sqrt(mean(x^2) + eps) * scale over the last dim, in float32."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    mean_sq = x.to(dtype).square().mean(dim=-1, keepdim=True)
    return x * (scale.to(dtype) * torch.rsqrt(mean_sq + eps)).to(x.dtype)


def geglu(x: torch.Tensor) -> torch.Tensor:
    """GEGLU (Shazeer 2020; HDiT's feed-forward): the first half of the features times GELU of the second. [..., 2F] -> [..., F]"""
    x, gate = x.chunk(2, dim=-1)
    return x * F.gelu(gate)


def cosine_qk(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, *, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine-similarity attention (HDiT Sec. 4, after Swin v2): q and k rescaled to norm sqrt(scale), so q.k = scale cos(q, k).

    q, k [..., d]; ``scale`` broadcasts against q[..., :1] (one temperature per head). Norms in float32.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    root = scale.to(dtype).sqrt()
    q_hat = q * (root * torch.rsqrt(q.to(dtype).square().sum(-1, keepdim=True) + eps)).to(q.dtype)
    k_hat = k * (root * torch.rsqrt(k.to(dtype).square().sum(-1, keepdim=True) + eps)).to(k.dtype)
    return q_hat, k_hat


def axial_positions(h: int, w: int, *, device: torch.device | None = None) -> torch.Tensor:
    """Token centres on [-1, 1]^2 (k-diffusion ``make_axial_pos``, square tokens): [h, w, 2] as (y, x)."""
    def centres(n: int) -> torch.Tensor:
        edges = torch.linspace(-1.0, 1.0, n + 1, device=device)
        return (edges[:-1] + edges[1:]) / 2

    return torch.stack(torch.meshgrid(centres(h), centres(w), indexing="ij"), dim=-1)


def merge_positions(pos: torch.Tensor) -> torch.Tensor:
    """Positions of 2x2-merged tokens: the mean of the four. [h, w, 2] -> [h/2, w/2, 2]"""
    h, w, _ = pos.shape
    return pos.view(h // 2, 2, w // 2, 2, 2).mean(dim=(1, 3))


def rope_frequencies(head_channels: int, heads: int) -> torch.Tensor:
    """Axial RoPE frequencies (HDiT Sec. 4, k-diffusion ``AxialRoPE``): log-spaced over [pi, 10 pi), dealt round-robin to
    the heads, d/8 per head and axis, so a head rotates d/2 of its d channels (d/4 pairs: half by y, half by x). [heads, d/8]"""
    n = head_channels // 8
    freqs = torch.linspace(math.log(math.pi), math.log(10 * math.pi), heads * n + 1)[:-1].exp()
    return freqs.view(n, heads).T.contiguous()


def rope_angles(pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Axial RoPE angles theta = (y f, x f): pos [h, w, 2], freqs [heads, n] -> [heads, h, w, 2n]."""
    f = freqs[:, None, None, :]  # [heads, 1, 1, n]
    return torch.cat([pos[None, ..., 0:1] * f, pos[None, ..., 1:2] * f], dim=-1)


def apply_rope(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021): rotate the pairs (x[i], x[m + i]) by theta[i], i < m; the rest of the
    head passes unchanged. Rotating q and k by their own positions makes q.k depend on positions only through their
    difference. x [N, heads, h, w, d], theta [heads, h, w, m] with 2m <= d. Computed in float32."""
    m = theta.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2, rest = x[..., :m].to(dtype), x[..., m:2 * m].to(dtype), x[..., 2 * m:]
    cos, sin = theta.to(dtype).cos(), theta.to(dtype).sin()
    return torch.cat([(x1 * cos - x2 * sin).to(x.dtype), (x2 * cos + x1 * sin).to(x.dtype), rest], dim=-1)


def merge_tokens(x: torch.Tensor, p: int) -> torch.Tensor:
    """Patchify: each p x p block of tokens (or pixels) becomes one token. [N, h, w, C] -> [N, h/p, w/p, p*p*C]"""
    n, h, w, c = x.shape
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(2, 3)  # [N, h/p, w/p, p, p, C]
    return x.reshape(n, h // p, w // p, p * p * c)


def split_tokens(x: torch.Tensor, p: int) -> torch.Tensor:
    """Unpatchify, the inverse of :func:`merge_tokens`. [N, h, w, p*p*C] -> [N, h*p, w*p, C]"""
    n, h, w, c = x.shape
    x = x.reshape(n, h, w, p, p, c // (p * p)).transpose(2, 3)  # [N, h, p, w, p, C]
    return x.reshape(n, h * p, w * p, c // (p * p))


def window_groups(h: int, w: int, *, window: int, shift: int, device: torch.device | None = None) -> torch.Tensor:
    """Shifted-window partition (Swin, Liu et al. 2021; HDiT Sec. 4) as group ids [h, w]: a token attends to the tokens of
    its own group. The grid is rolled by ``shift`` and cut into windows, and tokens brought together only by the
    roll's wrap-around stay apart: row group (r + shift) // window, column group (c + shift) // window."""
    gy = torch.div(torch.arange(h, device=device) + shift, window, rounding_mode="floor")
    gx = torch.div(torch.arange(w, device=device) + shift, window, rounding_mode="floor")
    return gy[:, None] * (w // window + 1) + gx[None, :]


def neighborhood_mask(h: int, w: int, *, kernel: int, device: torch.device | None = None) -> torch.Tensor:
    """Neighbourhood attention (Hassani et al. 2023; HDiT's high-resolution levels): query (i, j) sees the kernel x kernel
    keys of the window centred on it, moved inside the grid at the borders (NATTEN's rule). [h*w, h*w] bool"""
    def axis(n: int) -> torch.Tensor:
        r = torch.arange(n, device=device)
        start = (r - kernel // 2).clamp(0, n - kernel)  # [n] first key row of each query row
        return (r[None, :] >= start[:, None]) & (r[None, :] < start[:, None] + kernel)  # [n query, n key]

    return (axis(h)[:, None, :, None] & axis(w)[None, :, None, :]).reshape(h * w, h * w)


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """[..., h, w, C] -> [..., h/window * w/window, window * window, C]"""
    *b, h, w, c = x.shape
    x = x.reshape(*b, h // window, window, w // window, window, c).transpose(-4, -3)
    return x.reshape(*b, (h // window) * (w // window), window * window, c)


def from_windows(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`to_windows`: [..., h/window * w/window, window * window, C] -> [..., h, w, C]"""
    *b, _, area, c = x.shape
    window = math.isqrt(area)
    x = x.reshape(*b, h // window, w // window, window, window, c).transpose(-4, -3)
    return x.reshape(*b, h, w, c)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kind: str, window: int = 0, shift: int = 0) -> torch.Tensor:
    """Self-attention over a token grid, ``kind`` global, window (shifted by ``shift``) or neighborhood (``window`` =
    kernel). q, k, v [N, heads, h, w, d], already scaled (cosine attention: the softmax sees q.k itself) -> [N, heads, h, w, d]"""
    n, heads, h, w, d = q.shape
    if kind == "window":  # attend within windows only: O(L window^2), not O(L^2)
        groups = window_groups(h, w, window=window, shift=shift, device=q.device)[..., None]  # [h, w, 1]
        q, k, v, groups = (to_windows(torch.roll(t, (shift, shift), dims=(-3, -2)), window) for t in (q, k, v, groups))
        mask = groups[..., :, None, 0] == groups[..., None, :, 0]  # [windows, area, area] same group
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # [N, heads, windows, area, d]
        return torch.roll(from_windows(out, h, w), (-shift, -shift), dims=(-3, -2))
    mask = neighborhood_mask(h, w, kernel=window, device=q.device) if kind == "neighborhood" else None
    out = F.scaled_dot_product_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), attn_mask=mask, scale=1.0)
    return out.view(n, heads, h, w, d)


# ---------------------------------------------------------------------------------------------
# Modules (they hold the parameters).

def zero_linear(in_features: int, out_features: int) -> torch.nn.Linear:
    """A bias-free linear layer that starts at exactly zero (every residual branch's output and the output layer)."""
    layer = torch.nn.Linear(in_features, out_features, bias=False)
    torch.nn.init.zeros_(layer.weight)
    return layer


class RMSNorm(torch.nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale)


class AdaRMSNorm(torch.nn.Module):
    """RMSNorm whose scale is 1 + a linear map of the conditioning vector (HDiT Sec. 4; zero-initialised: plain at init)."""

    def __init__(self, features: int, emb_features: int) -> None:
        super().__init__()
        self.linear = zero_linear(emb_features, features)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.linear(emb)[:, None, None, :] + 1)  # [N, h, w, D]


class FeedForward(torch.nn.Module):
    """Pre-norm GEGLU feed-forward with a residual connection; ``emb`` None: plain RMSNorm (the mapping network)."""

    def __init__(self, width: int, hidden: int, emb_features: int | None, *, dropout: float) -> None:
        super().__init__()
        self.norm = AdaRMSNorm(width, emb_features) if emb_features else RMSNorm(width)
        self.up = torch.nn.Linear(width, 2 * hidden, bias=False)
        self.dropout = torch.nn.Dropout(dropout)
        self.down = zero_linear(hidden, width)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        y = self.norm(x) if emb is None else self.norm(x, emb)
        return x + self.down(self.dropout(geglu(self.up(y))))


class SelfAttention(torch.nn.Module):
    """Pre-norm cosine self-attention with axial RoPE and a residual connection, global, window or neighborhood."""

    def __init__(self, width: int, head_channels: int, emb_features: int, *, kind: str, window: int, shift: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_channels, self.kind, self.window, self.shift = width // head_channels, head_channels, kind, window, shift
        self.norm = AdaRMSNorm(width, emb_features)
        self.qkv = torch.nn.Linear(width, 3 * width, bias=False)
        self.scale = torch.nn.Parameter(torch.full([self.heads], 10.0))
        self.register_buffer("freqs", rope_frequencies(head_channels, self.heads), persistent=False)  # a function of the config
        self.dropout = torch.nn.Dropout(dropout)
        self.out = zero_linear(width, width)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        n, h, w, width = x.shape
        qkv = self.qkv(self.norm(x, emb)).view(n, h, w, 3, self.heads, self.head_channels)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5)  # each [N, heads, h, w, d]
        q, k = cosine_qk(q, k, self.scale.view(-1, 1, 1, 1))
        theta = rope_angles(pos, self.freqs)  # [heads, h, w, d/4]
        y = attention(apply_rope(q, theta), apply_rope(k, theta), v, kind=self.kind, window=self.window, shift=self.shift)
        y = y.permute(0, 2, 3, 1, 4).reshape(n, h, w, width)  # [N, h, w, D]
        return x + self.out(self.dropout(y))


class CrossAttention(torch.nn.Module):
    """Pre-norm cosine cross-attention from the tokens to context tokens [N, L, D_ctx], with a residual connection."""

    def __init__(self, width: int, head_channels: int, emb_features: int, context_dim: int, *, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_channels = width // head_channels, head_channels
        self.norm = AdaRMSNorm(width, emb_features)
        self.q = torch.nn.Linear(width, width, bias=False)
        self.kv = torch.nn.Linear(context_dim, 2 * width, bias=False)
        self.scale = torch.nn.Parameter(torch.full([self.heads], 10.0))
        self.dropout = torch.nn.Dropout(dropout)
        self.out = zero_linear(width, width)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, keep = context
        n, h, w, width = x.shape
        q = self.q(self.norm(x, emb)).view(n, h * w, self.heads, self.head_channels).transpose(1, 2)  # [N, heads, hw, d]
        k, v = self.kv(tokens.to(x.dtype)).view(n, -1, 2, self.heads, self.head_channels).permute(2, 0, 3, 1, 4)  # [N, heads, L, d]
        q, k = cosine_qk(q, k, self.scale.view(-1, 1, 1))
        y = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), scale=1.0)  # cosine: no 1/sqrt(d)
        y = self.out(self.dropout(y.transpose(1, 2).reshape(n, h, w, width)))
        return torch.where(keep[:, None, None, None], x + y, x)  # null rows: exactly the network without context


class Layer(torch.nn.Module):
    """One transformer layer: self-attention, (cross-attention to the context,) then feed-forward (hidden width 3 D, k-diffusion's default)."""

    def __init__(self, width: int, head_channels: int, emb_features: int, *, kind: str, window: int, shift: int, dropout: float,
                 context_dim: int = 0) -> None:
        super().__init__()
        self.attn = SelfAttention(width, head_channels, emb_features, kind=kind, window=window, shift=shift, dropout=dropout)
        self.xattn = CrossAttention(width, head_channels, emb_features, context_dim, dropout=dropout) if context_dim else None
        self.ff = FeedForward(width, 3 * width, emb_features, dropout=dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, emb: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.attn(x, pos, emb)
        if self.xattn is not None and context is not None:
            x = self.xattn(x, emb, context)
        return self.ff(x, emb)


class TokenSplit(torch.nn.Module):
    """Token split with a lerp skip (HDiT Sec. 4): lerp(skip, split(x), fac), fac learned from 0.5."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(in_features, 4 * out_features, bias=False)
        self.fac = torch.nn.Parameter(torch.full([1], 0.5))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.lerp(skip, split_tokens(self.proj(x), 2), self.fac.to(x.dtype))  # [N, h, w, D'] -> [N, 2h, 2w, D]


class HDiT(torch.nn.Module):
    """HDiT backbone F(x; c_noise, labels, augment_labels, cond) for square images (k-diffusion ``ImageTransformerDenoiserModelV2``).

    Level i has width ``widths[i]`` and ``depths[i]`` layers on the way down and as many on the way up (the last level:
    ``depths[-1]`` layers in the middle), with attention ``attention[i]``; windowed levels alternate shift 0 and
    ``window // 2`` layer by layer. Tokens are p x p pixel patches, merged 2x2 between levels.
    """

    def __init__(self, *, resolution: int, in_channels: int, out_channels: int, label_dim: int = 0, augment_dim: int = 0,
                 cond_channels: int = 0, widths: tuple[int, ...], depths: tuple[int, ...], attention: tuple[str, ...],
                 patch_size: int, head_channels: int = 64, window_size: int = 7, mapping_channels: int = 256,
                 mapping_depth: int = 2, dropout: float = 0.0, context_dim: int = 0) -> None:
        super().__init__()
        if resolution % (patch_size * 2 ** (len(widths) - 1)):
            raise ValueError(f"HDiT cannot take {resolution}x{resolution} images with patch size {patch_size} and {len(widths)} levels")
        self.label_dim, self.augment_dim, self.cond_channels, self.patch_size = label_dim, augment_dim, cond_channels, patch_size
        self.context_dim = context_dim
        m = mapping_channels
        self.patch_in = torch.nn.Linear((in_channels + cond_channels) * patch_size ** 2, widths[0], bias=False)
        self.emb_fourier = MPFourier(m)
        self.emb_noise = torch.nn.Linear(m, m, bias=False)
        self.emb_label = torch.nn.Linear(label_dim, m, bias=False) if label_dim else None
        if self.emb_label is not None:
            torch.nn.init.normal_(self.emb_label.weight)  # k-diffusion's class nn.Embedding: N(0, 1) per class
        self.emb_augment = torch.nn.Linear(augment_dim, m, bias=False) if augment_dim else None
        self.mapping_in = RMSNorm(m)
        self.mapping = torch.nn.ModuleList([FeedForward(m, 3 * m, None, dropout=0.0) for _ in range(mapping_depth)])
        self.mapping_out = RMSNorm(m)

        def level(i: int, first: int) -> torch.nn.ModuleList:
            """Layers first .. first + depths[i] - 1 of level i; windows shift on odd layers (Swin: every other layer)."""
            return torch.nn.ModuleList([Layer(widths[i], head_channels, m, kind=attention[i], window=window_size,
                                              shift=window_size // 2 if attention[i] == "window" and j % 2 else 0, dropout=dropout,
                                              context_dim=context_dim)
                                        for j in range(first, first + depths[i])])

        last = len(widths) - 1
        self.down = torch.nn.ModuleList([level(i, 0) for i in range(last)])
        self.mid = level(last, 0)
        self.up = torch.nn.ModuleList([level(i, depths[i]) for i in range(last)])
        self.merges = torch.nn.ModuleList([torch.nn.Linear(4 * widths[i], widths[i + 1], bias=False) for i in range(last)])
        self.splits = torch.nn.ModuleList([TokenSplit(widths[i + 1], widths[i]) for i in range(last)])
        self.out_norm = RMSNorm(widths[0])
        self.patch_out = zero_linear(widths[0], out_channels * patch_size ** 2)

    def embedding(self, c_noise: torch.Tensor, labels: torch.Tensor | None, augment_labels: torch.Tensor | None) -> torch.Tensor:
        """The mapping network's output [N, M] from the noise level, labels and augment labels (zeros add exactly zero)."""
        e = self.emb_noise(self.emb_fourier(c_noise))  # [N, M]
        if self.emb_label is not None and labels is not None:
            e = e + self.emb_label(labels.to(e.dtype))
        if self.emb_augment is not None and augment_labels is not None:
            e = e + self.emb_augment(augment_labels.to(e.dtype))
        elif augment_labels is not None:
            raise ValueError("augment labels given to a network without augment conditioning (augment_dim = 0)")
        e = self.mapping_in(e)
        for block in self.mapping:
            e = block(e)
        return self.mapping_out(e)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x [N, C, H, W] (unit variance), c_noise [N], labels [N, label_dim] one-hot or None, augment_labels
        [N, augment_dim] or None (zeros), cond [N, cond_channels, H, W] or None (zeros), context [N, L, context_dim]
        or None (zeros). Returns [N, C, H, W]."""
        emb = self.embedding(c_noise, labels, augment_labels)
        ctx = context_tokens(context, context_dim=self.context_dim, batch=x.shape[0])
        x = concat_cond(x, cond, cond_channels=self.cond_channels)  # [N, C + C_cond, H, W]
        x = self.patch_in(merge_tokens(x.permute(0, 2, 3, 1), self.patch_size))  # [N, H/p, W/p, D0]
        pos = axial_positions(x.shape[1], x.shape[2], device=x.device)
        skips = []
        for layers, merge in zip(self.down, self.merges):
            for layer in layers:
                x = layer(x, pos, emb, ctx)
            skips.append((x, pos))
            x, pos = merge(merge_tokens(x, 2)), merge_positions(pos)  # [N, h/2, w/2, D_next]
        for layer in self.mid:
            x = layer(x, pos, emb, ctx)
        for layers, split, (skip, pos) in reversed(list(zip(self.up, self.splits, skips))):
            x = split(x, skip)  # [N, 2h, 2w, D]
            for layer in layers:
                x = layer(x, pos, emb, ctx)
        x = split_tokens(self.patch_out(self.out_norm(x)), self.patch_size)  # [N, H, W, C]
        return x.permute(0, 3, 1, 2)
