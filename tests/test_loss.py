"""Training losses and noise-level densities against hand-computed numbers and closed forms (EDM Sec. 5, EDM2 Eq. 21, VDM)."""

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from scipy.stats import kstest, norm

from edmkit.diffusion.loss import (
    DDPMLoss,
    EDMLoss,
    FlowLoss,
    IDDPMLoss,
    VELoss,
    VPLoss,
    SigmaLossHistory,
    adaptive_probs,
    ddpm_loss_weight,
    edm_loss_weight,
    flow_loss_weight,
    importance_probs,
    importance_weight,
    midpoint_quantiles,
    sample_binned,
    sample_sigma_lognormal,
    sample_sigma_stratified,
    uncertainty_weighted,
)
from edmkit.diffusion.precond import iddpm_sigmas


def test_uncertainty_weighted_is_eq21():
    """EDM2 Eq. 21: L / e^u + u, by hand (u = 0 leaves L; u = ln 2 halves it and adds ln 2)."""
    loss = torch.tensor([2.0, 0.5, 3.0])
    logvar = torch.tensor([0.0, math.log(2.0), -1.0])
    expected = [2.0, 0.25 + math.log(2.0), 3.0 * math.e - 1.0]
    assert uncertainty_weighted(loss, logvar).tolist() == pytest.approx(expected, rel=1e-6)


class FakeDenoiser:
    """D(x) = x / 2 + 0.1 with a fixed log-variance u per sample; records the noisy input it was given."""

    def __init__(self, logvar):
        self.logvar = torch.tensor(logvar).reshape(-1, 1, 1, 1)

    def __call__(self, x, sigma, labels, *, return_logvar=False):
        self.seen = (x.clone(), sigma.clone())
        D = x / 2 + 0.1
        return (D, self.logvar) if return_logvar else D


# Two samples of two pixels, by hand (sigma_data = 0.5, lambda = (s^2 + 1/4) / (s^2 / 4)):
# sample 0: sigma 0.5, x = y + 0.5 n = [0.7, -1.4], D = [0.45, -0.6], D - y = [0.25, -0.2], mean sq 0.05125, lambda 8
# sample 1: sigma 2,   x = y + 2 n   = [1.6, 1.0],  D = [0.9, 0.6],   D - y = [0.3, 0.6],   mean sq 0.225,   lambda 4.25
Y = torch.tensor([0.2, -0.4, 0.6, 0.0]).reshape(2, 1, 1, 2)
NOISE = torch.tensor([1.0, -2.0, 0.5, 0.5]).reshape(2, 1, 1, 2)
SIGMA = torch.tensor([0.5, 2.0])
MSE = [8 * 0.05125, 4.25 * 0.225]


def test_edm_loss_by_hand_with_uncertainty():
    """EDMLoss returns (lambda-weighted MSE / e^u + u, lambda-weighted MSE) per sample; u from the denoiser."""
    u = [0.3, -0.7]
    denoiser = FakeDenoiser(u)
    loss, weighted = EDMLoss(sigma_data=0.5, uncertainty=True)(denoiser, Y, None, sigma=SIGMA, noise=NOISE)
    assert weighted.tolist() == pytest.approx(MSE, rel=1e-6)
    assert loss.tolist() == pytest.approx([m * math.exp(-v) + v for m, v in zip(MSE, u)], rel=1e-6)
    torch.testing.assert_close(denoiser.seen[0], torch.tensor([0.7, -1.4, 1.6, 1.0]).reshape(2, 1, 1, 2))
    torch.testing.assert_close(denoiser.seen[1], SIGMA)


def test_edm_loss_by_hand_without_uncertainty():
    loss, weighted = EDMLoss(sigma_data=0.5, uncertainty=False)(FakeDenoiser([5.0, 5.0]), Y, None, sigma=SIGMA, noise=NOISE)
    assert loss.tolist() == pytest.approx(MSE, rel=1e-6) and weighted.tolist() == pytest.approx(MSE, rel=1e-6)


