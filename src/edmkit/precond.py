"""Preconditioning: wrap a backbone F into a denoiser D(x; sigma) (EDM Table 1, EDM2 Sec. 2).

Symbols: x = y + n noisy input at noise level sigma; y clean data with std sigma_data;
D(x; sigma) = c_skip x + c_out F(c_in x; c_noise). Every formulation is expressed as a function
sigma -> (c_skip, c_out, c_in, c_noise), so one sampler and one loss serve them all.
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


FORMULATIONS: dict[str, Callable[..., Coefficients]] = {"edm": edm_precond}


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
        self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None, *, return_logvar: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Args: x [N, C, H, W], sigma [N] or scalar, labels [N, L] or None. Returns D [N, C, H, W] (float32)."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.precond(sigma, sigma_data=self.sigma_data)
        F_x = self.net(c_in * x, c_noise.flatten(), labels)
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
