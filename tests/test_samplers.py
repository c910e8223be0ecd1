"""Samplers and σ grids against the exact denoiser of Gaussian data y ~ N(μ, s²I).

For that data D(x; σ) = μ + s²/(s²+σ²)·(x − μ), and the probability-flow ODE dx/dσ = (x − D)/σ
has the closed form x(σ) = μ + (x_T − μ)·√((s²+σ²)/(s²+σ_T²)).
"""

import math

import numpy as np
import pytest
import torch

from edmkit.diffusion.samplers import (
    SAMPLERS,
    SeededRandn,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_euler,
    sample_heun,
)
from edmkit.diffusion.schedules import karras_sigmas, loglinear_sigmas, sigma_schedule, vp_sigmas

MU, S = 0.3, 0.5
SIGMA_MAX, SIGMA_MIN = 80.0, 0.02


def gaussian_denoiser(x, sigma, labels):
    sigma = sigma.reshape(-1, 1, 1, 1)
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def ode_solution(x_T, sigma_T, sigma):
    return MU + (x_T - MU) * math.sqrt((S**2 + sigma**2) / (S**2 + sigma_T**2))


def terminal_error(sampler, steps, noise):
    """Max error at the last grid point of a Karras grid with `steps` intervals and no final zero."""
    sigmas = karras_sigmas(steps + 1, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)[:-1]  # ends at σ_min > 0
    x = sampler(gaussian_denoiser, noise, sigmas)
    exact = ode_solution(noise * SIGMA_MAX, SIGMA_MAX, sigmas[-1].item())
    return (x - exact).abs().max().item()


@pytest.fixture
def noise():
    return torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))


# --- σ grids ---------------------------------------------------------------------------------


def test_karras_sigmas_follow_eq5():
    steps, rho = 18, 7.0
    sigmas = karras_sigmas(steps, sigma_min=0.002, sigma_max=80.0, rho=rho)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    assert sigmas[-1].item() == 0.0 and bool((sigmas[:-1] > sigmas[1:]).all())
    for i in (0, 7, steps - 1):
        ref = (80.0 ** (1 / rho) + i / (steps - 1) * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
        assert sigmas[i].item() == pytest.approx(ref, rel=1e-6)
    assert karras_sigmas(1).tolist() == [80.0, 0.0]


def test_loglinear_sigmas_have_constant_log_ratio():
    sigmas = loglinear_sigmas(10, sigma_min=0.01, sigma_max=10.0)
    ratios = (sigmas[:-2] / sigmas[1:-1]).double()
    assert sigmas[-1].item() == 0.0 and sigmas[0].item() == pytest.approx(10.0)
    assert sigmas[-2].item() == pytest.approx(0.01)
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-5)


@pytest.mark.parametrize("spacing,first_t,last_t", [("trailing", 999, 99), ("leading", 900, 0), ("linspace", 999, 0)])
def test_vp_sigmas_map_ddpm_timesteps(spacing, first_t, last_t):
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    sigma_of_t = lambda t: math.sqrt((1 - alpha_bar[t]) / alpha_bar[t])  # noqa: E731
    sigmas = vp_sigmas(10, spacing=spacing)
    assert sigmas.shape == (11,) and sigmas[-1].item() == 0.0 and bool((sigmas[:-1] > sigmas[1:]).all())
    assert sigmas[0].item() == pytest.approx(sigma_of_t(first_t), rel=1e-6)
    assert sigmas[-2].item() == pytest.approx(sigma_of_t(last_t), rel=1e-6)


