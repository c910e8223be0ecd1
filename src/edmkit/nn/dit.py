"""DiT, the Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", arXiv 2212.09748).

Implemented from the paper (Sec. 3.2, Fig. 3), not from its code (CC BY-NC), in pixel space under edmkit's backbone
contract (``nn/build.py``). Layout, top to bottom: the input (plus the conditioning image, ``concat_cond``) cut into
p x p patches by a stride-p convolution -> fixed 2-D sine-cosine positions added -> ``depth`` DiT blocks with
adaLN-Zero -> final adaptive LayerNorm and a linear map back to p x p x C values per token -> the image.

Symbols: ``x`` [N, C, H, W] the preconditioned input c_in x; ``p`` the patch size; ``T = (H/p)(W/p)`` tokens of
width ``D`` (``model_channels``); ``c`` [N, D] the conditioning vector = noise embedding (edmkit's c_noise through
the sinusoidal embedding and a 2-layer MLP, DiT's "timestep") + label embedding (one-hot labels through a bias-free
linear map: zeros, the trainer's null label, add nothing) + augment-label embedding (EDM App. C; zeros add nothing).
Each block regresses shift, scale and gate (each [N, 1, D]) for its attention and MLP branches from c (adaLN-Zero,
DiT Sec. 3.2); the gates and the output layer start at zero, so every block starts as the identity and the network
outputs exactly zero: the denoiser starts at c_skip x. The output has the image's channels only (DiT's learned
variance is the denoiser's uncertainty head here). Attention is ``scaled_dot_product_attention``.

Initialisation (the paper follows ViT): Xavier-uniform linear layers and patch projection with zero biases,
N(0, 0.02^2) for the noise MLP and the label embedding; zero for every adaLN regression, the augment map (EDM: augment
conditioning starts switched off) and the output layer.

Context (cross-attention conditioning, ``context_dim > 0``, as PixArt-alpha's text conditioning): each block gets a
pre-norm cross-attention sub-layer between self-attention and MLP, q from the tokens, k and v from the context tokens
[N, L, context_dim], its output projection zero-initialised so the network starts unchanged. A null context row
(zeros) skips the sub-layer exactly (``unet.context_tokens``). DiT-S/2 (D 384, depth 12, 6 heads, p 2) at 32x32x3: ~33M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edmkit.nn.unet import concat_cond, context_tokens, positional_embedding
from edmkit.nn.xattn import cross_attention

NOISE_CHANNELS = 256  # width of the sinusoidal noise embedding before the MLP (DiT's frequency embedding size)


def sincos_positions_2d(height: int, width: int, *, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (ViT / MAE, used by DiT Sec. 3.2): [height * width, dim], row-major.

    Half of the channels embed the token's row, half its column, each with the 1-D sinusoidal embedding of
    Vaswani et al. 2017 (``[cos(i f_k), sin(i f_k)]``, ``f_k = 10000^(-k / (dim / 4))``). The inner product of two
    tokens' embeddings depends only on their offset (sum_k cos(f_k Δ)), so the positions are translation invariant.
    """
    rows = torch.arange(height, dtype=torch.float32, device=device).repeat_interleave(width)  # [T]
    cols = torch.arange(width, dtype=torch.float32, device=device).repeat(height)  # [T]
    return torch.cat([positional_embedding(rows, num_channels=dim // 2), positional_embedding(cols, num_channels=dim // 2)], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive layer norm's affine part (adaLN, DiT Sec. 3.2): x (1 + scale) + shift, scale = shift = 0 the identity."""
    return x * (1 + scale) + shift


def unpatchify(tokens: torch.Tensor, *, patch: int, height: int, width: int) -> torch.Tensor:
    """Tokens back to an image (DiT's linear decoder output rearranged): [N, T, C p^2] -> [N, C, height, width].

    Token t = (i, j) in row-major order holds the p x p x C values of its patch, laid out (C, p, p): the inverse of
    ``F.pixel_unshuffle(x, p).flatten(2).transpose(1, 2)``.
    """
    N, T, K = tokens.shape
    return F.pixel_shuffle(tokens.transpose(1, 2).reshape(N, K, height // patch, width // patch), patch)


def self_attention(qkv: torch.Tensor, *, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention softmax(q k^T / sqrt(d)) v over tokens (Vaswani et al. 2017): [N, T, 3D] -> [N, T, D]."""
    N, T, D3 = qkv.shape
    # -> q, k, v each [N, heads, T, d], contiguous (SDPA on CPU is much slower on strided input)
    q, k, v = qkv.reshape(N, T, 3, num_heads, D3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, T, D3 // 3)


def zero_linear(in_features: int, out_features: int) -> torch.nn.Linear:
    """A linear layer whose weight and bias start at exactly zero (adaLN-Zero's regressions, the output layer)."""
    layer = torch.nn.Linear(in_features, out_features)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    return layer


class DiTBlock(torch.nn.Module):
    """DiT block with adaLN-Zero (DiT Fig. 3): x + gate_a attn(adaLN(x)), then x + gate_m MLP(adaLN(x)); [N, T, D]."""

    def __init__(self, width: int, *, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.0, context_dim: int = 0) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.norm = torch.nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)  # one module: it holds no parameters
        self.ada = zero_linear(width, 6 * width)  # c -> shift, scale, gate of both branches
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.mlp0 = torch.nn.Linear(width, mlp_ratio * width)
        self.mlp1 = torch.nn.Linear(mlp_ratio * width, width)
        self.xattn_q = torch.nn.Linear(width, width) if context_dim else None
        self.xattn_kv = torch.nn.Linear(context_dim, 2 * width) if context_dim else None
        self.xattn_proj = zero_linear(width, width) if context_dim else None  # zero: the sub-layer starts switched off

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [N, T, D], c [N, D] the conditioning vector, context (tokens [N, L, D_ctx], keep [N]) or None -> [N, T, D]."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(F.silu(c)).to(x.dtype).unsqueeze(1).chunk(6, dim=2)  # each [N, 1, D]
        h = self.qkv(modulate(self.norm(x), shift_a, scale_a))  # [N, T, 3D]
        x = x + gate_a * self.proj(self_attention(h, num_heads=self.num_heads))
        if self.xattn_q is not None and context is not None:
            tokens, keep = context
            y = cross_attention(self.xattn_q(self.norm(x)), self.xattn_kv(tokens.to(x.dtype)), num_heads=self.num_heads)
            x = torch.where(keep[:, None, None], x + self.xattn_proj(y), x)  # null rows: exactly the network without context
        h = F.gelu(self.mlp0(modulate(self.norm(x), shift_m, scale_m)), approximate="tanh")  # [N, T, 4D]
        return x + gate_m * self.mlp1(F.dropout(h, p=self.dropout, training=self.training))


class DiT(torch.nn.Module):
    """DiT backbone F(x, c_noise, labels, augment_labels, cond) -> [N, out_channels, H, W] (Peebles & Xie 2023)."""

    def __init__(self, *, resolution: int, in_channels: int, out_channels: int, label_dim: int = 0, augment_dim: int = 0,
                 cond_channels: int = 0, model_channels: int = 384, depth: int = 12, channels_per_head: int = 64,
                 patch_size: int = 2, dropout: float = 0.0, context_dim: int = 0) -> None:
        super().__init__()
        if resolution % patch_size or model_channels % channels_per_head or model_channels % 4:
            raise ValueError(f"DiT needs the image size ({resolution}) divisible by the patch size ({patch_size}) and the width "
                             f"({model_channels}) by 4 and by channels_per_head ({channels_per_head})")
        self.label_dim, self.augment_dim, self.cond_channels, self.context_dim = label_dim, augment_dim, cond_channels, context_dim
        self.patch_size, self.out_channels = patch_size, out_channels
        D = model_channels

        # Conditioning vector c: noise MLP (+ label embedding) (+ augment embedding).
        self.map_noise0 = torch.nn.Linear(NOISE_CHANNELS, D)
        self.map_noise1 = torch.nn.Linear(D, D)
        self.map_label = torch.nn.Linear(label_dim, D, bias=False) if label_dim else None
        self.map_augment = torch.nn.Linear(augment_dim, D, bias=False) if augment_dim else None

        self.patch = torch.nn.Conv2d(in_channels + cond_channels, D, patch_size, stride=patch_size)
        self.blocks = torch.nn.ModuleList(DiTBlock(D, num_heads=D // channels_per_head, dropout=dropout, context_dim=context_dim) for _ in range(depth))
        self.out_norm = torch.nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.out_ada = zero_linear(D, 2 * D)  # c -> shift, scale of the final layer
        self.out = zero_linear(D, patch_size * patch_size * out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """ViT's initialisation (DiT Sec. 3.2), then zero for the adaLN-Zero regressions, augment map and output."""
        zero = {self.out, self.out_ada, *(b.ada for b in self.blocks), *(b.xattn_proj for b in self.blocks)}
        for m in self.modules():
            if isinstance(m, torch.nn.Linear) and m not in zero:
                torch.nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
        torch.nn.init.xavier_uniform_(self.patch.weight.view(self.patch.weight.shape[0], -1))  # as a linear map of a patch
        torch.nn.init.zeros_(self.patch.bias)
        for m in (self.map_noise0, self.map_noise1, self.map_label):
            if m is not None:
                torch.nn.init.normal_(m.weight, std=0.02)
        if self.map_augment is not None:
            torch.nn.init.zeros_(self.map_augment.weight)

    def embedding(self, c_noise: torch.Tensor, labels: torch.Tensor | None, augment_labels: torch.Tensor | None) -> torch.Tensor:
        """Conditioning vector c [N, D] from c_noise [N], labels [N, label_dim] and augment labels (None = zeros)."""
        c = self.map_noise1(F.silu(self.map_noise0(positional_embedding(c_noise, num_channels=NOISE_CHANNELS))))  # [N, D]
        if self.map_label is not None and labels is not None:  # None = the zero one-hot (null label), which adds nothing
            c = c + self.map_label(labels.to(c.dtype))
        if self.map_augment is not None:
            if augment_labels is not None:  # None = zeros = not augmented
                c = c + self.map_augment(augment_labels.to(c.dtype))
        elif augment_labels is not None:
            raise ValueError("augment labels given to a network without augment conditioning; build it with augment_dim > 0")
        return c

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, C_in, H, W], c_noise [N], labels [N, label_dim] or None, augment_labels [N, augment_dim] or None,
        cond [N, cond_channels, H, W] or None (zeros), context [N, L, context_dim] or None (zeros). Returns [N, out_channels, H, W]."""
        N, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"DiT with patch size {p} cannot take a {H}x{W} image: use a size divisible by {p}")
        c = self.embedding(c_noise, labels, augment_labels)  # [N, D]
        ctx = context_tokens(context, context_dim=self.context_dim, batch=N)
        x = concat_cond(x, cond, cond_channels=self.cond_channels)  # [N, C_in + C_cond, H, W]
        x = self.patch(x).flatten(2).transpose(1, 2)  # [N, T, D]
        x = x + sincos_positions_2d(H // p, W // p, dim=x.shape[2], device=x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x, c, ctx)
        shift, scale = self.out_ada(F.silu(c)).to(x.dtype).unsqueeze(1).chunk(2, dim=2)  # each [N, 1, D]
        x = self.out(modulate(self.out_norm(x), shift, scale))  # [N, T, C_out p^2]
        return unpatchify(x, patch=p, height=H, width=W)
