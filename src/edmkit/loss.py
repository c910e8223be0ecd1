"""Training losses and noise-level densities (EDM Sec. 5, EDM2 Sec. 2.4 / Eq. 21).

Symbols: y clean image, n ~ N(0, sigma^2 I), lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
u(sigma) the learned log-variance (uncertainty) of the per-sigma loss.
"""

from __future__ import annotations

import math

import torch


def sample_sigma_lognormal(n: int, *, P_mean: float, P_std: float, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """ln sigma ~ N(P_mean, P_std^2) (EDM Sec. 5). Returns sigma [n] float32."""
    z = torch.randn(n, generator=generator, device=device)
    return (z * P_std + P_mean).exp()


def sample_sigma_stratified(n: int, *, P_mean: float, P_std: float, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """Low-discrepancy log-normal sigma (VDM): u_i = (u_0 + i/n) mod 1, sigma = exp(P_mean + P_std Phi^-1(u_i))."""
    u0 = torch.rand(1, generator=generator, device=device, dtype=torch.float64)
    u = (u0 + torch.arange(n, device=device, dtype=torch.float64) / n) % 1.0
    u = u.clamp(1e-7, 1 - 1e-7)
    z = math.sqrt(2) * torch.erfinv(2 * u - 1)
    return (z * P_std + P_mean).exp().to(torch.float32)


def edm_loss_weight(sigma: torch.Tensor, *, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM Table 1): unit loss at init."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def uncertainty_weighted(loss: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Loss with learned uncertainty (EDM2 Eq. 21): loss / e^u + u."""
    return loss / logvar.exp() + logvar


class EDMLoss:
    """EDM / EDM2 denoising loss as a callable (EDM Eq. 2 with Table 1's weighting, EDM2 Eq. 21).

    ``sigma`` and unit ``noise`` are drawn by the caller (``sample_sigma`` and ``torch.randn``) so that the
    training loop controls every random number: that is what makes resume and multi-process runs exact.
    Returns ``(loss, weighted_mse)``, both per sample [N] (mean over pixels): ``loss`` is what is
    optimized (uncertainty-weighted when ``uncertainty=True``), ``weighted_mse`` is the plain
    lambda(sigma)-weighted error, comparable across runs and configs.
    """

    def __init__(self, *, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, uncertainty: bool = True, stratified: bool = False) -> None:
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.uncertainty, self.stratified = uncertainty, stratified

    def sample_sigma(self, n: int, *, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        """Training noise levels [n] from the configured density."""
        sampler = sample_sigma_stratified if self.stratified else sample_sigma_lognormal
        return sampler(n, P_mean=self.P_mean, P_std=self.P_std, generator=generator, device=device)

    def __call__(self, denoiser, y: torch.Tensor, labels: torch.Tensor | None, *, sigma: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma4 = sigma.reshape(-1, 1, 1, 1)
        weight = edm_loss_weight(sigma4, sigma_data=self.sigma_data)
        x = y + noise * sigma4
        if self.uncertainty:
            D_x, logvar = denoiser(x, sigma, labels, return_logvar=True)
            weighted = weight * (D_x - y) ** 2
            loss = uncertainty_weighted(weighted, logvar)
        else:
            weighted = weight * (denoiser(x, sigma, labels) - y) ** 2
            loss = weighted
        return loss.mean(dim=(1, 2, 3)), weighted.detach().mean(dim=(1, 2, 3))
