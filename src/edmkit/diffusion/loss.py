"""Training losses and noise-level densities (EDM Sec. 5, EDM2 Sec. 2.4 / Eq. 21), one per formulation.

Symbols: y clean image, n ~ N(0, sigma^2 I), lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
u(sigma) the learned log-variance (uncertainty) of the per-sigma loss.

Every loss is lambda(sigma) ||D(y + n; sigma) - y||^2 for its formulation's weight and sigma density
(``make_loss`` picks it from the config): EDM's lambda with log-normal sigma; DDPM's epsilon MSE
||F - eps||^2 = ||D - y||^2 / sigma^2 with t uniform over the discrete steps; rectified flow's velocity MSE
||F - v||^2 = ||D - y||^2 / t^2 with t logit-normal (= log-normal sigma) or uniform; and EDM Table 1's other
columns, all with lambda = 1 / sigma^2: VP (t ~ U(eps_t, 1)), VE (ln sigma ~ U(ln sigma_min, ln sigma_max)) and
iDDPM (sigma = u_j, j uniform over 0..M-1).

How sigma is drawn from that density (``sigma_sampling``): ``lognormal`` independent draws, ``stratified`` low-discrepancy
draws (VDM), or ``importance``: iDDPM's loss-aware sampling (Nichol & Dhariwal 2021, Sec. 3.3, Eq. 17) in sigma. The
density's quantile function ``sigma_at(u)`` cuts it into K equal-mass bins (intervals of ln sigma); bin k is drawn with
probability p_k ∝ sqrt(E[L^2]) over a running history of each bin's last losses (``SigmaLossHistory``), and each
sample's loss is weighted by p_base / p_k = (1/K) / p_k, so the expected loss is the base density's. ``adaptive``
fits the same bins' probabilities from the network's learned uncertainty instead (EDM2 Eq. 21: e^u(sigma) estimates
the expected weighted loss at sigma), p_k ∝ e^u(sigma_k) at the bin midpoints, in the spirit of VDM's learned
schedule (Kingma et al. 2021): it moves the density, the weights keep the objective.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from edmkit.diffusion.precond import (
    DDPM_T,
    IDDPM_C1,
    IDDPM_C2,
    IDDPM_M,
    VE_SIGMA_MAX,
    VE_SIGMA_MIN,
    VP_BETA_D,
    VP_BETA_MIN,
    VP_EPS_T,
    ddpm_sigmas,
    flow_sigma_to_t,
    per_example,
    flow_t_to_sigma,
    iddpm_sigmas,
    vp_t_to_sigma,
)

if TYPE_CHECKING:
    from edmkit.config import ExperimentConfig


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


def midpoint_quantiles(n: int) -> torch.Tensor:
    """Probabilities q_k = (k + 1/2) / n, k < n: the midpoints of n equal-mass bins. Returns [n] float64."""
    if n < 1:
        raise ValueError(f"need at least one quantile, got {n}")
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


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

    def __init__(self, *, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, uncertainty: bool = True,
                 sigma_sampling: str = "lognormal") -> None:
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.uncertainty, self.sigma_sampling = uncertainty, sigma_sampling

    @property
    def stratified(self) -> bool:
        """Low-discrepancy draws (``sigma_sampling == "stratified"``). ``importance`` draws go through ``SigmaLossHistory``;
        ``sample_sigma`` then gives the base density's independent draws (e.g. for a classifier on the same density)."""
        return self.sigma_sampling == "stratified"

    def sample_sigma(self, n: int, *, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        """Training noise levels [n] from the configured density."""
        sampler = sample_sigma_stratified if self.stratified else sample_sigma_lognormal
        return sampler(n, P_mean=self.P_mean, P_std=self.P_std, generator=generator, device=device)

    def sigma_at(self, u: torch.Tensor) -> torch.Tensor:
        """The density's quantile function: sigma [n] float32 at probabilities u [n] in (0, 1), increasing in u."""
        z = math.sqrt(2) * torch.erfinv(2 * u.double() - 1)  # Phi^-1(u)
        return (z * self.P_std + self.P_mean).exp().to(torch.float32)

    def sigma_quantiles(self, n: int) -> torch.Tensor:
        """Fixed noise levels [n] float32 at the midpoint quantiles of the training density (see ``midpoint_quantiles``).

        Their mean loss approximates the training objective; each is the centre of one equal-mass sigma bin.
        """
        return self.sigma_at(midpoint_quantiles(n))

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sigma loss weight lambda(sigma), any shape."""
        return edm_loss_weight(sigma, sigma_data=self.sigma_data)

    def __call__(self, denoiser, y: torch.Tensor, labels: torch.Tensor | None, *, sigma: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma_b = per_example(sigma, y)  # [N, 1, ..., 1]: images and clips alike
        weight = self.weight(sigma_b)
        x = y + noise * sigma_b
        if self.uncertainty:
            D_x, logvar = denoiser(x, sigma, labels, return_logvar=True)
            weighted = weight * (D_x - y) ** 2
            loss = uncertainty_weighted(weighted, logvar)
        else:
            weighted = weight * (denoiser(x, sigma, labels) - y) ** 2
            loss = weighted
        return loss.flatten(1).mean(dim=1), weighted.detach().flatten(1).mean(dim=1)


def sample_t_discrete(n: int, *, num_steps: int, stratified: bool, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """t uniform over the steps 0..T-1 (DDPM Algorithm 1); stratified: u_i = (u_0 + i/n) mod 1, t = floor(T u_i). Returns [n] int64."""
    if stratified:
        u0 = torch.rand(1, generator=generator, device=device, dtype=torch.float64)
        u = (u0 + torch.arange(n, device=device, dtype=torch.float64) / n) % 1.0
        return (u * num_steps).long().clamp(max=num_steps - 1)
    return torch.randint(num_steps, (n,), generator=generator, device=device)


def sample_uniform(n: int, *, stratified: bool, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """u ~ U(0, 1); stratified: u_i = (u_0 + i/n) mod 1 (VDM low discrepancy). Returns [n] float64."""
    u0 = torch.rand(1 if stratified else n, generator=generator, device=device, dtype=torch.float64)
    return (u0 + torch.arange(n, device=device, dtype=torch.float64) / n) % 1.0 if stratified else u0


def ddpm_loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """1 / sigma^2: turns ||D - y||^2 into DDPM's ||eps_theta - eps||^2, since D = x - sigma eps_theta (Ho et al. 2020 Eq. 14).

    Also lambda(sigma) of EDM Table 1's VP, VE and iDDPM columns: there c_out = -+sigma, so it is the network-space MSE."""
    return sigma**-2


def flow_loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """1 / t^2 = ((1 + sigma) / sigma)^2: turns ||D - y||^2 into the velocity MSE ||v_theta - v||^2, since D = x_t - t v_theta."""
    return flow_sigma_to_t(sigma) ** -2


class DDPMLoss(EDMLoss):
    """DDPM epsilon-prediction loss (Ho et al. 2020, L_simple) on the discrete 1000-step VP schedule.

    Same contract as ``EDMLoss``; ``sample_sigma`` draws a step t uniformly and returns sigma_t. With
    ``uncertainty=True`` (EDM2 ladder B+) the epsilon MSE is weighted by the learned u(sigma) as well.
    ``P_mean`` / ``P_std`` are unused.
    """

    def __init__(self, *, num_steps: int = DDPM_T, **kw) -> None:
        super().__init__(**kw)
        self.num_steps = num_steps

    def sample_sigma(self, n: int, *, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        t = sample_t_discrete(n, num_steps=self.num_steps, stratified=self.stratified, generator=generator, device=device)
        return ddpm_sigmas(num_steps=self.num_steps, device=device)[t].to(torch.float32)

    def sigma_at(self, u: torch.Tensor) -> torch.Tensor:
        t = (u.double() * self.num_steps).long().clamp(max=self.num_steps - 1)
        return ddpm_sigmas(num_steps=self.num_steps, device=u.device)[t].to(torch.float32)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return ddpm_loss_weight(sigma)


class FlowLoss(EDMLoss):
    """Rectified-flow velocity loss (Liu et al. 2023; Esser et al. 2024) in sigma = t / (1 - t).

    t ~ logit-normal(P_mean, P_std), which is exactly ln sigma ~ N(P_mean, P_std^2) since ln sigma = logit t,
    so the EDM sampler of sigma is reused; or t ~ U(0, 1) with ``uniform_t=True`` (t kept in [1e-4, 1 - 1e-4]).
    """

    def __init__(self, *, uniform_t: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.uniform_t = uniform_t

    def sample_sigma(self, n: int, *, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        if not self.uniform_t:
            return super().sample_sigma(n, generator=generator, device=device)
        if self.stratified:
            u0 = torch.rand(1, generator=generator, device=device)
            t = (u0 + torch.arange(n, device=device) / n) % 1.0
        else:
            t = torch.rand(n, generator=generator, device=device)
        return flow_t_to_sigma(t.clamp(1e-4, 1 - 1e-4))

    def sigma_at(self, u: torch.Tensor) -> torch.Tensor:
        if not self.uniform_t:
            return super().sigma_at(u)
        return flow_t_to_sigma(u.double().clamp(1e-4, 1 - 1e-4)).to(torch.float32)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return flow_loss_weight(sigma)


class VPLoss(EDMLoss):
    """Continuous VP loss (EDM Table 1, VP; Song et al. 2021): t ~ U(eps_t, 1), sigma = sigma(t), lambda = 1 / sigma^2.

    With ``vp_precond`` this is the eps-MSE ||F - eps||^2 at a continuous time t. ``P_mean`` / ``P_std`` are unused.
    """

    def __init__(self, *, epsilon_t: float = VP_EPS_T, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN, **kw) -> None:
        super().__init__(**kw)
        self.epsilon_t, self.beta_d, self.beta_min = epsilon_t, beta_d, beta_min

    def sigma_at(self, u: torch.Tensor) -> torch.Tensor:
        t = self.epsilon_t + (1 - self.epsilon_t) * u  # U(0, 1) -> U(eps_t, 1); sigma(t) is increasing
        return vp_t_to_sigma(t, beta_d=self.beta_d, beta_min=self.beta_min).to(torch.float32)

    def sample_sigma(self, n: int, *, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.sigma_at(sample_uniform(n, stratified=self.stratified, generator=generator, device=device))

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return ddpm_loss_weight(sigma)


class VELoss(EDMLoss):
    """VE / NCSN loss (EDM Table 1, VE; Song et al. 2021): ln sigma ~ U(ln sigma_min, ln sigma_max), lambda = 1 / sigma^2.

    With ``ve_precond`` this is ||F + eps||^2. ``P_mean`` / ``P_std`` are unused.
    """

    def __init__(self, *, sigma_min: float = VE_SIGMA_MIN, sigma_max: float = VE_SIGMA_MAX, **kw) -> None:
        super().__init__(**kw)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma_at(self, u: torch.Tensor) -> torch.Tensor:
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return (lo + (hi - lo) * u).exp().to(torch.float32)

    def sample_sigma(self, n: int, *, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.sigma_at(sample_uniform(n, stratified=self.stratified, generator=generator, device=device))

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return ddpm_loss_weight(sigma)


class IDDPMLoss(EDMLoss):
    """iDDPM loss as EDM Table 1 states it: sigma = u_j with j drawn uniformly from 0..M-1 (never u_M = 0), lambda = 1 / sigma^2.

    The level index j is drawn like DDPM's step (``sample_t_discrete``, stratified if configured); sigma is the
    cosine schedule's level u_j (``iddpm_sigmas``). iDDPM's hybrid loss and learned variances are not modelled.
    ``P_mean`` / ``P_std`` are unused.
    """

    def __init__(self, *, M: int = IDDPM_M, C_1: float = IDDPM_C1, C_2: float = IDDPM_C2, **kw) -> None:
        super().__init__(**kw)
        self.M, self.C_1, self.C_2 = M, C_1, C_2

    def _levels(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return iddpm_sigmas(M=self.M, C_1=self.C_1, C_2=self.C_2, device=device)  # [M + 1] float64, decreasing

    def sample_sigma(self, n: int, *, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        j = sample_t_discrete(n, num_steps=self.M, stratified=self.stratified, generator=generator, device=device)
        return self._levels(device)[j].to(torch.float32)

    def sigma_at(self, u: torch.Tensor) -> torch.Tensor:
        # u_j decreases in j, so the u-quantile of sigma is level M - 1 - floor(M u)
        j = self.M - 1 - (u.double() * self.M).long().clamp(max=self.M - 1)
        return self._levels(u.device)[j].to(torch.float32)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return ddpm_loss_weight(sigma)


LOSSES: dict[str, type[EDMLoss]] = {"edm": EDMLoss, "ddpm": DDPMLoss, "flow": FlowLoss, "vp": VPLoss, "ve": VELoss, "iddpm": IDDPMLoss}


def make_loss(cfg: ExperimentConfig) -> EDMLoss:
    """The training loss of a config: its formulation's loss with the config's density and uncertainty weighting."""
    n, l = cfg.network, cfg.loss
    if n.formulation not in LOSSES:
        raise ValueError(f"unknown formulation {n.formulation!r}; valid: {', '.join(LOSSES)}")
    if l.uniform_t and n.formulation != "flow":
        raise ValueError(f"loss.uniform_t is a rectified-flow option; formulation {n.formulation!r} has its own density")
    kw = dict(P_mean=l.P_mean, P_std=l.P_std, sigma_data=n.sigma_data, uncertainty=l.uncertainty, sigma_sampling=l.sigma_sampling)
    if n.formulation == "flow":
        kw["uniform_t"] = l.uniform_t
    return LOSSES[n.formulation](**kw)


# ---------------------------------------------------------------------------------------------
# Importance-sampled noise levels (iDDPM Sec. 3.3, expressed in sigma).

IMPORTANCE_BINS = 32      # K equal-mass bins of the base sigma density
IMPORTANCE_HISTORY = 10   # losses kept per bin (iDDPM: 10 per step t)
IMPORTANCE_FLOOR = 1e-3   # share of the base density mixed into every draw (iDDPM's uniform_prob), so no bin starves


def importance_probs(mean_sq: torch.Tensor, ready: torch.Tensor, *, floor: float = IMPORTANCE_FLOOR) -> torch.Tensor:
    """Bin probabilities p_k ∝ sqrt(E[L^2]_k) (iDDPM Eq. 17), mixed with the base density: [K], [K] bool -> [K] float64.

    Bins without a full history (``ready`` false) keep their base mass 1/K; the mass of the ready bins is shared among
    them in proportion to sqrt(E[L^2]); finally p = (1 - floor) p + floor / K. Before any bin is ready p is the base 1/K.
    """
    K = len(mean_sq)
    p = torch.full((K,), 1.0 / K, dtype=torch.float64, device=mean_sq.device)
    root = mean_sq.double().clamp(min=0).sqrt() * ready
    if bool(ready.any()) and float(root.sum()) > 0:
        p = torch.where(ready, ready.double().sum() / K * root / root.sum(), p)
    return (1 - floor) * p + floor / K


def adaptive_probs(logvar: torch.Tensor, *, floor: float = IMPORTANCE_FLOOR) -> torch.Tensor:
    """Bin probabilities fitted from the learned uncertainty u at the bin midpoints [K]: p_k ∝ e^u_k, mixed with the base.

    EDM2 Eq. 21 is minimised by e^u(sigma) = E[weighted loss | sigma], so this is the loss-proportional density of
    :func:`importance_probs` with the model's estimate in place of a loss history. Returns [K] float64.
    """
    K = len(logvar)
    return (1 - floor) * torch.softmax(logvar.double(), dim=0) + floor / K


def importance_weight(p: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Loss weight p_base / p_k = (1/K) / p_k of samples drawn from bins [n] with probabilities p [K]: E_p[w L] = E_base[L]."""
    return (1.0 / len(p)) / p[bins]


def sample_binned(p: torch.Tensor, n: int, *, sigma_at, generator: torch.Generator,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw n noise levels from K equal-mass bins of a base density: bin k ~ p, u ~ U(k/K, (k+1)/K), sigma = sigma_at(u).

    Args:
        p: [K] bin probabilities (:func:`importance_probs`, :func:`adaptive_probs`).
        sigma_at: the base density's quantile function (``EDMLoss.sigma_at``).
        generator: the step's generator (on ``device``).

    Returns:
        sigma [n] float32, loss weights [n] float32 (:func:`importance_weight`), bins [n] int64.
    """
    p = p.to(device)
    K = len(p)
    bins = torch.multinomial(p, n, replacement=True, generator=generator)
    u = (bins.double() + torch.rand(n, generator=generator, device=device, dtype=torch.float64)) / K
    return sigma_at(u.clamp(1e-7, 1 - 1e-7)), importance_weight(p, bins).float(), bins


class SigmaLossHistory:
    """The running loss history of the importance sampler: the last ``history`` losses of each of ``bins`` sigma bins.

    Plain tensors (``state_dict`` loads with ``weights_only=True``), part of the resumable training state. Every rank
    updates it with the same global-batch losses, so all ranks hold the same history and draw the same sigma.
    """

    def __init__(self, *, bins: int = IMPORTANCE_BINS, history: int = IMPORTANCE_HISTORY) -> None:
        if bins < 1 or history < 1:
            raise ValueError(f"need bins >= 1 and history >= 1, got {bins}, {history}")
        self.losses = torch.zeros(bins, history, dtype=torch.float64)  # ring buffer per bin
        self.count = torch.zeros(bins, dtype=torch.int64)              # losses ever recorded per bin

    def probs(self) -> torch.Tensor:
        """[K] float64 bin probabilities of the next draw (:func:`importance_probs`)."""
        H = self.losses.shape[1]
        filled = self.count.clamp(max=H)
        mean_sq = self.losses.square().sum(1) / filled.clamp(min=1)
        return importance_probs(mean_sq, filled >= H)

    def update(self, bins: torch.Tensor, losses: torch.Tensor) -> None:
        """Append per-sample losses [n] of bins [n] in order (only the newest ``history`` per bin are kept; non-finite ones dropped)."""
        b, v = bins.detach().cpu().long(), losses.detach().cpu().double()
        b, v = b[v.isfinite()], v[v.isfinite()]  # a skipped step's non-finite losses would poison the probabilities
        K, H = self.losses.shape
        b, order = torch.sort(b, stable=True)
        v = v[order]
        n_k = torch.bincount(b, minlength=K)                # [K]
        rank = torch.arange(len(b)) - (n_k.cumsum(0) - n_k)[b]  # index of each value within its bin, in order
        keep = rank >= n_k[b] - H                            # the newest H of each bin: distinct ring positions
        self.losses[b[keep], (self.count[b] + rank)[keep] % H] = v[keep]
        self.count += n_k

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"losses": self.losses.clone(), "count": self.count.clone()}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        if tuple(d["losses"].shape) != tuple(self.losses.shape):
            raise ValueError(f"sigma loss history of shape {tuple(d['losses'].shape)}, expected {tuple(self.losses.shape)}")
        self.losses, self.count = d["losses"].to(torch.float64).clone(), d["count"].to(torch.int64).clone()
