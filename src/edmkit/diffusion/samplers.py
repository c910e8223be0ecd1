"""Samplers for the EDM probability-flow ODE / SDE, all in σ-space with one contract.

Every sampler is ``sample(denoiser, noise, sigmas, *, labels=None, ..., callback=None) -> x0``
(the contract of k-diffusion, github.com/crowsonkb/k-diffusion, MIT; implemented here from the
papers). A denoiser is any callable ``(x [N,C,H,W], sigma [N] float32, labels [N,L] | None) ->
D(x; σ) [N,C,H,W]``; grids come from :mod:`edmkit.diffusion.schedules` and end in σ = 0.

Symbols (pixel scale, x = y + σ·n, EDM Table 1):
    σ_i          the grid, decreasing, i = 0 … N; the sampler starts at x_0 = noise·σ_0.
    D(x; σ)      denoiser output, an estimate of E[y | x].
    d            ODE slope dx/dσ = (x − D(x; σ))/σ (EDM Eq. 3 with σ(t) = t).
    γ, σ̂         Heun's churn: σ̂ = σ_i·(1 + γ_i) (EDM Algorithm 2).
    η            DDIM stochasticity (Song et al. 2021); η = 0 is Euler, η = 1 is DDPM ancestral.
    λ            log-SNR time of DPM-Solver++, λ = −ln σ (Lu et al. 2022).

Precision: x and σ are float32; the denoiser's output is upcast to float32. Grad mode is left to
the caller (wrap in ``torch.inference_mode()`` for plain sampling; guidance such as DPS needs grads).
No sampler keeps state on an object; SeededRandn holds only the per-sample random generators.
"""

from __future__ import annotations

import inspect
import math
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
Randn = Callable[[Tensor], Tensor]
Callback = Callable[[dict], None]