def test_schedule_and_sampler_names_and_steps_are_validated():
    assert torch.equal(sigma_schedule("karras", 5), karras_sigmas(5))
    with pytest.raises(ValueError, match="karras"):
        sigma_schedule("cosine", 5)
    for name in ("karras", "vp"):
        with pytest.raises(ValueError):
            sigma_schedule(name, 0)
    with pytest.raises(ValueError):
        loglinear_sigmas(0, sigma_min=0.1, sigma_max=1.0)
    with pytest.raises(ValueError):
        vp_sigmas(1001)
    with pytest.raises(ValueError):
        vp_sigmas(10, spacing="middle")
    assert get_sampler("heun") is sample_heun and set(SAMPLERS) == {"euler", "heun", "ddim", "ddpm", "dpmpp-2m", "dpmpp-3m"}
    with pytest.raises(ValueError, match="dpmpp-2m"):
        get_sampler("lms")
    with pytest.raises(ValueError):
        sample_euler(gaussian_denoiser, torch.zeros(1, 1, 2, 2), torch.tensor([1.0, 2.0, 0.0]))  # not decreasing


# --- convergence order on the probability-flow ODE -------------------------------------------


def test_heun_is_second_order(noise):
    ratio = terminal_error(sample_heun, 16, noise) / terminal_error(sample_heun, 64, noise)
    assert ratio >= 10, ratio


@pytest.mark.parametrize("sampler", [sample_euler, sample_ddim])
def test_euler_and_ddim_are_first_order(sampler, noise):
    ratio = terminal_error(sampler, 16, noise) / terminal_error(sampler, 64, noise)
    assert 3 <= ratio < 8, ratio


def test_dpmpp_2m_is_second_order(noise):
    ratio = terminal_error(sample_dpmpp_2m, 32, noise) / terminal_error(sample_dpmpp_2m, 128, noise)
    assert ratio >= 8, ratio


def test_dpmpp_3m_is_third_order(noise):
    ratio = terminal_error(sample_dpmpp_3m, 32, noise) / terminal_error(sample_dpmpp_3m, 128, noise)
    assert ratio >= 30, ratio  # 4³ = 64 asymptotically; 2nd order (the 3M of k-diffusion and DPM-Solver) gives ~12


def test_dpmpp_eta_0_draws_no_noise_and_eta_1_one_draw_per_step(noise):
    """η = 0 is the ODE solver (no noise); η > 0 takes another path (the SDE's drift, even with S_noise = 0) and draws
    fresh noise on every step but the last; that it still samples the data is the moments test's."""
    sigmas = karras_sigmas(12)
    calls = []
    randn = lambda x: calls.append(1) or torch.zeros_like(x)  # noqa: E731
    for sample in (sample_dpmpp_2m, sample_dpmpp_3m):
        a = sample(gaussian_denoiser, noise, sigmas, randn=randn)
        assert not calls
        b = sample(gaussian_denoiser, noise, sigmas, eta=1.0, S_noise=0.0, randn=randn)
        assert not torch.allclose(a, b)
        calls.clear()
        sample(gaussian_denoiser, noise, sigmas, eta=1.0, randn=randn)
        assert len(calls) == len(sigmas) - 2  # every step but the last (to σ = 0)
        calls.clear()


def test_dpmpp_2m_second_step_follows_lu_et_al_algorithm_2(noise):
    """Two steps on an uneven grid with D = f(σ) independent of x (α_t = 1 in Lu et al.'s notation).

    The order test cannot see a swapped r ↔ 1/r: its leading error telescopes over the grid.
    """
    f = lambda sigma: torch.log(sigma).reshape(-1, 1, 1, 1) ** 2  # noqa: E731
    sigmas = torch.tensor([10.0, 4.0, 0.5])
    x = sample_dpmpp_2m(lambda x, sigma, labels: f(sigma).expand_as(x), noise, sigmas)
    s = sigmas.double()
    lam = -s.log()
    h1, h2 = (lam[1] - lam[0]).item(), (lam[2] - lam[1]).item()
    r = h1 / h2
    d0, d1 = f(s[:1]).item(), f(s[1:2]).item()
    x1 = (s[1] / s[0]).item() * noise.double() * 10.0 - math.expm1(-h1) * d0
    x2 = (s[2] / s[1]).item() * x1 - math.expm1(-h2) * ((1 + 1 / (2 * r)) * d1 - 1 / (2 * r) * d0)
    torch.testing.assert_close(x.double(), x2, rtol=1e-5, atol=1e-5)


