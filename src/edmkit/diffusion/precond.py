"""Preconditioning: wrap a backbone F into a denoiser D(x; sigma) (EDM Table 1, EDM2 Sec. 2).

Symbols: x = y + n noisy input at noise level sigma; y clean data with std sigma_data;
D(x; sigma) = c_skip x + c_out F(c_in x; c_noise). Every formulation is expressed as a function
sigma -> (c_skip, c_out, c_in, c_noise), so one sampler and one loss serve them all.

Formulations (``FORMULATIONS``):
- ``edm``: EDM Table 1; unit-variance network input and target at every sigma.
- ``ddpm``: epsilon prediction on DDPM's discrete VP schedule (Ho et al. 2020): linear beta_t from 1e-4 to
  0.02 over T = 1000 steps, alpha_bar_t = prod_{s<=t} (1 - beta_s). The scaled variable x_t / sqrt(alpha_bar_t)
  = y + sigma_t eps has sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (EDM Table 1, "VP"). F predicts eps.
- ``flow``: rectified flow (Liu et al. 2023; Esser et al. 2024): x_t = (1 - t) y + t eps, F predicts the
  velocity v = eps - y. In sigma: sigma = t / (1 - t), and x_t = (1 - t) x, so x_t is the EDM variable
  scaled by c_in = 1 - t.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from edmkit.nn.mp import MPConv, MPFourier

Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def edm_precond(sigma: torch.Tensor, *, sigma_data: float) -> Coefficients:
    """EDM preconditioning (EDM Table 1): unit-variance network input and training target."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


# --- DDPM: discrete 1000-step VP schedule, epsilon prediction --------------------------------------------

DDPM_T = 1000  # number of discrete DDPM steps T (Ho et al. 2020)


def ddpm_alpha_bar(*, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = DDPM_T, device: torch.device | str | None = None) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) with beta linear in t (DDPM, Ho et al. 2020 Sec. 4). Returns [T] float64, t = 0..T-1."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64, device=device)
    return torch.cumprod(1 - betas, dim=0)