class SeededRandn:
    """Per-sample seeded Gaussian noise (EDM2's reproducibility idea, implemented independently).

    Row k of every draw comes from its own generator seeded with ``seeds[k]``, so image k is the
    same whatever the batch size or the number of ranks it was generated with. Pass an instance as
    a sampler's ``randn``; use :meth:`randn` for the initial noise.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str | None = None) -> None:
        self.device = torch.device("cpu" if device is None else device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def randn(self, shape: Sequence[int], *, dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw unit Gaussian noise of shape [len(seeds), *shape]; row k uses generator k."""
        return torch.stack(
            [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def randn_like(self, x: Tensor) -> Tensor:
        """Draw unit Gaussian noise shaped like `x` [N, ...]; N must equal len(seeds)."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch size {x.shape[0]} does not match {len(self.generators)} seeds")
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)

    __call__ = randn_like


def _setup(noise: Tensor, sigmas: Tensor) -> tuple[Tensor, list[float]]:
    """Validate the grid, read it once as Python floats, and scale the unit noise to σ_0."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    s = sigmas.detach().double().cpu().tolist()  # the loop's only host read of σ
    if s[-1] < 0 or any(a <= b for a, b in zip(s, s[1:])):
        raise ValueError("sigmas must be strictly decreasing and non-negative")
    return noise.to(torch.float32) * s[0], s


def _sigma_batches(values: Sequence[float], x: Tensor) -> list[Tensor]:
    """All the σ's a sampler will pass, built at once as float32 [N] rows (no per-step tensor creation)."""
    rows = torch.tensor(values, dtype=torch.float32).to(x.device)  # [S]
    return list(rows[:, None].expand(-1, x.shape[0]).contiguous().unbind(0))  # S × [N]


def _denoise(denoiser: Denoiser, x: Tensor, sigma_batch: Tensor, labels: Tensor | None) -> Tensor:
    """Evaluate D(x; σ) with σ as a float32 [N] tensor, upcasting the output to float32."""
    denoised = denoiser(x, sigma_batch, labels)
    return denoised if denoised.dtype == torch.float32 else denoised.to(torch.float32)


def sample_euler(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor,
    *,
    labels: Tensor | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x − D(x; σ))/σ (EDM Eq. 3, Algorithm 1 without Heun).

    Args:
        denoiser: D(x; σ) callable.
        noise: [N, C, H, W] unit-variance Gaussian noise.
        sigmas: [steps + 1] decreasing σ grid.
        labels: [N, L] conditioning or None.
        callback: called after each step with dict(i, x, sigma, sigma_next, denoised).

    Returns:
        [N, C, H, W] float32 sample at σ = sigmas[-1].
    """
    x, s = _setup(noise, sigmas)
    sigma_batches = _sigma_batches(s[:-1], x)
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, sigma_batches[i], labels)
        x = torch.lerp(denoised, x, s[i + 1] / s[i])  # x + (σ_{i+1} − σ_i)·d with d = (x − D)/σ_i
        if callback is not None:
            callback(dict(i=i, x=x, sigma=s[i], sigma_next=s[i + 1], denoised=denoised))
    return x


def sample_heun(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor,
    *,
    labels: Tensor | None = None,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = float("inf"),
    S_noise: float = 1.0,
    randn: Randn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Heun's 2nd-order method with optional churn (EDM Algorithm 2).

    γ_i = min(S_churn/N, √2 − 1) for σ_i ∈ [S_tmin, S_tmax], else 0; σ̂ = σ_i(1 + γ_i);
    x̂ = x_i + √(σ̂² − σ_i²)·S_noise·ε; Euler step to σ_{i+1}, then the trapezoidal correction
    unless σ_{i+1} = 0. With S_churn = 0 this is the deterministic ODE solver.

    Args:
        denoiser: D(x; σ) callable.
        noise: [N, C, H, W] unit-variance Gaussian noise.
        sigmas: [steps + 1] decreasing σ grid.
        labels: [N, L] conditioning or None.
        S_churn, S_tmin, S_tmax, S_noise: EDM stochasticity parameters (Algorithm 2).
        randn: noise source ``randn(x) -> ε`` (e.g. SeededRandn); default torch.randn_like.
        callback: called after each step with dict(i, x, sigma, sigma_next, denoised).

    Returns:
        [N, C, H, W] float32 sample at σ = sigmas[-1].
    """
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"S_churn and S_noise must be >= 0, got {S_churn}, {S_noise}")
    randn = torch.randn_like if randn is None else randn
    x, s = _setup(noise, sigmas)
    num_steps = len(s) - 1
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    gammas = [gamma_max if S_tmin <= sigma <= S_tmax else 0.0 for sigma in s[:-1]]
    sigma_hats = [sigma * (1 + gamma) for sigma, gamma in zip(s, gammas)]  # σ̂_i = σ_i(1 + γ_i)
    hat_batches, next_batches = _sigma_batches(sigma_hats, x), _sigma_batches(s[1:], x)
    for i in range(num_steps):
        sigma, sigma_next, sigma_hat = s[i], s[i + 1], sigma_hats[i]
        x_hat = x
        if gammas[i] > 0:  # raise the noise level from σ_i to σ̂ (EDM Alg. 2 lines 5-6)
            x_hat = x + math.sqrt(sigma_hat**2 - sigma**2) * S_noise * randn(x)
        # Alg. 2 lines 7-11 with h = σ_{i+1} − σ̂, rearranged to 4 tensor ops (they dominate the cost
        # of small-batch steps): x̂ + h·d with d = (x̂ − D)/σ̂ is lerp(D, x̂, σ_{i+1}/σ̂), and since
        # h·d = x_euler − x̂, the correction x̂ + h·(d + d')/2 is (x̂ + x_euler)/2 + (h/2)·d'.
        denoised = _denoise(denoiser, x_hat, hat_batches[i], labels)
        x = torch.lerp(denoised, x_hat, sigma_next / sigma_hat)  # Euler step x̂ + h·d (line 8)
        if sigma_next != 0:  # 2nd-order correction (lines 9-11)
            d_prime_scaled = x - _denoise(denoiser, x, next_batches[i], labels)  # σ_{i+1}·d'
            h = sigma_next - sigma_hat
            x = torch.lerp(x_hat, x, 0.5).add_(d_prime_scaled, alpha=0.5 * h / sigma_next)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


def ancestral_step(sigma: float, sigma_next: float, *, eta: float = 1.0) -> tuple[float, float]:
    """Split σ_next into a deterministic part σ_down and fresh noise σ_up (DDIM Eq. 16 in σ-space).

    DDIM's σ_t(η) = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_{t−1}), rewritten for the scaled variable
    x/√ᾱ with ᾱ = 1/(1 + σ²), becomes σ_up = η·σ_next·√(σ² − σ_next²)/σ (capped at σ_next), and
    σ_down = √(σ_next² − σ_up²).

    Returns:
        (σ_down, σ_up) as Python floats.
    """
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(sigma**2 - sigma_next**2) / sigma)
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def sample_ddim(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor,
    *,
    labels: Tensor | None = None,
    eta: float = 0.0,
    randn: Randn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM in the scaled variable x/√ᾱ = y + σ·ε (Song et al. 2021, Eq. 12).

    x_{i+1} = D + σ_down·(x − D)/σ_i + σ_up·z with (σ_down, σ_up) from :func:`ancestral_step`.
    η = 0 is exactly an Euler step of the EDM ODE; η = 1 is DDPM ancestral sampling.

    Args:
        denoiser: D(x; σ) callable.
        noise: [N, C, H, W] unit-variance Gaussian noise.
        sigmas: [steps + 1] decreasing σ grid (e.g. schedules.vp_sigmas).
        labels: [N, L] conditioning or None.
        eta: stochasticity η >= 0.
        randn: noise source ``randn(x) -> z`` (e.g. SeededRandn); default torch.randn_like.
        callback: called after each step with dict(i, x, sigma, sigma_next, denoised).

    Returns:
        [N, C, H, W] float32 sample at σ = sigmas[-1].
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    randn = torch.randn_like if randn is None else randn
    x, s = _setup(noise, sigmas)
    sigma_batches = _sigma_batches(s[:-1], x)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = _denoise(denoiser, x, sigma_batches[i], labels)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta=eta)
        x = torch.lerp(denoised, x, sigma_down / sigma)  # D + σ_down·ε̂ with ε̂ = (x − D)/σ
        if sigma_up > 0:
            x = x + sigma_up * randn(x)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


