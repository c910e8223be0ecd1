"""Cross-attention to a context token sequence (issue 27 item 3), shared by DiT and the convolutional U-Nets.

Symbols: ``x`` the network's tokens [N, T, D] (or feature map [N, C, H, W], T = H W pixels, D = C), ``context`` [N, L,
D_ctx] the conditioning token sequence (e.g. a text encoder's output), projected to keys and values of the block's width.
Attention is softmax(q k^T / sqrt(d)) v per head (Vaswani et al. 2017), queries from ``x``, keys and values from the context,
as in latent diffusion's and PixArt-alpha's text conditioning. The EDM2 U-Net (magnitude-preserving) and HDiT (cosine
attention) keep their own forms in ``unet.py`` and ``hdit.py``; the null-context rule is ``unet.context_tokens``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_attention(q: torch.Tensor, kv: torch.Tensor, *, num_heads: int) -> torch.Tensor:
    """Multi-head cross-attention softmax(q k^T / sqrt(d)) v from T tokens to L context tokens: q [N, T, D], kv [N, L, 2D] -> [N, T, D]."""
    N, T, D = q.shape
    q = q.reshape(N, T, num_heads, D // num_heads).transpose(1, 2).contiguous()  # [N, heads, T, d]
    k, v = kv.reshape(N, kv.shape[1], 2, num_heads, D // num_heads).permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # [N, heads, L, d]
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, T, D)


class FeatureMapCrossAttention(torch.nn.Module):
    """Pre-norm cross-attention from the pixels of a feature map to context tokens, added as a residual branch
    (DDPM++ / NCSN++ and ADM, after each self-attention): x + proj(attn(q(norm(x)), kv(context))), [N, C, H, W].

    ``norm`` is the network's own normalisation layer for ``channels``. q and kv are linear maps with PyTorch's default
    init; the output projection starts at exactly zero, so the network starts as the context-free one. A null context
    row (zeros, ``keep`` False) returns x exactly, while the branch still runs (DDP sees every parameter).
    """

    def __init__(self, channels: int, context_dim: int, *, num_heads: int, norm: torch.nn.Module) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = norm
        self.q = torch.nn.Linear(channels, channels)
        self.kv = torch.nn.Linear(context_dim, 2 * channels)  # context tokens -> keys, values of the block's width
        self.proj = torch.nn.Linear(channels, channels)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [N, C, H, W], context (tokens [N, L, D_ctx], keep [N] bool) from ``unet.context_tokens`` -> [N, C, H, W]."""
        tokens, keep = context
        N, C, H, W = x.shape
        q = self.q(self.norm(x).flatten(2).transpose(1, 2))  # [N, HW, C]
        y = self.proj(cross_attention(q, self.kv(tokens.to(q.dtype)), num_heads=self.num_heads))  # [N, HW, C]
        y = y.transpose(1, 2).reshape(N, C, H, W).to(x.dtype)
        return torch.where(keep[:, None, None, None], x + y, x)  # null rows: exactly the network without context