def test_loss_weights():
    """lambda(sigma): EDM (s^2 + sd^2) / (s sd)^2; DDPM 1 / s^2 (eps MSE); flow 1 / t^2 = ((1 + s) / s)^2 (velocity MSE)."""
    s = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    for sd in (0.5, 1.0):
        torch.testing.assert_close(edm_loss_weight(s, sigma_data=sd), (s**2 + sd**2) / (s * sd) ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(ddpm_loss_weight(s), 1 / s**2, rtol=1e-12, atol=0)
    torch.testing.assert_close(flow_loss_weight(s), ((1 + s) / s) ** 2, rtol=1e-12, atol=0)


def test_edm_defaults_are_the_papers():
    """EDM Sec. 5: ln sigma ~ N(-1.2, 1.2^2), sigma_data 0.5; EDM2's uncertainty weighting on by default."""
    loss = EDMLoss()
    assert (loss.P_mean, loss.P_std, loss.sigma_data, loss.uncertainty, loss.stratified) == (-1.2, 1.2, 0.5, True, False)


def test_lognormal_sigma_has_the_configured_mean_and_std():
    """ln sigma ~ N(P_mean, P_std^2); distinct P_mean and P_std so that swapping them shows (200k draws: 4 s.e. < 0.015)."""
    sigma = sample_sigma_lognormal(200_000, P_mean=-0.8, P_std=1.6, generator=torch.Generator().manual_seed(0))
    assert sigma.dtype == torch.float32 and sigma.shape == (200_000,)
    log = sigma.double().log()
    assert log.mean().item() == pytest.approx(-0.8, abs=0.015) and log.std().item() == pytest.approx(1.6, rel=0.01)
    sigma = EDMLoss(P_mean=-0.4, P_std=1.0).sample_sigma(200_000, generator=torch.Generator().manual_seed(1))
    assert sigma.double().log().mean().item() == pytest.approx(-0.4, abs=0.01) and sigma.double().log().std().item() == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize("n", [1, 7, 32])
def test_stratified_sigma_takes_one_point_per_equal_mass_bin(n):
    """VDM low-discrepancy sampling: the CDF values u_i = Phi((ln sigma_i - P_mean) / P_std) are u_0 + i/n mod 1, evenly spaced."""
    g = torch.Generator().manual_seed(n)
    draws = []
    for _ in range(3):
        sigma = sample_sigma_stratified(n, P_mean=-0.8, P_std=1.6, generator=g)
        assert sigma.dtype == torch.float32 and sigma.shape == (n,)
        u = np.sort(norm.cdf((np.log(sigma.double().numpy()) + 0.8) / 1.6))
        gaps = np.diff(np.concatenate([u, [u[0] + 1]]))  # the last gap wraps around 1
        assert gaps == pytest.approx([1 / n] * n, abs=1e-6)
        draws.append(u[0])
    assert len(set(draws)) == 3  # a fresh offset u_0 every batch
    # EDMLoss(sigma_sampling="stratified") uses it
    sigma = EDMLoss(P_mean=0.3, P_std=0.7, sigma_sampling="stratified").sample_sigma(n, generator=g)
    u = np.sort(norm.cdf((np.log(sigma.double().numpy()) - 0.3) / 0.7))
    assert np.diff(np.concatenate([u, [u[0] + 1]])) == pytest.approx([1 / n] * n, abs=1e-6)


def test_flow_uniform_stratified_t_is_evenly_spaced():
    sigma = FlowLoss(uniform_t=True, sigma_sampling="stratified").sample_sigma(8, generator=torch.Generator().manual_seed(2))
    t = np.sort((sigma / (1 + sigma)).double().numpy())
    assert np.diff(np.concatenate([t, [t[0] + 1]])) == pytest.approx([1 / 8] * 8, abs=1e-5)


def test_sigma_quantiles_are_midpoints_of_equal_mass_bins():
    """Quantiles (k + 1/2) / n of each training density: EDM log-normal, DDPM's discrete steps, flow's uniform t."""
    q = [(k + 0.5) / 4 for k in range(4)]
    expected = [math.exp(-0.8 + 1.6 * NormalDist().inv_cdf(p)) for p in q]
    assert EDMLoss(P_mean=-0.8, P_std=1.6).sigma_quantiles(4).tolist() == pytest.approx(expected, rel=1e-6)
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    steps = [125, 375, 625, 875]  # floor(1000 q)
    assert DDPMLoss().sigma_quantiles(4).tolist() == pytest.approx(np.sqrt((1 - alpha_bar[steps]) / alpha_bar[steps]).tolist(), rel=1e-6)
    assert FlowLoss(uniform_t=True).sigma_quantiles(4).tolist() == pytest.approx([p / (1 - p) for p in q], rel=1e-6)


# --- EDM Table 1's VP, VE and iDDPM training densities and weights ---------------------------------------------


def vp_t_of(sigma):
    """EDM Table 1's sigma^-1 for VP (beta_d 19.9, beta_min 0.1), in float64 from the printed formula."""
    return (np.sqrt(0.01 + 2 * 19.9 * np.log(sigma.astype(np.float64) ** 2 + 1)) - 0.1) / 19.9


def test_new_columns_weight_is_inverse_sigma_squared():
    """VP, VE, iDDPM: lambda(sigma) = 1 / sigma^2 (EDM Table 1), whatever sigma_data is."""
    s = torch.tensor([0.01, 0.5, 3.0, 80.0, 2e4], dtype=torch.float64)
    for cls in (VPLoss, VELoss, IDDPMLoss):
        torch.testing.assert_close(cls(sigma_data=0.5).weight(s), 1 / s**2, rtol=1e-12, atol=0)


def test_ve_draws_log_sigma_uniformly():
    """ln sigma ~ U(ln 0.02, ln 100): inside the range and a KS test against the uniform law (fixed seed)."""
    sigma = VELoss().sample_sigma(20_000, generator=torch.Generator().manual_seed(0))
    assert sigma.dtype == torch.float32 and sigma.shape == (20_000,)
    log = sigma.double().log().numpy()
    lo, hi = math.log(0.02), math.log(100)
    assert log.min() >= lo - 1e-6 and log.max() <= hi + 1e-6
    assert kstest(log, "uniform", args=(lo, hi - lo)).pvalue > 0.01
    assert kstest(log, "uniform", args=(lo, 0.9 * (hi - lo))).pvalue < 1e-6  # the test can tell a narrower range apart


def test_vp_draws_t_uniformly():
    """t(sigma) ~ U(eps_t = 1e-5, 1): inside the range and a KS test (fixed seed); so sigma in [sigma(1e-5), sigma(1)]."""
    sigma = VPLoss().sample_sigma(20_000, generator=torch.Generator().manual_seed(0))
    assert sigma.dtype == torch.float32
    t = vp_t_of(sigma.numpy())
    assert t.min() >= 1e-5 * (1 - 1e-4) and t.max() <= 1 + 1e-6
    assert kstest(t, "uniform", args=(1e-5, 1 - 1e-5)).pvalue > 0.01
    log = np.log(sigma.double().numpy())
    assert kstest(log, "uniform", args=(log.min(), log.max() - log.min())).pvalue < 1e-6  # the test can tell a log-uniform sigma apart


def test_iddpm_draws_levels_0_to_M_minus_1_uniformly():
    """sigma = u_j, j ~ U{0..M-1}: only the levels, never u_M = 0, j uniform (mean, std, a chi-square over 10 bins)."""
    u = iddpm_sigmas().float()
    sigma = IDDPMLoss().sample_sigma(20_000, generator=torch.Generator().manual_seed(0))
    j = (sigma[:, None] - u).abs().argmin(dim=1)
    assert torch.equal(u[j], sigma) and (sigma > 0).all()
    assert j.double().mean().item() == pytest.approx(499.5, abs=8) and j.double().std().item() == pytest.approx(1000 / math.sqrt(12), rel=0.03)
    counts = torch.bincount(j // 100, minlength=10).double()
    assert ((counts - 2000) ** 2 / 2000).sum().item() < 27.9  # chi-square, 9 dof, p = 0.001
    strat = IDDPMLoss(sigma_sampling="stratified").sample_sigma(1000, generator=torch.Generator().manual_seed(1))
    assert len(torch.unique(strat)) == 1000  # one draw per level


def test_ve_and_vp_stratified_draws_are_evenly_spaced():
    """Stratified: the uniform variable (ln sigma for VE, t for VP) takes one point per 1/n of its range."""
    sigma = VELoss(sigma_sampling="stratified").sample_sigma(8, generator=torch.Generator().manual_seed(2))
    u = np.sort((np.log(sigma.double().numpy()) - math.log(0.02)) / math.log(5000))
    assert np.diff(np.concatenate([u, [u[0] + 1]])) == pytest.approx([1 / 8] * 8, abs=1e-5)
    sigma = VPLoss(sigma_sampling="stratified").sample_sigma(8, generator=torch.Generator().manual_seed(2))
    t = np.sort(vp_t_of(sigma.numpy()))
    assert np.diff(np.concatenate([t, [t[0] + 1]])) == pytest.approx([1 / 8] * 8, abs=1e-4)


def test_new_columns_sigma_quantiles():
    """Midpoint quantiles q = (k + 1/2)/n of each density, ascending: VE exp(ln 0.02 + q ln 5000); VP sigma(1e-5 + (1 - 1e-5) q);
    iDDPM u_j with j = M - 1 - floor(M q) (u_j decreases in j)."""
    q = np.array([(k + 0.5) / 4 for k in range(4)])
    assert VELoss().sigma_quantiles(4).tolist() == pytest.approx(np.exp(math.log(0.02) + q * math.log(5000)).tolist(), rel=1e-6)
    t = 1e-5 + (1 - 1e-5) * q
    assert VPLoss().sigma_quantiles(4).tolist() == pytest.approx(np.sqrt(np.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1).tolist(), rel=1e-6)
    u = iddpm_sigmas().numpy()
    got = IDDPMLoss().sigma_quantiles(4)
    assert got.tolist() == pytest.approx(u[[874, 624, 374, 124]].tolist(), rel=1e-6) and (got.diff() > 0).all()


# --- importance-sampled sigma (iDDPM Sec. 3.3 in sigma) ------------------------------------------------------------


def synthetic_loss(sigma):
    """A fixed loss of sigma, large at the high-noise end (where the log-normal density puts little mass)."""
    return (sigma.double().log() + 2.5).square() + 0.05


def test_importance_sampled_loss_is_unbiased_and_its_variance_drops():
    """After the history has warmed up on the sampler's own draws, E_p[w L] equals the base density's E[L] (quadrature
    over 10^6 quantiles) within 4 standard errors, and the variance of w L is far below that of L under the base draws
    (measured: 0.27 vs 13.8)."""
    loss, g = EDMLoss(P_mean=-1.2, P_std=1.2), torch.Generator().manual_seed(0)
    history = SigmaLossHistory()
    for _ in range(200):
        sigma, _, bins = sample_binned(history.probs(), 64, sigma_at=loss.sigma_at, generator=g)
        history.update(bins, synthetic_loss(sigma))
    p = history.probs()
    assert bool((history.count >= 10).all()) and p.max() > 3 * p.min()  # active, and far from the base density
    sigma, weight, _ = sample_binned(history.probs(), 100_000, sigma_at=loss.sigma_at, generator=g)
    weighted = weight.double() * synthetic_loss(sigma)
    exact = synthetic_loss(loss.sigma_at(midpoint_quantiles(1_000_000))).mean().item()
    assert weighted.mean().item() == pytest.approx(exact, abs=4 * weighted.std().item() / math.sqrt(len(weighted)))
    plain = synthetic_loss(loss.sample_sigma(100_000, generator=g))
    assert weighted.var() < 0.1 * plain.var()
    assert synthetic_loss(sigma).mean() > 2 * exact  # the draws themselves favour the high-loss bins: without w, biased


def test_importance_probs_follow_sqrt_mean_square_and_keep_the_base_mass_of_bins_without_history():
    mean_sq = torch.tensor([4.0, 1.0, 9.0, 16.0], dtype=torch.float64)
    none, some, all_ = torch.zeros(4, dtype=torch.bool), torch.tensor([True, True, False, False]), torch.ones(4, dtype=torch.bool)
    assert importance_probs(mean_sq, none, floor=0).tolist() == [0.25] * 4
    assert importance_probs(mean_sq, some, floor=0).tolist() == pytest.approx([0.5 * 2 / 3, 0.5 / 3, 0.25, 0.25])
    assert importance_probs(mean_sq, all_, floor=0).tolist() == pytest.approx([0.2, 0.1, 0.3, 0.4])
    assert importance_probs(mean_sq, all_, floor=0.1).tolist() == pytest.approx([0.9 * v + 0.025 for v in (0.2, 0.1, 0.3, 0.4)])
    p = importance_probs(mean_sq, all_)
    assert importance_weight(p, torch.arange(4)).double() @ p == pytest.approx(1.0)  # Σ_k p_k w_k = 1: unbiased per bin


def test_sigma_loss_history_keeps_the_newest_losses_of_each_bin_and_drops_non_finite_ones():
    history = SigmaLossHistory(bins=2, history=3)
    history.update(torch.tensor([0, 1, 0, 0, 0, 1]), torch.tensor([9.0, 2.0, 9.0, 1.0, 1.0, 2.0]))  # bin 0: 9, 9, 1, 1
    history.update(torch.tensor([0, 1, 1]), torch.tensor([1.0, float("nan"), 2.0]))
    assert history.count.tolist() == [5, 3] and sorted(history.losses[0].tolist()) == [1.0, 1.0, 1.0]
    assert history.probs().tolist() == pytest.approx([(1 - 1e-3) / 3 + 5e-4, (1 - 1e-3) * 2 / 3 + 5e-4])  # sqrt(1) : sqrt(4)
    back = SigmaLossHistory(bins=2, history=3)
    back.load_state_dict(history.state_dict())
    assert torch.equal(back.losses, history.losses) and torch.equal(back.count, history.count)


def test_adaptive_probs_are_proportional_to_exp_u_and_base_for_constant_u():
    u = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert adaptive_probs(u, floor=0).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert adaptive_probs(u + 5.0, floor=0.2).tolist() == pytest.approx([0.8 * v + 0.05 for v in (0.1, 0.2, 0.3, 0.4)])
    assert adaptive_probs(torch.full((8,), -1.7)).tolist() == pytest.approx([1 / 8] * 8)  # flat u: the base density, weights 1