def ddpm_sigmas(*, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = DDPM_T, device: torch.device | str | None = None) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of every DDPM step (EDM Table 1, VP). Returns [T] float64, increasing."""
    alpha_bar = ddpm_alpha_bar(beta_start=beta_start, beta_end=beta_end, num_steps=num_steps, device=device)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def ddpm_t_to_sigma(t: torch.Tensor, **schedule) -> torch.Tensor:
    """DDPM step index t in [0, T-1] (integer, or fractional: ln sigma interpolated linearly) -> sigma, same shape and dtype."""
    log_grid = ddpm_sigmas(device=t.device, **schedule).log()  # [T]
    tf = t.to(torch.float64).clamp(0, log_grid.shape[0] - 1)
    lo = tf.floor().long().clamp(max=log_grid.shape[0] - 2)
    return torch.lerp(log_grid[lo], log_grid[lo + 1], tf - lo).exp().to(t.dtype if t.is_floating_point() else torch.float32)


def ddpm_sigma_to_t(sigma: torch.Tensor, **schedule) -> torch.Tensor:
    """sigma -> fractional DDPM step index in [0, T-1] (inverse of ``ddpm_t_to_sigma``; clamped outside the schedule's range)."""
    log_grid = ddpm_sigmas(device=sigma.device, **schedule).log()  # [T] increasing
    ls = sigma.to(torch.float64).log().clamp(log_grid[0], log_grid[-1])
    hi = torch.searchsorted(log_grid, ls.flatten().contiguous()).reshape(ls.shape).clamp(1, log_grid.shape[0] - 1)
    lo_val, hi_val = log_grid[hi - 1], log_grid[hi]
    return ((hi - 1) + (ls - lo_val) / (hi_val - lo_val)).to(sigma.dtype)


def ddpm_precond(sigma: torch.Tensor, *, sigma_data: float, num_steps: int = DDPM_T) -> Coefficients:
    """Epsilon-prediction preconditioning of the discrete VP schedule (EDM Table 1, VP column).

    ``sigma_data`` is not used: DDPM assumes unit-variance data (c_in = 1 / sqrt(sigma^2 + 1)), so the network
    input has unit variance only when the data do; the target eps always has unit variance. c_noise is the
    fractional step index divided by T, in [0, 1): EDM Table 1 feeds the index itself, 0..999, to a positional
    embedding; edmkit's embeddings (EDM2 Fourier features) expect O(1) inputs like EDM's ln(sigma) / 4.
    """
    c_skip = torch.ones_like(sigma)
    c_out = -sigma
    c_in = 1 / (sigma**2 + 1).sqrt()
    c_noise = ddpm_sigma_to_t(sigma, num_steps=num_steps) / num_steps
    return c_skip, c_out, c_in, c_noise


# --- Rectified flow ----------------------------------------------------------------------------------------


def flow_t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow time t in [0, 1) -> sigma = t / (1 - t) (x_t / (1 - t) = y + sigma eps)."""
    return t / (1 - t)


def flow_sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """sigma -> rectified-flow time t = sigma / (1 + sigma) (inverse of ``flow_t_to_sigma``)."""
    return sigma / (1 + sigma)


def flow_precond(sigma: torch.Tensor, *, sigma_data: float) -> Coefficients:
    """Rectified-flow velocity preconditioning in sigma (x_t = (1-t) y + t eps, F ~ v = eps - y).

    D = x_t - t v with x_t = (1 - t) x gives c_skip = 1 - t, c_out = -t, c_in = 1 - t, c_noise = t. Not unit
    variance: the target v has variance sigma_data^2 + 1 and the input (1-t)^2 sigma_data^2 + t^2.
    """
    t = flow_sigma_to_t(sigma)
    c_skip = 1 - t
    c_out = -t
    c_in = 1 - t
    c_noise = t
    return c_skip, c_out, c_in, c_noise


FORMULATIONS: dict[str, Callable[..., Coefficients]] = {"edm": edm_precond, "ddpm": ddpm_precond, "flow": flow_precond}


class Denoiser(torch.nn.Module):
    """D(x; sigma, labels) around a backbone, plus EDM2's learned uncertainty u(sigma) (EDM2 Eq. 21).

    Precision: preconditioning runs in float32; the backbone runs in whatever dtype autocast gives it.
    """

    def __init__(self, net: torch.nn.Module, *, sigma_data: float = 0.5, formulation: str = "edm", logvar_channels: int = 128) -> None:
        super().__init__()
        if formulation not in FORMULATIONS:
            raise ValueError(f"unknown formulation {formulation!r}; valid: {', '.join(FORMULATIONS)}")
        self.net = net
        self.sigma_data = sigma_data
        self.precond = FORMULATIONS[formulation]
        self.logvar_fourier = MPFourier(logvar_channels, seed=1)
        self.logvar_linear = MPConv(logvar_channels, 1)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None, *, return_logvar: bool = False,
        augment_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Args: x [N, C, H, W], sigma [N] or scalar, labels [N, L] or None, augment_labels [N, A] or None (= zeros,
        no augmentation: sampling; EDM App. C), cond [N, C_cond, H, W] conditioning image in [-1, 1] pixel units or
        None (cascade SR, ``edmkit.sampling.cascade``; fed to F scaled by 1 / sigma_data). Returns D [N, C, H, W] (float32)."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.precond(sigma, sigma_data=self.sigma_data)
        aug = {} if augment_labels is None else {"augment_labels": augment_labels}  # backbones without augment conditioning keep their signature
        if cond is not None:
            aug["cond"] = cond.to(torch.float32) / self.sigma_data  # ~unit variance, like c_in x
        F_x = self.net(c_in * x, c_noise.flatten(), labels, **aug)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if not return_logvar:
            return D_x
        logvar = self.logvar_linear(self.logvar_fourier(c_noise.flatten())).reshape(-1, 1, 1, 1)  # u(sigma) [N, 1, 1, 1]
        return D_x, logvar


def network_target(y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, *, sigma_data: float, formulation: str = "edm") -> torch.Tensor:
    """Effective training target of F: (y - c_skip x) / c_out (EDM Eq. 8). Unit variance for EDM."""
    c_skip, c_out, _, _ = FORMULATIONS[formulation](sigma, sigma_data=sigma_data)
    return (y - c_skip * x) / c_out


def lognormal_sigma_bounds(*, P_mean: float, P_std: float, z: float = 3.0) -> tuple[float, float]:
    """The sigma range covering +-z standard deviations of the training log-normal (for diagnostics)."""
    return math.exp(P_mean - z * P_std), math.exp(P_mean + z * P_std)
