"""Cascade super-resolution stage: a denoiser conditioned on a low-resolution image (SR3; cascaded diffusion).

Symbols (pixel scale, [-1, 1]):
    y          the high-resolution training image [N, C, H, W].
    s          the scale factor (``train.sr_scale``).
    z          the conditioning image: A⁺A y, y box-downsampled by s and nearest-upsampled back to H x W
               (``edmkit.diffusion.operators.downsample`` / ``upsample``, the same operators as zero-shot SR).
    σ_aug      the noise-conditioning augmentation level: z is fed as z + σ_aug ε (Ho et al. 2022, "Cascaded
               Diffusion Models", Sec. 3.2; Saharia et al. 2022, Imagen Sec. 2.5). Training draws
               σ_aug ~ U[0, σ_aug,max] per image; sampling fixes it (``train.sr_aug_sample``).

How the network sees them (``Denoiser.forward(..., cond=z, augment_labels=...)``):
    z          concatenated to the input as ``network.cond_channels`` extra channels (Saharia et al. 2021, SR3
               Sec. 2.4), scaled by 1 / σ_data.
    σ_aug      the last column of the augment labels, σ_aug / σ_aug,max in [0, 1]: it reuses the augment-label
               embedding (EDM App. C), whose zero row means "not augmented", here a clean conditioning image.
               With non-leaky augmentation on as well, the first ``augment.AUGMENT_DIM`` columns are its
               parameters (zeros at sampling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from edmkit.diffusion.operators import check_scale, downsample, upsample
from edmkit.diffusion.precond import per_example
from edmkit.diffusion.samplers import with_randn
from edmkit.presets import SR_AUGMENT_DIM

if TYPE_CHECKING:
    from edmkit.config import ExperimentConfig
    from edmkit.diffusion.samplers import Randn


def low_res_condition(y: Tensor, *, scale: int) -> Tensor:
    """Conditioning image z = A⁺A y: box downsample by ``scale``, nearest upsample back. [N, C, H, W] -> [N, C, H, W]."""
    return upsample(downsample(y, scale=scale), scale=scale)


def noise_augment(z: Tensor, *, sigma_aug: Tensor, noise: Tensor) -> Tensor:
    """Noise-conditioning augmentation z + σ_aug ε (Ho et al. 2022, Cascaded Diffusion Models, Sec. 3.2).

    Args:
        z: [N, C, H, W] conditioning image.
        sigma_aug: [N] noise levels.
        noise: [N, C, H, W] unit Gaussian ε.
    """
    return z + per_example(sigma_aug, z).to(z.dtype) * noise


def sample_aug_level(n: int, *, sigma_max: float, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """Training augmentation levels σ_aug ~ U[0, σ_max] (Imagen draws its level uniformly too). Returns [n] float32."""
    return torch.rand(n, generator=generator, device=device) * sigma_max


def aug_level_label(sigma_aug: Tensor, *, sigma_max: float) -> Tensor:
    """The σ_aug augment-label column σ_aug / σ_max in [0, 1] (0 = clean conditioning). [N] -> [N, 1]."""
    return (sigma_aug / sigma_max if sigma_max > 0 else torch.zeros_like(sigma_aug)).reshape(-1, 1).to(torch.float32)


def sr_augment_labels(sigma_aug: Tensor, *, sigma_max: float, augment_labels: Tensor | None = None) -> Tensor:
    """Augment labels of an SR network: the non-leaky augmentation's (if any) then the σ_aug column. Returns [N, A]."""
    level = aug_level_label(sigma_aug, sigma_max=sigma_max).to(sigma_aug.device)
    return level if augment_labels is None else torch.cat([augment_labels.to(level.dtype), level], dim=1)


