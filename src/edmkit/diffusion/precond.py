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
- ``vp``: EDM Table 1, "VP" column: the continuous VP SDE of Song et al. 2021 (score_sde), sigma(t) =
  sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), F predicts eps, c_noise = (M - 1) t(sigma).
- ``ve``: EDM Table 1, "VE" column (NCSN, Song & Ermon 2019; Song et al. 2021): sigma(t) = sqrt(t), F predicts
  -eps scaled by 1 / sigma, c_in = 1, c_noise = ln(sigma / 2).
- ``iddpm``: EDM Table 1, "iDDPM" column (Nichol & Dhariwal 2021): the cosine schedule's M + 1 discrete levels
  u_0 > ... > u_M = 0, F predicts eps, c_noise = M - 1 - j for the level u_j nearest sigma.

``SIGMA_RANGES`` holds each formulation's natural sampling range (sigma_min, sigma_max), EDM Table 1's "Sampling" rows.
Where c_noise is O(1000) (vp, iddpm) it is the paper's value, which the published baseline networks (positional
embeddings over 0..999) expect; EDM2's Fourier features were designed for O(1) inputs like ln(sigma) / 4.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from edmkit.nn.mp import MPConv, MPFourier

Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def per_example(values: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """One value per example (sigma [N] or a scalar) shaped [N, 1, ..., 1] to broadcast over x [N, ...] of any rank.

    Images [N, C, H, W] and clips [N, C, T, H, W] alike: a fixed [N, 1, 1, 1] would broadcast against a 5-D tensor
    with one channel as [N, N, T, H, W] without an error.
    """
    v = torch.as_tensor(values, dtype=torch.float32, device=x.device).reshape(-1, *(1,) * (x.ndim - 1))
    return v.expand(x.shape[0], *v.shape[1:])


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


# --- VP: continuous variance-preserving SDE (Song et al. 2021), EDM Table 1 "VP" ---------------------------

VP_BETA_D, VP_BETA_MIN = 19.9, 0.1  # linear beta(t) = beta_min + beta_d t of the VP SDE (EDM Table 1)
VP_EPS_T, VP_EPS_S = 1e-5, 1e-3     # smallest t in training / in sampling (EDM Table 1)
VP_M = 1000                          # c_noise = (M - 1) t, the DDPM step range the network's embedding was built for


def vp_t_to_sigma(t: torch.Tensor, *, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Table 1, VP; Eq. 28 of its App. B.2). Any shape."""
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_sigma_to_t(sigma: torch.Tensor, *, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(sigma^2 + 1)) - beta_min) / beta_d (EDM Table 1, VP: sigma^-1). Any shape.

    Written as 2 L / (sqrt(beta_min^2 + 2 beta_d L) + beta_min), L = ln(1 + sigma^2), the same value without the
    cancellation of the paper's form at small sigma.
    """
    L = torch.log1p(sigma**2)
    return 2 * L / ((beta_min**2 + 2 * beta_d * L).sqrt() + beta_min)


def vp_precond(sigma: torch.Tensor, *, sigma_data: float, M: int = VP_M) -> Coefficients:
    """Continuous VP preconditioning (EDM Table 1, VP): c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2+1), c_noise (M-1) t(sigma).

    ``sigma_data`` is not used: like DDPM, VP assumes unit-variance data (input unit variance only then); the target
    (y - x) / -sigma = eps has unit variance for any data.
    """
    c_skip = torch.ones_like(sigma)
    c_out = -sigma
    c_in = 1 / (sigma**2 + 1).sqrt()
    c_noise = (M - 1) * vp_sigma_to_t(sigma)
    return c_skip, c_out, c_in, c_noise


# --- VE: variance-exploding SDE / NCSN (Song & Ermon 2019; Song et al. 2021), EDM Table 1 "VE" --------------

VE_SIGMA_MIN, VE_SIGMA_MAX = 0.02, 100.0  # EDM Table 1, VE (CIFAR-10)


def ve_precond(sigma: torch.Tensor, *, sigma_data: float) -> Coefficients:
    """VE preconditioning (EDM Table 1, VE): c_skip 1, c_out sigma, c_in 1, c_noise ln(sigma / 2).

    Only the target (y - x) / sigma = -eps has unit variance; the input x is not scaled (variance sigma_data^2 + sigma^2).
    ``sigma_data`` is not used.
    """
    c_skip = torch.ones_like(sigma)
    c_out = sigma
    c_in = torch.ones_like(sigma)
    c_noise = (0.5 * sigma).log()
    return c_skip, c_out, c_in, c_noise


# --- iDDPM: cosine schedule, discrete levels (Nichol & Dhariwal 2021), EDM Table 1 "iDDPM" -----------------

IDDPM_M, IDDPM_C1, IDDPM_C2 = 1000, 0.001, 0.008  # steps M, ratio floor C_1, cosine offset C_2 (EDM Table 1)
IDDPM_J0 = 8  # sampling starts at u_{j_0} (EDM Table 1, iDDPM "Sampling")


def iddpm_alpha_bar(j: torch.Tensor, *, M: int = IDDPM_M, C_2: float = IDDPM_C2) -> torch.Tensor:
    """alpha_bar(j) = sin^2(pi/2 j / (M (C_2 + 1))) (EDM Table 1, iDDPM: Nichol & Dhariwal's cosine schedule, j reversed)."""
    return torch.sin(0.5 * math.pi * j / (M * (C_2 + 1))) ** 2


def iddpm_sigmas(*, M: int = IDDPM_M, C_1: float = IDDPM_C1, C_2: float = IDDPM_C2, device: torch.device | str | None = None) -> torch.Tensor:
    """The levels u_j, j = 0..M (EDM Table 1, iDDPM): u_M = 0, u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1)/abar(j), C_1) - 1).

    The recursion multiplies u_j^2 + 1 by 1 / r_j, r_j = max(abar(j-1)/abar(j), C_1), so ln(u_j^2 + 1) = -sum_{k>j} ln r_k:
    one reversed cumulative sum instead of M sequential steps. Returns [M + 1] float64, decreasing in j, ending in 0.
    """
    abar = iddpm_alpha_bar(torch.arange(M + 1, dtype=torch.float64, device=device), M=M, C_2=C_2)  # [M + 1]
    log_r = (abar[:-1] / abar[1:]).clamp(min=C_1).log()  # [M]: entry k - 1 holds ln r_k, k = 1..M
    log_u2p1 = -log_r.flip(0).cumsum(0).flip(0)  # [M]: ln(u_j^2 + 1), j = 0..M-1
    return torch.cat([torch.expm1(log_u2p1).sqrt(), log_u2p1.new_zeros(1)])


def iddpm_sigma_to_index(sigma: torch.Tensor, *, M: int = IDDPM_M, C_1: float = IDDPM_C1, C_2: float = IDDPM_C2) -> torch.Tensor:
    """argmin_j |u_j - sigma| over j = 0..M (EDM Table 1, iDDPM), same shape as sigma, int64."""
    u = iddpm_sigmas(M=M, C_1=C_1, C_2=C_2, device=sigma.device)  # [M + 1]
    flat = sigma.to(torch.float64).reshape(-1, 1)  # [S, 1]
    return (flat - u).abs().argmin(dim=1).reshape(sigma.shape)


def iddpm_precond(sigma: torch.Tensor, *, sigma_data: float, M: int = IDDPM_M, C_1: float = IDDPM_C1, C_2: float = IDDPM_C2) -> Coefficients:
    """iDDPM preconditioning (EDM Table 1, iDDPM): c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2+1), c_noise M-1-argmin_j |u_j - sigma|.

    Epsilon prediction like ``vp_precond`` (``sigma_data`` unused); iDDPM's learned variances are not modelled (EDM
    ignores them too). c_noise is -1 for sigma nearest u_M = 0.
    """
    c_skip = torch.ones_like(sigma)
    c_out = -sigma
    c_in = 1 / (sigma**2 + 1).sqrt()
    c_noise = (M - 1 - iddpm_sigma_to_index(sigma, M=M, C_1=C_1, C_2=C_2)).to(sigma.dtype)
    return c_skip, c_out, c_in, c_noise


FORMULATIONS: dict[str, Callable[..., Coefficients]] = {
    "edm": edm_precond, "ddpm": ddpm_precond, "flow": flow_precond, "vp": vp_precond, "ve": ve_precond, "iddpm": iddpm_precond,
}

# Natural sampling range (sigma_min, sigma_max) of each formulation: EDM Table 1's "Sampling" rows (edm: Eq. 5's
# defaults; ddpm: its first and last discrete step; vp: sigma(eps_s) .. sigma(1); ve: 0.02 .. 100; iddpm: u_{M-1} ..
# u_{j_0}). Data for samplers and the CLI; the sampler defaults stay EDM's. Flow has none: t -> 1 is sigma -> inf.
SIGMA_RANGES: dict[str, tuple[float, float]] = {
    "edm": (0.002, 80.0),
    "ddpm": (ddpm_sigmas()[0].item(), ddpm_sigmas()[-1].item()),
    "vp": (vp_t_to_sigma(torch.tensor(VP_EPS_S, dtype=torch.float64)).item(), vp_t_to_sigma(torch.tensor(1.0, dtype=torch.float64)).item()),
    "ve": (VE_SIGMA_MIN, VE_SIGMA_MAX),
    "iddpm": (iddpm_sigmas()[IDDPM_M - 1].item(), iddpm_sigmas()[IDDPM_J0].item()),
}


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
        augment_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None, context: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Args: x [N, C, H, W] (or clips [N, C, T, H, W]: every shape below gains T), sigma [N] or scalar, labels [N, L] or None, augment_labels [N, A] or None (= zeros,
        no augmentation: sampling; EDM App. C), cond [N, C_cond, H, W] conditioning image in [-1, 1] pixel units or
        None (cascade SR, ``edmkit.sampling.cascade``; fed to F scaled by 1 / sigma_data), context [N, L, D_ctx] tokens
        for cross-attention or None (zeros: the null context), segments [N, T] int ids of a clip's frames (video-unet's joint
        image-video batches; None: one clip). Returns D [N, C, H, W] (float32)."""
        x = x.to(torch.float32)
        sigma = per_example(sigma, x)  # [N, 1, ..., 1]
        c_skip, c_out, c_in, c_noise = self.precond(sigma, sigma_data=self.sigma_data)
        aug = {} if augment_labels is None else {"augment_labels": augment_labels}  # backbones without augment conditioning keep their signature
        if cond is not None:
            aug["cond"] = cond.to(torch.float32) / self.sigma_data  # ~unit variance, like c_in x
        if context is not None:
            aug["context"] = context  # backbones without cross-attention keep their signature
        if segments is not None:
            aug["segments"] = segments  # video-unet only
        F_x = self.net(c_in * x, c_noise.flatten(), labels, **aug)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if not return_logvar:
            return D_x
        logvar = self.logvar_linear(self.logvar_fourier(c_noise.flatten())).reshape(sigma.shape)  # u(sigma) [N, 1, ..., 1]
        return D_x, logvar

    @torch.no_grad()
    def logvar_at(self, sigma: torch.Tensor) -> torch.Tensor:
        """The learned uncertainty u(sigma) [N] alone (EDM2 Eq. 21), without the backbone.

        The head runs in eval mode, so its forced weight normalization never mutates the stored weights here (a
        training-mode call would: see ``MPConv``); the training step's own forward does that as usual.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.logvar_linear.weight.device).reshape(-1, 1, 1, 1)
        c_noise = self.precond(sigma, sigma_data=self.sigma_data)[3]
        was_training = self.logvar_linear.training
        self.logvar_linear.eval()
        try:
            return self.logvar_linear(self.logvar_fourier(c_noise.flatten())).flatten().float()
        finally:
            self.logvar_linear.train(was_training)


def network_target(y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, *, sigma_data: float, formulation: str = "edm") -> torch.Tensor:
    """Effective training target of F: (y - c_skip x) / c_out (EDM Eq. 8). Unit variance for EDM."""
    c_skip, c_out, _, _ = FORMULATIONS[formulation](sigma, sigma_data=sigma_data)
    return (y - c_skip * x) / c_out


def lognormal_sigma_bounds(*, P_mean: float, P_std: float, z: float = 3.0) -> tuple[float, float]:
    """The sigma range covering +-z standard deviations of the training log-normal (for diagnostics)."""
    return math.exp(P_mean - z * P_std), math.exp(P_mean + z * P_std)
