"""Non-leaky geometric augmentation (EDM App. C; transforms and ranges as in StyleGAN2-ADA, arXiv 2006.06676 App. B).

Each training image goes through a pipeline of transforms, each applied with probability ``p``; the
parameters of what was applied are returned as *augment labels* that the network receives as
conditioning. At sampling time the labels are zero ("no augmentation"), so the augmented
distribution does not leak into the generated images (EDM Sec. 5 / App. C).

Pipeline, in order, and the augment-label columns (all zero when a transform is not applied):

    column  transform                  parameter                                   exact?
    0       x-flip                     1 if mirrored left-right (coin flip when selected)  yes
    1, 2    integer translation        (tx, ty): shift in pixels / image size, |t| <= 1/8  yes (index map)
    3       isotropic scaling          log2 s, s ~ 2^N(0, 0.2^2)                  no (bilinear)
    4, 5    rotation                   (cos theta - 1, sin theta), theta ~ U(-pi, pi)  no (bilinear)
    6       anisotropic scaling        log2 a: x scaled by a, y by 1 / a, a ~ 2^N(0, 0.2^2)  no (bilinear)

Flips and integer translations move whole pixels (exact; translation reflects at the border); the
three geometric transforms are composed into one affine map and resampled once with
``affine_grid`` / ``grid_sample`` (bilinear, reflection padding). Images without any geometric
transform are never resampled, so p = 0 returns the input bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TRANSFORMS = ("xflip", "translate", "scale", "rotate", "aniso")
AUGMENT_DIM = 7  # columns of the augment labels (table above)
TRANSLATE_MAX = 0.125  # integer translation: up to 1/8 of the image size (ADA)
SCALE_STD = 0.2  # std of log2 of the isotropic / anisotropic scale factors (ADA)


def augment_params(n: int, *, p: float, generator: torch.Generator, device: torch.device | str = "cpu",
                   transforms: tuple[str, ...] = TRANSFORMS, resolution: int | None = None) -> torch.Tensor:
    """Draw the augment labels of ``n`` images (EDM App. C): which transforms apply, and their parameters.

    The same random numbers are drawn whatever ``p`` and ``transforms`` are (a fixed count per call), so
    the draws of a generator stay aligned across settings.

    Args:
        n: number of images.
        p: probability in [0, 1] that each transform is applied (independently).
        generator: source of all random numbers.
        device: where the labels live.
        transforms: the subset of ``TRANSFORMS`` that may be applied.
        resolution: image size in pixels; integer translations are rounded to whole pixels of it
            (None: the translation columns are left unrounded, for ``apply_augment`` to round).

    Returns:
        float32 [n, AUGMENT_DIM] augment labels (see the module docstring).
    """
    if not 0 <= p <= 1:
        raise ValueError(f"augmentation probability must be in [0, 1], got {p}")
    unknown = set(transforms) - set(TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown augmentation {', '.join(sorted(unknown))}; valid: {', '.join(TRANSFORMS)}")
    kw = dict(generator=generator, device=device, dtype=torch.float32)
    selected = torch.rand(n, len(TRANSFORMS), **kw) < p  # [n, 5]
    selected &= torch.tensor([t in transforms for t in TRANSFORMS], device=device)
    coin = torch.rand(n, **kw) < 0.5
    shift = (torch.rand(n, 2, **kw) * 2 - 1) * TRANSLATE_MAX  # [n, 2]
    log2_scale = torch.randn(n, **kw) * SCALE_STD
    theta = (torch.rand(n, **kw) * 2 - 1) * math.pi
    log2_aniso = torch.randn(n, **kw) * SCALE_STD
    if resolution is not None:
        shift = (shift * resolution).round() / resolution
    on = selected.to(torch.float32)
    return torch.stack([
        on[:, 0] * coin.to(torch.float32),
        on[:, 1] * shift[:, 0], on[:, 1] * shift[:, 1],
        on[:, 2] * log2_scale,
        on[:, 3] * (torch.cos(theta) - 1), on[:, 3] * torch.sin(theta),
        on[:, 4] * log2_aniso,
    ], dim=1)


def reflect_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """Mirror integer pixel positions into [0, size) without repeating the edge pixel (``numpy.pad(mode="reflect")``)."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    m = index.remainder(period)
    return torch.where(m >= size, period - m, m)