def training_condition(y: Tensor, *, scale: int, sigma_max: float, generator: torch.Generator, batch: int, rows: Tensor,
                       augment_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Noise-augmented conditioning images and augment labels for this rank's ``rows`` of a global batch.

    σ_aug [batch] and ε [batch, C, H, W] are drawn for the whole global batch from ``generator`` (its own, derived from
    (seed, step)), then the rows are kept: the same numbers whatever the number of processes, and resume stays exact.

    Args:
        y: [n, C, H, W] this rank's (possibly augmented) training images.
        rows: [n] int64 rows of the global batch.
        augment_labels: [n, AUGMENT_DIM] non-leaky augmentation labels or None.

    Returns:
        cond [n, C, H, W], augment labels [n, A].
    """
    sigma_aug = sample_aug_level(batch, sigma_max=sigma_max, generator=generator, device=y.device)[rows]
    eps = torch.randn((batch, *y.shape[1:]), generator=generator, device=y.device)[rows]
    cond = noise_augment(low_res_condition(y, scale=scale), sigma_aug=sigma_aug, noise=eps)
    return cond, sr_augment_labels(sigma_aug, sigma_max=sigma_max, augment_labels=augment_labels)


def cascade_denoiser(denoiser: Callable[..., Tensor], low_res: Tensor, *, scale: int, sigma_aug: float, sigma_max: float,
                     augment_dim: int, noise: Tensor | None = None) -> Callable[..., Tensor]:
    """D(x; σ | z) with the low-res image fixed as conditioning at augmentation level ``sigma_aug`` (fixed at sampling).

    Args:
        denoiser: an SR ``Denoiser`` (takes ``cond`` and ``augment_labels``).
        low_res: [N, C, H/s, W/s] low-resolution images in [-1, 1].
        scale: s.
        sigma_aug: the fixed σ_aug (0 = clean conditioning).
        sigma_max: the training maximum ``train.sr_aug_max`` (normalizes the label).
        augment_dim: the network's augment-label width (non-leaky columns stay zero: not augmented).
        noise: [N, C, H, W] unit Gaussian ε for the augmentation (needed when sigma_aug > 0).

    Returns:
        a denoiser ``(x, sigma, labels=None, **kw) -> [N, C, H, W]`` for any sampler.
    """
    z = upsample(low_res.to(torch.float32), scale=scale)  # [N, C, H, W]
    level = torch.full((z.shape[0],), float(sigma_aug), device=z.device)
    if sigma_aug > 0:
        if noise is None:
            raise ValueError("a noise-augmented conditioning image (sigma_aug > 0) needs its noise")
        z = noise_augment(z, sigma_aug=level, noise=noise.to(z))
    labels_aug = torch.zeros(z.shape[0], augment_dim - SR_AUGMENT_DIM, device=z.device) if augment_dim > SR_AUGMENT_DIM else None
    aug = sr_augment_labels(level, sigma_max=sigma_max, augment_labels=labels_aug)

    def conditioned(x: Tensor, sigma: Tensor, labels: Tensor | None = None, **kw) -> Tensor:
        return denoiser(x, sigma, labels, cond=z, augment_labels=aug, **kw)

    return conditioned


def super_resolve(denoiser: Callable[..., Tensor], low_res: Tensor, *, cfg: ExperimentConfig, sample: Callable[..., Tensor],
                  sigmas: Tensor, noise: Tensor, sigma_aug: float | None = None, aug_noise: Tensor | None = None,
                  labels: Tensor | None = None, randn: Randn | None = None, **sampler_kw) -> Tensor:
    """Sample the cascade SR stage p(y | low-res) with any sampler.

    Args:
        denoiser: the SR network of config ``cfg`` (``train.task == "sr"``).
        low_res: [N, C, H/s, W/s] in [-1, 1], s = ``cfg.train.sr_scale``.
        sample: a sampler of the :mod:`edmkit.diffusion.samplers` contract.
        sigmas: [steps + 1] decreasing grid ending in 0.
        noise: [N, C, H, W] unit Gaussian start noise.
        sigma_aug: fixed augmentation level (default ``cfg.train.sr_aug_sample``).
        aug_noise: [N, C, H, W] ε of the augmentation (default: drawn with ``randn`` or ``torch.randn_like(noise)``).

    Returns:
        [N, C, H, W] float32 high-resolution images.
    """
    t, n = cfg.train, cfg.network
    if t.task != "sr":
        raise ValueError("this network is not a super-resolution model (train.task is not 'sr'); use a zero-shot method (ilvr, ccdf, dps)")
    s = t.sr_scale
    check_scale(noise.shape[-1], s)
    if low_res.shape[1] != noise.shape[1] or low_res.shape[-1] * s != noise.shape[-1] or low_res.shape[-2] * s != noise.shape[-2]:
        raise ValueError(f"low-res image size {low_res.shape[-1]}x{low_res.shape[-2]} times the model's scale {s} does not give its "
                         f"size {noise.shape[-1]}x{noise.shape[-2]} (or channels differ)")
    sigma_aug = t.sr_aug_sample if sigma_aug is None else sigma_aug
    if sigma_aug < 0:
        raise ValueError(f"sigma_aug must be >= 0, got {sigma_aug}")
    if aug_noise is None and sigma_aug > 0:
        aug_noise = randn(noise) if randn is not None else torch.randn_like(noise)  # Randn contract: noise shaped like its argument
    net = cascade_denoiser(denoiser, low_res.to(noise.device), scale=s, sigma_aug=sigma_aug, sigma_max=t.sr_aug_max,
                           augment_dim=n.augment_dim, noise=aug_noise)
    with torch.no_grad():
        return sample(net, noise, sigmas, labels=labels, **with_randn(sample, sampler_kw, randn))