def test_ddim_eta0_equals_euler(noise):
    sigmas = vp_sigmas(20)
    a = sample_ddim(gaussian_denoiser, noise, sigmas, eta=0.0)
    b = sample_euler(gaussian_denoiser, noise, sigmas)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_song_et_al_eq12_in_vp_variable(eta, noise):
    """Reference DDIM written in x_t = √ᾱ·y + √(1−ᾱ)·ε with the DDIM paper's σ_t(η) (Eq. 16)."""
    sigmas = vp_sigmas(10)
    zs = [torch.randn(noise.shape, generator=torch.Generator().manual_seed(k)) for k in range(10)]
    queue = list(zs)
    x = sample_ddim(gaussian_denoiser, noise, sigmas, eta=eta, randn=lambda like: queue.pop(0))

    s = sigmas.double().tolist()
    alpha_bar = [1 / (1 + sig**2) for sig in s]
    x_t = noise.double() * s[0] * math.sqrt(alpha_bar[0])  # the same start point, unscaled
    for i in range(len(s) - 1):
        a, a_prev = alpha_bar[i], alpha_bar[i + 1]
        x0 = gaussian_denoiser(x_t / math.sqrt(a), torch.full((x_t.shape[0],), s[i], dtype=torch.float64), None)
        eps = (x_t - math.sqrt(a) * x0) / math.sqrt(1 - a)
        sigma_t = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        x_t = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma_t**2, 0.0)) * eps
        if sigma_t > 0:
            x_t = x_t + sigma_t * zs[i].double()
    torch.testing.assert_close(x.double(), x_t, rtol=1e-4, atol=1e-4)  # ᾱ_N = 1: same variable at the end


# --- stochastic samplers reproduce the data distribution -------------------------------------


@pytest.mark.parametrize(
    "name,run",
    [
        ("heun-churn", lambda d, n: sample_heun(d, n, karras_sigmas(128), S_churn=40, S_tmin=0.05, S_tmax=50)),
        ("ddpm", lambda d, n: sample_ddpm(d, n, vp_sigmas(1000))),
        ("ddim-eta1", lambda d, n: sample_ddim(d, n, karras_sigmas(512), eta=1.0)),
        ("dpmpp-2m-sde", lambda d, n: sample_dpmpp_2m(d, n, karras_sigmas(64), eta=1.0)),
        ("dpmpp-3m-sde", lambda d, n: sample_dpmpp_3m(d, n, karras_sigmas(64), eta=1.0)),
    ],
)
def test_stochastic_samplers_match_gaussian_moments(name, run):
    torch.manual_seed(1)
    noise = torch.randn(512, 1, 8, 8)  # 32768 independent scalar chains
    x = run(gaussian_denoiser, noise)
    m = noise.numel()
    # Prior mismatch: the start has std σ_max, not √(s²+σ_max²). Pushed through the ODE it biases the
    # mean by −μ·(s/√(s²+σ_max²)) and the std by a factor σ_max/√(s²+σ_max²); allow that plus
    # 5 standard errors plus 1.5% for the first-order discretisation of the ancestral steps.
    sigma_max = 80.0  # the smallest σ_0 of the three grids (vp's is 157), so the largest bias
    mean_bias = abs(MU) * S / math.sqrt(S**2 + sigma_max**2)
    std_bias = S * (1 - sigma_max / math.sqrt(S**2 + sigma_max**2))
    assert abs(x.mean().item() - MU) < mean_bias + 5 * S / math.sqrt(m) + 0.015 * S
    assert abs(x.std().item() - S) < std_bias + 5 * S / math.sqrt(2 * m) + 0.015 * S