def sample_ddpm(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor,
    *,
    labels: Tensor | None = None,
    randn: Randn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), i.e. :func:`sample_ddim` with η = 1.

    Args and returns as in :func:`sample_ddim`.
    """
    return sample_ddim(denoiser, noise, sigmas, labels=labels, eta=1.0, randn=randn, callback=callback)


def dpmpp_step(x: Tensor, sigma: float, sigma_next: float, corrections: Sequence[tuple[float, Tensor]], *, eta: float = 0.0) -> Tensor:
    """One step of DPM-Solver++ in λ = −ln σ without its noise term (Lu et al. 2022, Eq. 9 / Alg. 2; the SDE form of
    Lu et al. 2022's DPM-Solver++(2M) SDE as k-diffusion writes it, github.com/crowsonkb/k-diffusion, MIT).

    With h = λ_{i+1} − λ_i and ĥ = (1 + η)·h: x_{i+1} = (σ_{i+1}/σ_i)·e^{−ηh}·x_i + (1 − e^{−ĥ})·D_i + Σ_k c_k·Δ_k,
    where `corrections` holds (c_k, Δ_k) pairs computed by the caller from past denoiser outputs. η = 0 is the
    probability-flow ODE solver; η = 1 the SDE solver, whose fresh noise σ_{i+1}·√(1 − e^{−2ηh})·ε the caller adds.
    The first pair must be (1 − e^{−ĥ}, D_i).
    """
    h = math.log(sigma / sigma_next)
    x = x * (sigma_next / sigma * math.exp(-eta * h))
    for c, delta in corrections:
        x = x.add(delta, alpha=c)
    return x


def _dpmpp_multistep(denoiser, noise, sigmas, *, labels, order, eta, S_noise, randn, callback) -> Tensor:
    """DPM-Solver++(2M) / (3M), deterministic (η = 0) or SDE (η > 0): see :func:`sample_dpmpp_2m`."""
    if eta < 0 or S_noise < 0:
        raise ValueError(f"eta and S_noise must be >= 0, got {eta}, {S_noise}")
    randn = torch.randn_like if randn is None else randn
    x, s = _setup(noise, sigmas)
    sigma_batches = _sigma_batches(s[:-1], x)
    history: list[tuple[float, Tensor]] = []  # (h_k, D_k) of the previous steps, newest first
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = _denoise(denoiser, x, sigma_batches[i], labels)
        if sigma_next == 0:  # h = ∞: the update reduces to x = D
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            h_eta = (1 + eta) * h
            phi_1 = -math.expm1(-h_eta)  # 1 − e^{−ĥ}
            phi_2 = 1 - phi_1 / h_eta  # (e^{−ĥ} − 1)/ĥ + 1
            terms = [(phi_1, denoised)]
            if history and (order == 2 or len(history) == 1):
                # 2nd order: the divided difference (D_i − D_{i−1})/r, r = h_{i−1}/h, weighted by the midpoint rule's
                # (1 − e^{−ĥ})/2 at order 2 (Lu et al. Alg. 2) and by φ_2 = (e^{−ĥ} − 1)/ĥ + 1 on the 3M warm-up step
                r = history[0][0] / h
                weight = phi_1 / 2 if order == 2 else phi_2
                terms.append((weight / r, denoised - history[0][1]))
            elif history:
                # 3rd order: D(λ_i + τ) ≈ D_i + τ·D' + τ²/2·D'' in Lu et al.'s Eq. 9 integrates to
                # φ_1·D_i + φ_2·(h·D') − φ_3·(h²·D''), φ_2 = 1 − φ_1/ĥ, φ_3 = φ_2/ĥ − 1/2; h·D' and h²·D'' from divided
                # differences of the last three outputs (r_k: past steps in units of h). k-diffusion's and DPM-Solver's
                # 3M weight h²·D''/2 by φ_3, which tests/test_samplers.py measures as 2nd order; this is 3rd.
                r0, r1 = history[0][0] / h, history[1][0] / h
                d1_0 = (denoised - history[0][1]) / r0  # ≈ h·D' half a step r0 back
                d1_1 = (history[0][1] - history[1][1]) / r1
                d2 = (d1_0 - d1_1) * (2 / (r0 + r1))  # ≈ h²·D''
                d1 = d1_0 + d2 * (r0 / 2)  # h·D' moved to λ_i
                phi_3 = phi_2 / h_eta - 0.5
                terms += [(phi_2, d1), (-phi_3, d2)]
            x = dpmpp_step(x, sigma, sigma_next, terms, eta=eta)
            if eta > 0:
                x = x.add(randn(x), alpha=sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * S_noise)
            history = [(h, denoised), *history][: order - 1]
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor,
    *,
    labels: Tensor | None = None,
    eta: float = 0.0,
    S_noise: float = 1.0,
    randn: Randn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M), the 2nd-order multistep data-prediction solver (Lu et al. 2022, Algorithm 2), and its SDE form.

    With λ = −ln σ and h = λ_{i+1} − λ_i: x_{i+1} = (σ_{i+1}/σ_i)·x_i − (e^{−h} − 1)·D̃, where
    D̃ = D_i on the first step and on the final step to σ = 0, else
    D̃ = (1 + 1/(2r))·D_i − (1/(2r))·D_{i−1}, r = h_{i−1}/h.
    η > 0 solves the reverse SDE instead (k-diffusion's DPM-Solver++(2M) SDE, midpoint form): h becomes (1 + η)·h in
    the D terms, x is scaled by e^{−ηh} more, and fresh noise of std σ_{i+1}·√(1 − e^{−2ηh})·S_noise is added.

    Args:
        denoiser: D(x; σ) callable.
        noise: [N, C, H, W] unit-variance Gaussian noise.
        sigmas: [steps + 1] decreasing σ grid.
        labels: [N, L] conditioning or None.
        eta: 0 (default) the ODE solver; 1 the SDE solver; between, a partly stochastic one.
        S_noise: scale of the fresh noise (η > 0).
        randn: noise source ``randn(x) -> ε`` (e.g. SeededRandn); default torch.randn_like.
        callback: called after each step with dict(i, x, sigma, sigma_next, denoised).

    Returns:
        [N, C, H, W] float32 sample at σ = sigmas[-1].
    """
    return _dpmpp_multistep(denoiser, noise, sigmas, labels=labels, order=2, eta=eta, S_noise=S_noise, randn=randn, callback=callback)


def sample_dpmpp_3m(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor,
    *,
    labels: Tensor | None = None,
    eta: float = 0.0,
    S_noise: float = 1.0,
    randn: Randn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(3M): the 3rd-order multistep solver (Lu et al. 2022, multistep 3rd order; the form of
    k-diffusion's ``sample_dpmpp_3m_sde``, MIT), deterministic at η = 0, the SDE solver at η = 1.

    Steps 1 and 2 are 1st and 2nd order (too few past outputs); the final step to σ = 0 returns D.
    Args and returns as in :func:`sample_dpmpp_2m`.
    """
    return _dpmpp_multistep(denoiser, noise, sigmas, labels=labels, order=3, eta=eta, S_noise=S_noise, randn=randn, callback=callback)


SAMPLERS: Mapping[str, Callable[..., Tensor]] = MappingProxyType(
    {
        "euler": sample_euler,
        "heun": sample_heun,
        "ddim": sample_ddim,
        "ddpm": sample_ddpm,
        "dpmpp-2m": sample_dpmpp_2m,
        "dpmpp-3m": sample_dpmpp_3m,
    }
)


def with_randn(sample: Callable[..., Tensor], sampler_kw: dict, randn: Randn | None) -> dict:
    """``sampler_kw`` plus ``randn`` for samplers that take a noise source (the stochastic ones); the others get it unchanged."""
    if randn is not None and "randn" in inspect.signature(sample).parameters:
        return dict(sampler_kw, randn=randn)
    return sampler_kw


def get_sampler(name: str) -> Callable[..., Tensor]:
    """Sampler function by registry name (``"euler"``, ``"heun"``, ``"ddim"``, ``"ddpm"``, ``"dpmpp-2m"``, ``"dpmpp-3m"``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]
