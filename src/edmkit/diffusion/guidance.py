"""Guidance as denoiser combinators: each function takes denoisers and returns a new denoiser.

A denoiser is ``(x [N,C,H,W], sigma [N] float32, labels [N,L] | None) -> D(x; σ) [N,C,H,W]``
(see :mod:`edmkit.diffusion.samplers`), so guided denoisers drop into any sampler unchanged.

Symbols:
    D_main, D_guide   the denoiser being guided and the one it is pushed away from.
    w                 guidance weight; D_w = D_guide + w·(D_main − D_guide), w = 1 is unguided.
                      Classifier-free guidance (Ho & Salimans 2022): D_guide is the unconditional
                      branch. Autoguidance (Karras et al. 2024): D_guide is a weaker model.
    (σ_lo, σ_hi]      guidance interval (Kynkäänniemi et al. 2024): w applies only inside it.
    p, s              dynamic-thresholding percentile and scale (Imagen, Saharia et al. 2022).
    s (classifier)    classifier-guidance scale: D + s·σ²·∇_x log p(y | x, σ) (Dhariwal & Nichol 2021).

A weight is a float or a function ``w(sigma [N]) -> [N] | float`` of the noise level, so
schedules (interval, oscillation) compose without any state in the sampler.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence, Union

import torch
from torch import Tensor

from edmkit.diffusion.samplers import Denoiser

WeightFn = Callable[[Tensor], Union[Tensor, float]]


def _check_weight(weight: float | WeightFn) -> None:
    if not callable(weight) and weight < 0:
        raise ValueError(f"guidance weight must be >= 0, got {weight}")


def guided(main: Denoiser, guide: Denoiser, weight: float | WeightFn) -> Denoiser:
    """Guidance by extrapolation from a guide denoiser: D_w = D_guide + w·(D_main − D_guide).

    Covers classifier-free guidance (Ho & Salimans 2022) and autoguidance (Karras et al. 2024).
    Where w = 1 the result is D_main exactly (bitwise); if w = 1 for the whole batch the guide is
    not evaluated.

    Args:
        main: the denoiser being guided.
        guide: the unconditional branch (CFG) or a weaker model (autoguidance).
        weight: w >= 0, or a function of sigma [N] returning [N] or a float.

    Returns:
        Denoiser returning [N, C, H, W] (float32 when the guide is evaluated).
    """
    _check_weight(weight)

    def denoise(x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        w = weight(sigma) if callable(weight) else weight
        if not isinstance(w, Tensor):
            if w == 1:
                return main(x, sigma, labels)
            d_main = main(x, sigma, labels)
            return torch.lerp(guide(x, sigma, labels).float(), d_main.float(), float(w))
        if bool((w == 1).all()):  # one host sync per call; saves a whole guide evaluation
            return main(x, sigma, labels)
        d_main = main(x, sigma, labels)
        w = w.to(device=x.device, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))  # [N, 1, 1, 1]
        # torch.lerp computes end − (end − start)·(1 − w) for w >= 0.5, so rows with w = 1 are main exactly
        return torch.lerp(guide(x, sigma, labels).float(), d_main.float(), w)

    return denoise


def classifier_free(
    denoiser: Denoiser, weight: float | WeightFn, *, uncond_labels: Tensor | None = None, context: Tensor | None = None
) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): guide = the same denoiser without labels (and without context).

    Args:
        denoiser: a label- or context-conditional denoiser trained with label (context) dropout; with ``context`` it
            takes ``context=`` [N, L, D] tokens as a keyword (``precond.Denoiser``).
        weight: w >= 0 or a function of sigma (see :func:`guided`).
        uncond_labels: [L] or [N, L] labels of the unconditional branch; default all zeros.
        context: [N, L, D] context tokens of the conditional branch; the unconditional branch gets the null context
            (none, which the backbones compute exactly as zeros: the rows dropped in training).

    Returns:
        Denoiser; calling it with labels=None and no context raises ValueError (CFG needs a condition).
    """
    main = denoiser if context is None else functools.partial(denoiser, context=context)

    def uncond(x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None:
            return denoiser(x, sigma, None)
        null = torch.zeros_like(labels) if uncond_labels is None else uncond_labels.to(labels).expand_as(labels)
        return denoiser(x, sigma, null)

    cfg = guided(main, uncond, weight)

    def denoise(x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None and context is None:
            raise ValueError("classifier-free guidance needs labels or a context; got neither")
        return cfg(x, sigma, labels)

    return denoise


def guidance_interval(weight: float | WeightFn, *, sigma_lo: float, sigma_hi: float) -> WeightFn:
    """Guidance interval (Kynkäänniemi et al. 2024): w for σ ∈ (σ_lo, σ_hi], 1 elsewhere.

    Args:
        weight: w >= 0 inside the interval, or a function of sigma (e.g. :func:`oscillating`).
        sigma_lo: lower end of the interval (exclusive).
        sigma_hi: upper end of the interval (inclusive).

    Returns:
        Function sigma [N] -> w [N] float32.
    """
    _check_weight(weight)
    if not sigma_lo < sigma_hi:
        raise ValueError(f"need sigma_lo < sigma_hi, got {sigma_lo}, {sigma_hi}")

    def w_of_sigma(sigma: Tensor) -> Tensor:
        w = weight(sigma) if callable(weight) else weight
        w = torch.as_tensor(w, dtype=torch.float32, device=sigma.device).expand(sigma.shape)
        return torch.where((sigma > sigma_lo) & (sigma <= sigma_hi), w, torch.ones_like(w))

    return w_of_sigma


def oscillating(
    weights: Sequence[float],
    *,
    sigmas: Tensor,
    warmup_steps: int,
    warmup_weight: float | None = None,
) -> WeightFn:
    """Oscillating guidance (Imagen Video, Ho et al. 2022): a high w first, then cycle `weights`.

    Step i of the grid uses `warmup_weight` (default max(weights)) for i < warmup_steps, then
    weights[(i − warmup_steps) mod len(weights)], e.g. weights = (15, 1). The step of a noise level
    is found from the grid without state: σ ∈ (σ_{i+1}, σ_i] belongs to step i. That is exact for
    samplers with one evaluation per step (Euler, DDIM, DDPM, DPM-Solver++); Heun's corrector at
    σ_{i+1} takes the weight of step i + 1, and a churned σ̂ the weight of the step containing it.

    Args:
        weights: the cycle of weights (each >= 0).
        sigmas: [steps + 1] the sampler's decreasing σ grid.
        warmup_steps: number of initial steps at `warmup_weight` (>= 0).
        warmup_weight: weight of the warm-up steps.

    Returns:
        Function sigma [N] -> w [N] float32.
    """
    if len(weights) == 0 or min(weights) < 0:
        raise ValueError(f"weights must be a non-empty sequence of values >= 0, got {weights!r}")
    warmup_weight = max(weights) if warmup_weight is None else warmup_weight
    if warmup_steps < 0 or warmup_weight < 0:
        raise ValueError(f"warmup_steps and warmup_weight must be >= 0, got {warmup_steps}, {warmup_weight}")
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be the 1-D sampling grid with at least 2 entries")
    num_steps = sigmas.numel() - 1
    per_step = [
        warmup_weight if i < warmup_steps else weights[(i - warmup_steps) % len(weights)] for i in range(num_steps)
    ]
    per_step = torch.tensor(per_step, dtype=torch.float32)  # [steps]
    ascending = sigmas.detach().to(torch.float32).flip(0)  # [steps + 1]

    def w_of_sigma(sigma: Tensor) -> Tensor:
        # σ ∈ (σ_{i+1}, σ_i] has i + 1 grid values >= σ (σ_0 … σ_i)
        at_or_above = ascending.numel() - torch.searchsorted(ascending.to(sigma.device), sigma.float(), side="left")
        step = (at_or_above - 1).clamp(0, num_steps - 1)
        return per_step.to(sigma.device)[step]

    return w_of_sigma


def classifier_guided(
    denoiser: Denoiser, classifier: Callable[[Tensor, Tensor], Tensor], *, scale: float, class_idx: int | None = None
) -> Denoiser:
    """Classifier guidance in σ-space (Dhariwal & Nichol 2021, Sec. 4): D_s = D + s·σ²·∇_x log p(y | x, σ).

    From Tweedie, D(x; σ) = x + σ² ∇_x log p(x; σ), so adding s ∇_x log p(y | x, σ) to the score shifts D by
    s·σ² times the classifier's gradient. Works with any sampler and after CFG (pass the CFG denoiser).
    s = 0 returns D exactly, without evaluating the classifier.

    Args:
        denoiser: D(x; σ, labels), conditional or not.
        classifier: (x [N,C,H,W], sigma [N]) -> logits [N, K] of p(y | x, σ) (e.g. ``edmkit.diffusion.classifier.NoisyClassifier``).
        scale: s >= 0.
        class_idx: the class y for every image; None takes y = argmax of the labels the sampler passes.

    Returns:
        Denoiser returning float32 [N, C, H, W]; the gradient is taken under ``torch.enable_grad`` and detached,
        so it works inside ``torch.no_grad`` sampling.
    """
    if not scale >= 0:
        raise ValueError(f"classifier guidance scale must be >= 0, got {scale}")

    def denoise(x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        d = denoiser(x, sigma, labels)
        if scale == 0:
            return d
        if class_idx is None and labels is None:
            raise ValueError("classifier guidance needs a class: give class_idx or labels")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])  # [N]
        y = torch.full([x.shape[0]], class_idx, device=x.device) if class_idx is not None else labels.argmax(dim=1)  # [N]
        with torch.enable_grad():
            x_in = x.detach().to(torch.float32).requires_grad_(True)
            log_p = torch.log_softmax(classifier(x_in, sigma).float(), dim=1).gather(1, y[:, None]).sum()
            (grad,) = torch.autograd.grad(log_p, x_in)  # [N, C, H, W]
        return d.float() + scale * sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2 * grad.detach()

    return denoise


def dynamic_threshold(denoiser: Denoiser, *, percentile: float = 0.995) -> Denoiser:
    """Dynamic thresholding of the denoised image (Imagen, Saharia et al. 2022, Sec. 2.3).

    s = max(quantile_p(|x̂_0|) per sample, 1); x̂_0 ← clip(x̂_0, −s, s)/s. For data in [−1, 1].

    Args:
        denoiser: the denoiser whose output x̂_0 = D(x; σ) is thresholded.
        percentile: p in (0, 1].

    Returns:
        Denoiser returning float32 [N, C, H, W] within [−1, 1].
    """
    if not 0 < percentile <= 1:
        raise ValueError(f"percentile must be in (0, 1], got {percentile}")

    def denoise(x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        x0 = denoiser(x, sigma, labels).float()
        s = torch.quantile(x0.abs().flatten(1), percentile, dim=1).clamp(min=1)  # [N]
        s = s.reshape(-1, *([1] * (x0.ndim - 1)))  # [N, 1, 1, 1]
        return torch.minimum(torch.maximum(x0, -s), s) / s

    return denoise
