"""Noise-level (σ) discretisations for sampling; a flat module of functions.

Every σ grid is computed in float64 and returned as a decreasing float32 1-D tensor of length
``steps + 1`` that ends in 0, so that any sampler in :mod:`edmkit.diffusion.samplers` can consume any grid.

Symbols:
    σ (sigma)       noise standard deviation in pixel scale, x = y + σ·n (EDM Table 1).
    ρ (rho)         Karras grid exponent; larger ρ spends more steps at low σ (EDM Eq. 5).
    β_t, ᾱ_t        DDPM noise schedule and its cumulative product ᾱ_t = Π_{s≤t}(1 − β_s)
                    (Ho et al. 2020); the scaled variable x_t/√ᾱ_t has σ = √((1 − ᾱ_t)/ᾱ_t).
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Callable, Mapping

import torch
from torch import Tensor

from edmkit.diffusion.precond import ddpm_sigmas  # the one definition of the DDPM noise levels


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _finish(sigmas: Tensor, device: torch.device | str | None) -> Tensor:
    """Append the final σ = 0 and cast the float64 grid to float32 on `device`."""
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(dtype=torch.float32, device=device)


def karras_sigmas(
    steps: int,
    *,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Karras ρ-spaced σ grid (EDM Eq. 5).

    σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i < N, σ_N = 0.

    Args:
        steps: number of sampling steps N (>= 1); with N = 1 the grid is [σ_max, 0].
        sigma_min: smallest nonzero σ.
        sigma_max: largest σ (the sampler's starting noise level).
        rho: grid exponent ρ (> 0).
        device: device of the returned tensor.

    Returns:
        [steps + 1] float32, decreasing, ending in 0.
    """
    _check_steps(steps)
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)  # i/(N−1); [0] when N = 1
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, device)


def loglinear_sigmas(
    steps: int,
    *,
    sigma_min: float,
    sigma_max: float,
    device: torch.device | str | None = None,
) -> Tensor:
    """σ grid uniform in ln σ (the ρ → ∞ limit of EDM Eq. 5).

    Args:
        steps: number of sampling steps N (>= 1).
        sigma_min: smallest nonzero σ.
        sigma_max: largest σ.
        device: device of the returned tensor.

    Returns:
        [steps + 1] float32, decreasing, ending in 0.
    """
    _check_steps(steps)
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64)
    return _finish(log_sigmas.exp(), device)


def vp_sigmas(
    steps: int,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_train_steps: int = 1000,
    spacing: str = "trailing",
    device: torch.device | str | None = None,
) -> Tensor:
    """DDPM/DDIM timestep grid mapped to σ = √((1 − ᾱ_t)/ᾱ_t) (Ho et al. 2020; Song et al. 2021).

    The linear β schedule runs from `beta_start` to `beta_end` over T = `num_train_steps` discrete
    steps t = 0 … T−1. `spacing` picks `steps` evenly spaced timesteps:

    - ``"trailing"`` (default): t = round(T − k·T/steps) − 1, k = 0 … steps−1, so the grid starts at
      the last training step T−1 (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
      Steps are Flawed", Table 2).
    - ``"leading"``: t = k·⌊T/steps⌋ (the original DDIM code), so the grid never reaches T−1 and
      always contains t = 0.
    - ``"linspace"``: t = round(linspace(0, T−1, steps)).

    The last step goes to σ = 0 (DDIM's ᾱ = 1 at the end).

    Returns:
        [steps + 1] float32, decreasing, ending in 0.
    """
    _check_steps(steps)
    if steps > num_train_steps:
        raise ValueError(f"steps ({steps}) must not exceed num_train_steps ({num_train_steps})")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    T = num_train_steps
    train_sigmas = ddpm_sigmas(beta_start=beta_start, beta_end=beta_end, num_steps=T)  # [T] float64
    if spacing == "trailing":
        t = torch.round(torch.arange(steps, dtype=torch.float64) * (-T / steps) + T).long() - 1
    elif spacing == "leading":
        t = torch.arange(steps - 1, -1, -1) * (T // steps)
    elif spacing == "linspace":
        t = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; valid: 'trailing', 'leading', 'linspace'")
    return _finish(train_sigmas[t], device)


SIGMA_SCHEDULES: Mapping[str, Callable[..., Tensor]] = MappingProxyType(
    {"karras": karras_sigmas, "loglinear": loglinear_sigmas, "vp": vp_sigmas}
)


def sigma_schedule(name: str, steps: int, **kwargs) -> Tensor:
    """σ grid by registry name (``"karras"``, ``"loglinear"``, ``"vp"``).

    Args:
        name: key of :data:`SIGMA_SCHEDULES`.
        steps: number of sampling steps (>= 1).
        **kwargs: keyword hyperparameters of the chosen schedule.

    Returns:
        [steps + 1] float32, decreasing, ending in 0.
    """
    if name not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigma schedule {name!r}; valid: {', '.join(sorted(SIGMA_SCHEDULES))}")
    return SIGMA_SCHEDULES[name](steps, **kwargs)


# --- learning-rate schedules (time in images) ---------------------------------------------------


def learning_rate(nimg: int, *, lr: float, ref_nimg: int, warmup_nimg: int = 0) -> float:
    """Inverse-square-root decay with linear warm-up (EDM2 Eq. 67): lr / sqrt(max(t / t_ref, 1)) * min(t / t_warmup, 1).

    ``ref_nimg = 0`` disables the decay (constant lr, as in EDM and EDM2 configs A-D).
    """
    alpha = lr
    if ref_nimg > 0:
        alpha /= math.sqrt(max(nimg / ref_nimg, 1.0))
    if warmup_nimg > 0:
        alpha *= min(nimg / warmup_nimg, 1.0)
    return alpha