def test_heun_churn_noise_levels_follow_algorithm_2(noise):
    """γ_i = min(S_churn/N, √2 − 1) inside [S_tmin, S_tmax], 0 outside; evaluations at σ̂ and σ_{i+1}."""
    sigmas = karras_sigmas(6)
    seen = []
    def denoiser(x, sigma, labels):
        seen.append(sigma[0].item())
        return gaussian_denoiser(x, sigma, labels)
    for S_churn, gamma in ((1000.0, math.sqrt(2) - 1), (1.2, 0.2)):
        seen.clear()
        sample_heun(denoiser, noise, sigmas, S_churn=S_churn, S_tmin=0.1, S_tmax=20.0)
        s = sigmas.tolist()
        expected = []
        for i in range(6):
            expected.append(s[i] * (1 + gamma) if 0.1 <= s[i] <= 20.0 else s[i])
            if s[i + 1] > 0:
                expected.append(s[i + 1])
        assert len(seen) == 11 and seen == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("S_churn, gamma", [(0.6, 0.2), (30.0, math.sqrt(2) - 1)])  # γ = S_churn/N, capped at √2 − 1
def test_heun_churn_matches_algorithm_2_written_out(S_churn, gamma, noise):
    """EDM Algorithm 2 line by line in float64 on the grid (10, 2, 0.5, 0) with S_tmin = 0.5, S_tmax = 2 (both ends
    churned, σ = 10 not), S_noise = 1.3 and given ε's: x̂ = x + √(σ̂² − σ²)·S_noise·ε, an Euler step from x̂ at σ̂,
    the trapezoidal correction except on the last step to σ = 0."""
    sigmas = torch.tensor([10.0, 2.0, 0.5, 0.0])
    eps = [torch.randn(noise.shape, generator=torch.Generator().manual_seed(10 + k)) for k in range(2)]
    queue = list(eps)
    x = sample_heun(gaussian_denoiser, noise, sigmas, S_churn=S_churn, S_tmin=0.5, S_tmax=2.0, S_noise=1.3,
                    randn=lambda like: queue.pop(0))
    assert not queue

    def D(x, sigma):
        return gaussian_denoiser(x, torch.full((x.shape[0],), sigma, dtype=torch.float64), None)

    s, z = [10.0, 2.0, 0.5, 0.0], list(eps)
    x_ref = noise.double() * s[0]
    for i in range(3):
        g = gamma if 0.5 <= s[i] <= 2.0 else 0.0
        sigma_hat = s[i] * (1 + g)
        x_hat = x_ref + math.sqrt(sigma_hat**2 - s[i] ** 2) * 1.3 * z.pop(0).double() if g > 0 else x_ref
        d = (x_hat - D(x_hat, sigma_hat)) / sigma_hat
        x_ref = x_hat + (s[i + 1] - sigma_hat) * d
        if s[i + 1] != 0:
            d_prime = (x_ref - D(x_ref, s[i + 1])) / s[i + 1]
            x_ref = x_hat + (s[i + 1] - sigma_hat) * (d + d_prime) / 2
    torch.testing.assert_close(x.double(), x_ref, rtol=1e-5, atol=1e-5)


def test_heun_last_step_to_zero_is_a_plain_euler_step(noise):
    """On the step to σ = 0 Heun evaluates D once and returns it (there is no slope at σ = 0 to average with)."""
    calls = []

    def denoiser(x, sigma, labels):
        calls.append(sigma[0].item())
        return gaussian_denoiser(x, sigma, labels)

    x = sample_heun(denoiser, noise, torch.tensor([3.0, 0.0]))
    assert calls == [3.0]
    torch.testing.assert_close(x, gaussian_denoiser(noise * 3.0, torch.full((4,), 3.0), None), rtol=0, atol=1e-6)