def translate_integer(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Shift each image by whole pixels, reflecting at the border (exact; no resampling).

    Args:
        images: [N, C, H, W].
        dx, dy: int64 [N] shifts in pixels (positive: content moves right / down).

    Returns:
        [N, C, H, W]: ``out[..., y, x] = images[..., reflect(y - dy), reflect(x - dx)]``.
    """
    N, C, H, W = images.shape
    cols = reflect_index(torch.arange(W, device=images.device)[None, :] - dx[:, None], W)  # [N, W]
    rows = reflect_index(torch.arange(H, device=images.device)[None, :] - dy[:, None], H)  # [N, H]
    out = images.gather(3, cols[:, None, None, :].expand(N, C, H, W))
    return out.gather(2, rows[:, None, :, None].expand(N, C, H, W))


def geometric_matrix(params: torch.Tensor) -> torch.Tensor:
    """The 2x2 map from output to input coordinates of scaling, rotation and anisotropic scaling: [N, 7] -> [N, 2, 2].

    The content is transformed by T = S_iso R(theta) S_aniso; sampling needs its inverse,
    S_aniso^-1 R(-theta) S_iso^-1 (normalized coordinates, square images).
    """
    s = torch.exp2(params[:, 3])  # isotropic scale
    cos, sin = params[:, 4] + 1, params[:, 5]
    a = torch.exp2(params[:, 6])  # anisotropic: x * a, y / a
    rot_inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # R(-theta) [N, 2, 2]
    aniso_inv = torch.diag_embed(torch.stack([1 / a, a], -1))
    return aniso_inv @ rot_inv / s[:, None, None]


def apply_augment(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply the transforms that augment labels describe (EDM App. C): x-flip, integer translation, then one resampling.

    Args:
        images: float [N, C, H, W] (square).
        params: [N, AUGMENT_DIM] augment labels from ``augment_params``.

    Returns:
        float [N, C, H, W]; rows with all-zero labels are returned unchanged.
    """
    N, C, H, W = images.shape
    if params.shape != (N, AUGMENT_DIM):
        raise ValueError(f"augment labels must be [{N}, {AUGMENT_DIM}], got {tuple(params.shape)}")
    params = params.to(device=images.device, dtype=torch.float32)
    flip = params[:, 0] > 0.5
    x = torch.where(flip[:, None, None, None], images.flip(3), images)
    dx, dy = (params[:, 1] * W).round().long(), (params[:, 2] * H).round().long()
    if bool((dx != 0).any() or (dy != 0).any()):
        x = translate_integer(x, dx, dy)
    geometric = (params[:, 3:] != 0).any(dim=1)  # [N]: rows needing resampling
    if bool(geometric.any()):
        theta = torch.cat([geometric_matrix(params[geometric]), torch.zeros(int(geometric.sum()), 2, 1, device=x.device)], dim=2)
        part = x[geometric]
        grid = F.affine_grid(theta.to(part.dtype), list(part.shape), align_corners=False)
        x = x.clone()
        x[geometric] = F.grid_sample(part, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return x


def augment(images: torch.Tensor, *, p: float, generator: torch.Generator,
            transforms: tuple[str, ...] = TRANSFORMS) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-leaky augmentation (EDM App. C): each transform with probability ``p``; returns images and their augment labels.

    Args:
        images: float [N, C, H, W] square images (any range; EDM uses [-1, 1]).
        p: probability in [0, 1] of each transform.
        generator: source of the random parameters (on the images' device).
        transforms: which of ``TRANSFORMS`` may be applied.

    Returns:
        (augmented [N, C, H, W], augment labels float32 [N, AUGMENT_DIM]); p = 0 gives the input and zero labels.
    """
    params = augment_params(images.shape[0], p=p, generator=generator, device=images.device, transforms=transforms,
                            resolution=images.shape[-1])
    return apply_augment(images, params), params
