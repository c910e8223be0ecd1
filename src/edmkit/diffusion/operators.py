"""Measurement operators A and their pseudo-inverses A⁺ for inverse problems ([N, C, H, W] in, [N, C, h, w] out).

Inpainting: A = A⁺ = multiplication by the 0/1 mask (1 = known pixel). Super-resolution: A = k×k box average
(downsample), A⁺ = nearest upsample, so A(A⁺(v)) = v and P = A⁺A is the box low-pass. Used by
:mod:`edmkit.diffusion.inverse` (restoration) and the super-resolution cascade.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Operator = Callable[[Tensor], Tensor]


def check_mask(mask: Tensor, image: Tensor) -> Tensor:
    """Validate an inpainting mask against an image and return it as float32 0/1 (1 = known).

    Args:
        mask: [H, W], [1|C, H, W] or [N|1, 1|C, H, W]; nonzero = known pixel.
        image: [N, C, H, W] image it applies to.

    Returns:
        float32 [N|1, 1|C, H, W] mask of 0s and 1s on the image's device.
    """
    m = mask.reshape(1, 1, *mask.shape) if mask.ndim == 2 else mask.unsqueeze(0) if mask.ndim == 3 else mask
    if m.ndim != 4 or image.ndim != 4:
        raise ValueError(f"mask must be [H, W], [C, H, W] or [N, C, H, W] and image [N, C, H, W]; got {tuple(mask.shape)}, {tuple(image.shape)}")
    if m.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask size {m.shape[-1]}x{m.shape[-2]} does not match image size {image.shape[-1]}x{image.shape[-2]}")
    if m.shape[1] not in (1, image.shape[1]):
        raise ValueError(f"mask has {m.shape[1]} channels; the image has {image.shape[1]} (give 1 or {image.shape[1]})")
    if m.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"mask batch {m.shape[0]} does not match image batch {image.shape[0]}")
    m = (m != 0).to(device=image.device, dtype=torch.float32)
    known = m.flatten(1).sum(1)  # [N|1]
    if bool((known == 0).any()):
        raise ValueError("the mask has no known pixels (all zero): nothing to condition on")
    return m


def mask_operator(mask: Tensor) -> Operator:
    """Inpainting measurement A(x) = m ⊙ x (A = A⁺ = A^T, a projection)."""
    return lambda x: mask * x


def check_scale(resolution: int, scale: int) -> None:
    """Raise ValueError unless `scale` >= 1 divides `resolution` (box down/up sampling needs it)."""
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"super-resolution scale must be an integer >= 1, got {scale!r}")
    if resolution % scale != 0:
        raise ValueError(f"scale {scale} does not divide the image size {resolution}")


def downsample(x: Tensor, *, scale: int) -> Tensor:
    """Box-filter downsampling A: mean of each scale×scale block, [N, C, H, W] -> [N, C, H/s, W/s]."""
    check_scale(x.shape[-1], scale)
    check_scale(x.shape[-2], scale)
    return F.avg_pool2d(x, scale)


def upsample(x: Tensor, *, scale: int) -> Tensor:
    """Nearest upsampling A⁺ (the pseudo-inverse of box downsampling): [N, C, h, w] -> [N, C, h·s, w·s]."""
    return x.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def low_pass(x: Tensor, *, scale: int) -> Tensor:
    """ILVR's low-pass filter LP = A⁺A: block means spread back over each block (Choi et al. 2021, Eq. 8)."""
    return upsample(downsample(x, scale=scale), scale=scale)


def gaussian_blur_operator(*, std: float, size: int | None = None) -> Operator:
    """Gaussian blur A(x) = k * x per channel, zero padding (a differentiable operator for DPS).

    Args:
        std: kernel standard deviation in pixels (> 0).
        size: odd kernel width; default 2·ceil(3·std) + 1.
    """
    if std <= 0:
        raise ValueError(f"blur std must be > 0, got {std}")
    size = 2 * math.ceil(3 * std) + 1 if size is None else size
    if size < 1 or size % 2 == 0:
        raise ValueError(f"blur kernel size must be odd and >= 1, got {size}")
    t = torch.arange(size, dtype=torch.float32) - size // 2
    k1 = torch.exp(-0.5 * (t / std) ** 2)
    k2 = torch.outer(k1, k1) / k1.sum() ** 2  # [size, size], sums to 1

    def blur(x: Tensor) -> Tensor:
        c = x.shape[1]
        weight = k2.to(x).expand(c, 1, size, size)  # depthwise [C, 1, k, k]
        return F.conv2d(x, weight, padding=size // 2, groups=c)

    return blur


def measurement_error(x: Tensor, *, y: Tensor, operator: Operator) -> Tensor:
    """‖A(x) − y‖ per sample: [N, C, H, W] -> [N]."""
    return (operator(x.float()) - y.to(torch.float32)).flatten(1).norm(dim=1)