def test_ddpm_matches_ho_et_al_posterior():
    """DDPM ancestral sampling written with Ho et al.'s posterior q(x_{t−1} | x_t, x̂0) (Eqs. 6-7) in the VP variable:
    mean √ᾱ_{t−1}β_t/(1−ᾱ_t)·x̂0 + √α_t(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t, variance β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t, with
    α_t = ᾱ_t/ᾱ_{t−1} between the grid's timesteps. η = 0 (DDIM) would drop the noise; the roles of σ_up and
    σ_down swapped would change the mean."""
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    sigmas = vp_sigmas(8)
    zs = [torch.randn(noise.shape, generator=torch.Generator().manual_seed(20 + k)) for k in range(7)]
    queue = list(zs)
    x = sample_ddpm(gaussian_denoiser, noise, sigmas, randn=lambda like: queue.pop(0))
    assert not queue  # one fresh draw per step except the last (β̃ = 0 there)

    s = sigmas.double().tolist()
    abar = [1 / (1 + sig**2) for sig in s]
    x_t = noise.double() * s[0] * math.sqrt(abar[0])
    for i in range(len(s) - 1):
        a_t, a_prev = abar[i], abar[i + 1]
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev
        x0 = gaussian_denoiser(x_t / math.sqrt(a_t), torch.full((3,), s[i], dtype=torch.float64), None)
        mean = math.sqrt(a_prev) * beta / (1 - a_t) * x0 + math.sqrt(alpha) * (1 - a_prev) / (1 - a_t) * x_t
        var = (1 - a_prev) / (1 - a_t) * beta
        x_t = mean + math.sqrt(var) * zs[i].double() if i < len(s) - 2 else mean
    torch.testing.assert_close(x.double(), x_t, rtol=1e-4, atol=1e-4)


def test_churn_changes_heun_and_uses_randn(noise):
    sigmas = karras_sigmas(10)
    calls = []
    def randn(like):
        calls.append(1)
        return torch.randn_like(like)
    x0 = sample_heun(gaussian_denoiser, noise, sigmas)
    x1 = sample_heun(gaussian_denoiser, noise, sigmas, S_churn=10, S_tmin=0.05, S_tmax=50, randn=randn)
    in_range = sum(0.05 <= s <= 50 for s in sigmas[:-1].tolist())
    assert len(calls) == in_range > 0
    assert (x0 - x1).abs().max() > 1e-2


# --- per-sample seeded noise -----------------------------------------------------------------


def test_seeded_randn_rows_depend_only_on_their_seed():
    batch = SeededRandn(range(16)).randn([3, 4, 4])
    single = SeededRandn([5]).randn([3, 4, 4])
    assert batch.shape == (16, 3, 4, 4)
    assert torch.equal(batch[5], single[0])
    assert not torch.equal(batch[4], batch[5])
    like = SeededRandn([5]).randn_like(torch.zeros(1, 3, 4, 4))
    assert torch.equal(like, single)
    with pytest.raises(ValueError):
        SeededRandn([1, 2]).randn_like(torch.zeros(3, 1))


def test_seeded_heun_with_churn_is_batch_size_invariant():
    def run(seeds):
        rnd = SeededRandn(seeds)
        return sample_heun(
            gaussian_denoiser, rnd.randn([1, 4, 4]), karras_sigmas(8), S_churn=20, S_tmin=0.05, S_tmax=50, randn=rnd
        )

    batch, single = run(list(range(100, 116))), run([105])
    torch.testing.assert_close(batch[5:6], single, rtol=0, atol=1e-6)
    assert (batch[4] - batch[5]).abs().max() > 1e-2


# --- callback contract -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_reports_every_step(name, noise):
    sigmas = karras_sigmas(6)
    seen = []
    x = get_sampler(name)(gaussian_denoiser, noise, sigmas, callback=seen.append)
    assert [c["i"] for c in seen] == list(range(6))
    assert [c["sigma"] for c in seen] == pytest.approx(sigmas[:-1].tolist())
    assert [c["sigma_next"] for c in seen] == pytest.approx(sigmas[1:].tolist())
    assert torch.equal(seen[-1]["x"], x) and seen[-1]["denoised"].shape == noise.shape
    assert x.dtype == torch.float32
