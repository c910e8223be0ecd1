"""Zero-shot inverse problems (inpainting, super-resolution) as conditioning of any sampler.

Everything here is a denoiser combinator (as in :mod:`edmkit.diffusion.guidance`) or a thin wrapper around the
sampler contract ``sample(denoiser, noise, sigmas, *, labels, randn, callback)`` of
:mod:`edmkit.diffusion.samplers`, so every sampler (Euler, Heun, DDIM, DDPM, DPM-Solver++) works unchanged.

Symbols (pixel scale, x = y + σ·n):
    A, A⁺         a linear measurement operator and its pseudo-inverse, with A(A⁺(v)) = v.
                  Inpainting: A = A⁺ = multiplication by the 0/1 mask (1 = known pixel).
                  Super-resolution: A = k×k box average (downsample), A⁺ = nearest upsample.
    P = A⁺A       the orthogonal projection onto what the measurement determines (the known pixels,
                  or the box low-pass LP for super-resolution).
    y             the measurement, shaped like A's output (the masked image, the low-res image).
    ζ             reconstruction-guidance / DPS step size.

Replacement (Song et al. 2021, App. I.2; RePaint, Lugmayr et al. 2022) and ILVR (Choi et al. 2021)
set P(x) to P(y + σ·ε) after each step. Here both are one combinator, :func:`projected`, that
replaces the measured part of the denoiser output, D' = D − P(D) + A⁺(y) (the range–null-space
split of DDNM, Wang et al. 2023). Exactness: every sampler's update is an affine combination
x_{i+1} = D' + c·(x_i − D') (+ fresh noise), so P(x_i) − A⁺(y) is only rescaled (plus noise in P's
range): with :func:`measurement_noise` at the start, P(x_i) = A⁺(y) + σ_i·P(ε_i) at every step,
with ε_i unit Gaussian, i.e. the replacement rule holds exactly; deterministic samplers reuse the
initial ε instead of drawing a fresh one per step (which keeps the known pixels' noise consistent
with the rest of the image). On the final step to σ = 0 every sampler returns D', so P(x) = A⁺(y)
exactly: known pixels equal the measurement, and the ILVR output's low-pass equals y's.

CCDF (Chung et al. 2022) starts from a noised estimate at an intermediate σ on a truncated grid
(:func:`truncate_sigmas`, :func:`start_noise`); RePaint's resampling is :func:`sample_resampled`.
Reconstruction guidance (Ho et al. 2022, Eq. 7) / DPS (Chung et al. 2023) is
:func:`reconstruction_guided`, D' = D − ζ·∇_x‖A(D(x)) − y‖², for any differentiable A.
Manifold-constrained gradient (MCG, Chung et al. 2022, "Improving Diffusion Models for Inverse Problems using Manifold
Constraints") is the two composed, :func:`manifold_constrained`: the gradient correction through the denoiser, then
the replacement, so the measured part stays exact and the correction moves only the unmeasured part.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from edmkit.diffusion.operators import Operator, check_mask, check_scale, downsample, low_pass, mask_operator, upsample
from edmkit.diffusion.samplers import Callback, Denoiser, Randn, with_randn


def projected(denoiser: Denoiser, *, y_full: Tensor, project: Operator) -> Denoiser:
    """Replace the measured part of D: D' = D − P(D) + A⁺(y) (replacement / ILVR; DDNM's range-null split).

    With the exact inputs of :func:`measurement_noise` this realises "after each step, P(x) ← P(y + σ·ε)"
    exactly for every sampler (see the module docstring).

    Args:
        denoiser: D(x; σ) callable.
        y_full: [N|1, C, H, W] A⁺(y): the masked image (inpainting) or the upsampled low-res image (SR).
        project: P = A⁺A, e.g. ``mask_operator(m)`` or ``partial(low_pass, scale=s)``.

    Returns:
        Denoiser returning float32 [N, C, H, W].
    """

    def denoise(x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        d = denoiser(x, sigma, labels).float()
        return d - project(d) + y_full.to(d)

    return denoise


def measurement_noise(noise: Tensor, *, y_full: Tensor, sigma_start: float) -> Tensor:
    """Unit noise whose start x_0 = σ_0·noise' has P(x_0) = A⁺(y) + σ_0·P(ε): noise' = ε + A⁺(y)/σ_0.

    Also CCDF's start (Chung et al. 2022): x_0 = x̂ + σ_0·ε for an estimate x̂ (pass it as `y_full`).

    Args:
        noise: [N, C, H, W] unit Gaussian ε.
        y_full: [N|1, C, H, W] A⁺(y) (or CCDF's initial estimate x̂).
        sigma_start: σ_0, the first value of the grid the sampler gets.

    Returns:
        [N, C, H, W] the ``noise`` argument to pass to the sampler.
    """
    if not sigma_start > 0:
        raise ValueError(f"sigma_start must be > 0, got {sigma_start}")
    return noise + y_full.to(noise) / sigma_start


def truncate_sigmas(sigmas: Tensor, *, sigma_start: float) -> Tensor:
    """CCDF's shortened grid (Chung et al. 2022): σ_start followed by the grid values below it.

    Args:
        sigmas: [steps + 1] decreasing grid ending in 0.
        sigma_start: where the reverse process starts, 0 < σ_start <= sigmas[0].

    Returns:
        [k + 1] decreasing grid starting at σ_start, with fewer steps than `sigmas`.
    """
    if not 0 < sigma_start <= float(sigmas[0]):
        raise ValueError(f"sigma_start must be in (0, {float(sigmas[0]):g}], got {sigma_start}")
    below = sigmas[sigmas < sigma_start]
    if below.numel() == 0:
        raise ValueError("the grid has no values below sigma_start")
    return torch.cat([torch.tensor([sigma_start], dtype=sigmas.dtype, device=sigmas.device), below])


def sample_resampled(
    sample: Callable[..., Tensor],
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor,
    *,
    resample: int,
    labels: Tensor | None = None,
    randn: Randn | None = None,
    callback: Callback | None = None,
    **sampler_kw,
) -> Tensor:
    """RePaint-style resampling (Lugmayr et al. 2022, Algorithm 1) around any sampler.

    Each step σ_i → σ_{i+1} (σ_{i+1} > 0) is taken `resample` times; between repeats x is
    re-noised back to σ_i with x ← x + √(σ_i² − σ_{i+1}²)·z, so the conditioned denoiser (e.g.
    :func:`projected`) can harmonise the unknown region. Steps run one at a time on the 2-point grid
    [σ_i, σ_{i+1}], so multistep solvers (DPM-Solver++(2M)) become first order and Heun's churn
    γ = S_churn/steps sees steps = 1; resample = 1 is still the plain step-by-step sampler.

    Args:
        sample: a sampler of the :mod:`edmkit.diffusion.samplers` contract.
        denoiser: D(x; σ) callable (usually conditioned).
        noise: [N, C, H, W] unit noise (the sampler starts at σ_0·noise).
        sigmas: [steps + 1] decreasing grid.
        resample: r >= 1 repeats per step.
        labels: [N, L] conditioning or None.
        randn: noise source (re-noising and stochastic samplers); default torch.randn_like.
        callback: called after each step's last repeat with the sampler's dict (i = step index).
        **sampler_kw: passed to `sample`.

    Returns:
        [N, C, H, W] float32 sample at σ = sigmas[-1].
    """
    if not isinstance(resample, int) or resample < 1:
        raise ValueError(f"resample must be an integer >= 1, got {resample!r}")
    noise_fn = torch.randn_like if randn is None else randn
    sampler_kw = with_randn(sample, sampler_kw, randn)
    s = sigmas.detach().double().cpu().tolist()
    x = noise.to(torch.float32) * s[0]
    for i in range(len(s) - 1):
        repeats = resample if s[i + 1] > 0 else 1
        for r in range(repeats):
            last = r == repeats - 1
            step_cb = (lambda info, i=i: callback(dict(info, i=i))) if callback is not None and last else None
            x = sample(denoiser, x / s[i], sigmas[i:i + 2], labels=labels, callback=step_cb, **sampler_kw)
            if not last:  # RePaint's jump back: forward-diffuse from σ_{i+1} to σ_i
                x = x + math.sqrt(s[i] ** 2 - s[i + 1] ** 2) * noise_fn(x)
    return x


def reconstruction_guided(
    denoiser: Denoiser, *, y: Tensor, operator: Operator, zeta: float, normalize: bool = False
) -> Denoiser:
    """Reconstruction guidance (Ho et al. 2022, Eq. 7) / DPS (Chung et al. 2023, Alg. 1) as a combinator.

    D'(x) = D(x) − ζ·∇_x‖A(D(x)) − y‖² per sample; with ``normalize`` the step is ζ/‖A(D(x)) − y‖
    (DPS's step-size rule). Needs autograd through the denoiser: call the sampler with grad mode
    allowed (not under ``torch.inference_mode()``); this combinator enables grad itself and returns
    a detached result, so ``torch.no_grad()`` around the sampler is fine.

    Args:
        denoiser: D(x; σ) callable (differentiable in x).
        y: [N|1, ...] measurement, shaped like A's output.
        operator: differentiable A, e.g. ``mask_operator(m)``, ``partial(downsample, scale=2)``,
            ``gaussian_blur_operator(std=1)``.
        zeta: step size ζ >= 0 (0 returns D unchanged).
        normalize: divide ζ by the residual norm per sample.

    Returns:
        Denoiser returning detached float32 [N, C, H, W].
    """
    if zeta < 0:
        raise ValueError(f"zeta must be >= 0, got {zeta}")

    def denoise(x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        if torch.is_inference_mode_enabled():
            raise ValueError("reconstruction guidance / DPS needs gradients: do not sample under torch.inference_mode()")
        with torch.enable_grad():
            x_in = x.detach().float().requires_grad_(True)
            d = denoiser(x_in, sigma, labels).float()
            residual = (operator(d) - y.to(d)).flatten(1).square().sum(1)  # [N] ‖A(D) − y‖²
            (grad,) = torch.autograd.grad(residual.sum(), x_in)
        step = zeta / residual.detach().sqrt().clamp(min=1e-12) if normalize else torch.full_like(residual, zeta)
        return (d - step.reshape(-1, *([1] * (d.ndim - 1))) * grad).detach()

    return denoise


def manifold_constrained(
    denoiser: Denoiser, *, y: Tensor, operator: Operator, y_full: Tensor, project: Operator, alpha: float, normalize: bool = False
) -> Denoiser:
    """Manifold-constrained gradient (MCG; Chung et al. 2022, Sec. 3 and their Algorithm 1) as a combinator.

    D'(x) = Π(D(x) − α·∇_x‖W(y − A(D(x)))‖²), Π(v) = v − P(v) + A⁺(y): the MCG correction (W = I, a noise-free
    measurement) through the denoiser's Jacobian, then the replacement / POCS step of :func:`projected`. The paper
    subtracts the gradient from x_{i−1}; here it enters D, which a sampler step x_{i+1} = D' + c·(x_i − D') carries
    over with the factor 1 − c (as :func:`reconstruction_guided`). α = 0 is exactly :func:`projected` (replacement
    or ILVR); the gradient's part in P's range is overwritten by Π, so only the unmeasured pixels move.

    Args:
        denoiser: D(x; σ) callable (differentiable in x).
        y: [N|1, ...] measurement, shaped like A's output.
        operator: differentiable A.
        y_full: A⁺(y), [N|1, C, H, W].
        project: P = A⁺A.
        alpha: gradient step α >= 0.
        normalize: divide α by the residual norm per sample (the paper's α/‖y − A x̂₀‖ choice).

    Returns:
        Denoiser returning detached float32 [N, C, H, W].
    """
    guided = reconstruction_guided(denoiser, y=y, operator=operator, zeta=alpha, normalize=normalize)
    return projected(guided, y_full=y_full, project=project)


METHODS = {"inpaint": ("replace", "dps", "mcg"), "sr": ("ilvr", "ccdf", "dps", "mcg")}


def restore(
    denoiser: Denoiser,
    y: Tensor,
    *,
    task: str,
    sample: Callable[..., Tensor],
    sigmas: Tensor,
    noise: Tensor,
    mask: Tensor | None = None,
    scale: int = 2,
    method: str | None = None,
    labels: Tensor | None = None,
    randn: Randn | None = None,
    resample: int = 1,
    zeta: float = 1.0,
    sigma_start: float = 1.0,
    **sampler_kw,
) -> Tensor:
    """Inpaint or super-resolve with any sampler: the task/method switch over this module's tools.

    Methods: inpaint ``replace`` (:func:`projected` with the mask, optional RePaint resampling) or
    ``dps``; sr ``ilvr`` (:func:`projected` with the box low-pass), ``ccdf`` (ILVR started from the
    noised upsampled image at σ_start on the truncated grid) or ``dps``; both ``mcg``
    (:func:`manifold_constrained`: replace / ILVR plus the MCG gradient of step ζ, optional resampling).

    Args:
        denoiser: D(x; σ) callable.
        y: inpaint: [N, C, H, W] image (values under mask = 0 are ignored); sr: [N, C, H/s, W/s].
        task: ``"inpaint"`` or ``"sr"``.
        sample: a sampler of the :mod:`edmkit.diffusion.samplers` contract.
        sigmas: [steps + 1] decreasing grid ending in 0 (CCDF truncates it at σ_start).
        noise: [N, C, H, W] unit Gaussian noise; sets the output shape.
        mask: inpaint: 1 = known pixel (see :func:`check_mask`).
        scale: sr: the upsampling factor s.
        method: default ``replace`` (inpaint) or ``ilvr`` (sr).
        labels: [N, L] conditioning or None.
        randn: noise source for stochastic samplers and resampling.
        resample: RePaint repeats per step (replace / ilvr / ccdf).
        zeta: DPS step size ζ; MCG's α.
        sigma_start: CCDF's starting noise level.
        **sampler_kw: passed to `sample`.

    Returns:
        [N, C, H, W] float32 restored images.
    """
    if task not in METHODS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(METHODS)}")
    method = METHODS[task][0] if method is None else method
    if method not in METHODS[task]:
        raise ValueError(f"method {method!r} is not available for task {task!r}; valid: {', '.join(METHODS[task])}")
    y = y.to(device=noise.device, dtype=torch.float32)
    if task == "inpaint":
        if mask is None:
            raise ValueError("inpainting needs a mask (1 = known pixel)")
        if y.shape[1:] != noise.shape[1:]:
            raise ValueError(f"image shape {tuple(y.shape[1:])} does not match the model's {tuple(noise.shape[1:])} (C, H, W)")
        m = check_mask(mask, y)
        operator, y_full, project = mask_operator(m), m * y, mask_operator(m)
        y_meas = y_full
    else:
        check_scale(noise.shape[-1], scale)
        if y.shape[1] != noise.shape[1] or y.shape[-1] * scale != noise.shape[-1] or y.shape[-2] * scale != noise.shape[-2]:
            raise ValueError(f"low-res image size {y.shape[-1]}x{y.shape[-2]} times scale {scale} does not give the model's "
                             f"size {noise.shape[-1]}x{noise.shape[-2]} (or channels differ)")
        operator, y_full, project = partial(downsample, scale=scale), upsample(y, scale=scale), partial(low_pass, scale=scale)
        y_meas = y
    with torch.no_grad():  # DPS turns grad on inside its denoiser
        if method == "dps":
            conditioned, start = reconstruction_guided(denoiser, y=y_meas, operator=operator, zeta=zeta), noise
        else:
            conditioned = (manifold_constrained(denoiser, y=y_meas, operator=operator, y_full=y_full, project=project, alpha=zeta)
                           if method == "mcg" else projected(denoiser, y_full=y_full, project=project))
            if method == "ccdf":
                sigmas = truncate_sigmas(sigmas, sigma_start=sigma_start)
            start = measurement_noise(noise, y_full=y_full, sigma_start=float(sigmas[0]))
        if resample > 1:
            return sample_resampled(sample, conditioned, start, sigmas, resample=resample, labels=labels, randn=randn, **sampler_kw)
        return _plain(sample, conditioned, start, sigmas, labels, randn, sampler_kw)


def _plain(sample: Callable[..., Tensor], denoiser: Denoiser, noise: Tensor, sigmas: Tensor,
           labels: Tensor | None, randn: Randn | None, sampler_kw: dict) -> Tensor:
    """Call the sampler, passing `randn` only to samplers that take it."""
    return sample(denoiser, noise, sigmas, labels=labels, **with_randn(sample, sampler_kw, randn))
