"""Preconditioning: unit-variance network inputs and targets across sigma; each formulation's coefficients exactly."""

import math

import numpy as np
import pytest
import torch

from edmkit.diffusion.loss import EDMLoss, edm_loss_weight
from edmkit.diffusion.precond import (
    SIGMA_RANGES,
    Denoiser,
    ddpm_precond,
    edm_precond,
    flow_precond,
    iddpm_precond,
    iddpm_sigma_to_index,
    iddpm_sigmas,
    network_target,
    ve_precond,
    vp_precond,
    vp_sigma_to_t,
    vp_t_to_sigma,
)


def test_unit_variance_input_and_target_over_sigma():
    sigma_data = 0.5
    g = torch.Generator().manual_seed(0)
    y = torch.randn(20_000, generator=g) * sigma_data  # data with std sigma_data
    for sigma in torch.logspace(torch.log10(torch.tensor(0.002)), torch.log10(torch.tensor(80.0)), 12):
        n = torch.randn(20_000, generator=g) * sigma
        x = y + n
        _, _, c_in, _ = edm_precond(sigma, sigma_data=sigma_data)
        assert abs((c_in * x).std().item() - 1) < 0.03, sigma
        target = network_target(y, x, sigma, sigma_data=sigma_data)
        assert abs(target.std().item() - 1) < 0.03, sigma


def test_loss_weight_gives_unit_loss_for_zero_output():
    # With F = 0 the weighted loss lambda(sigma) * c_out^2 * E[target^2] equals 1 (EDM Sec. 5).
    sigma = torch.tensor([0.01, 0.5, 10.0])
    _, c_out, _, _ = edm_precond(sigma, sigma_data=0.5)
    assert torch.allclose(edm_loss_weight(sigma, sigma_data=0.5) * c_out**2, torch.ones(3), rtol=1e-5)


def test_stratified_sigma_has_lower_variance_of_batch_mean_weight():
    loss_iid = EDMLoss(sigma_sampling="lognormal")
    loss_ld = EDMLoss(sigma_sampling="stratified")
    g = torch.Generator().manual_seed(1)
    means_iid = torch.stack([loss_iid.sample_sigma(32, generator=g).log().mean() for _ in range(300)])
    means_ld = torch.stack([loss_ld.sample_sigma(32, generator=g).log().mean() for _ in range(300)])
    assert means_ld.var() < 0.2 * means_iid.var()


SIGMAS = [0.002, 0.05, 0.5, 3.0, 80.0]


def ddpm_reference(t):
    """sigma_t and alpha_bar_t of DDPM's linear beta schedule (1e-4 .. 0.02, T = 1000), in NumPy float64."""
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[t]
    return math.sqrt((1 - alpha_bar) / alpha_bar), alpha_bar


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_edm_coefficients_are_table1(sigma, sigma_data):
    """EDM Table 1 in float64 by hand: c_skip, c_out, c_in, c_noise = sd^2/(s^2+sd^2), s sd/sqrt(s^2+sd^2), 1/sqrt(s^2+sd^2), ln(s)/4."""
    got = edm_precond(torch.tensor(sigma, dtype=torch.float64), sigma_data=sigma_data)
    d = sigma**2 + sigma_data**2
    expected = (sigma_data**2 / d, sigma * sigma_data / math.sqrt(d), 1 / math.sqrt(d), math.log(sigma) / 4)
    assert [v.item() for v in got] == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_ddpm_coefficients_are_the_vp_column(t):
    """Epsilon prediction (EDM Table 1, VP): c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2+1) = sqrt(alpha_bar_t), c_noise t/T.

    sigma_data must not enter: DDPM assumes unit-variance data.
    """
    sigma, alpha_bar = ddpm_reference(t)
    for sigma_data in (0.5, 1.0):
        got = ddpm_precond(torch.tensor(sigma, dtype=torch.float64), sigma_data=sigma_data)
        expected = (1.0, -sigma, math.sqrt(alpha_bar), t / 1000)
        assert [v.item() for v in got] == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_ddpm_c_noise_interpolates_the_step_in_log_sigma():
    """Between two steps, c_noise is the fractional index (linear in ln sigma): the geometric mean of sigma_t, sigma_t+1 is t + 1/2."""
    for t in (3, 400, 998):
        mid = math.sqrt(ddpm_reference(t)[0] * ddpm_reference(t + 1)[0])
        c_noise = ddpm_precond(torch.tensor(mid, dtype=torch.float64), sigma_data=0.5)[3].item()
        assert c_noise == pytest.approx((t + 0.5) / 1000, abs=1e-9)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_flow_coefficients(sigma):
    """Rectified flow in sigma: t = sigma/(1+sigma); c_skip = 1-t, c_out = -t, c_in = 1-t, c_noise = t (precond.py docstring)."""
    t = sigma / (1 + sigma)
    got = flow_precond(torch.tensor(sigma, dtype=torch.float64), sigma_data=0.5)
    assert [v.item() for v in got] == pytest.approx((1 - t, -t, 1 - t, t), rel=1e-12, abs=1e-15)


# --- EDM Table 1's VP, VE and iDDPM columns, each formula written out here in float64 ---------------------------

BETA_D, BETA_MIN = 19.9, 0.1


def vp_t_reference(sigma):
    """EDM Table 1, VP: sigma^-1(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(sigma^2 + 1)) - beta_min) / beta_d, as printed."""
    return (math.sqrt(BETA_MIN**2 + 2 * BETA_D * math.log(sigma**2 + 1)) - BETA_MIN) / BETA_D


def iddpm_reference(M=1000, C_1=0.001, C_2=0.008):
    """EDM Table 1, iDDPM: the recursion u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1)/abar(j), C_1) - 1) from u_M = 0, step by step."""
    abar = lambda j: math.sin(0.5 * math.pi * j / (M * (C_2 + 1))) ** 2  # noqa: E731
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(abar(j - 1) / abar(j), C_1) - 1)
    return np.array(u)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_vp_coefficients_are_table1(sigma):
    """VP: c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2+1), c_noise (M-1) sigma^-1(sigma), M = 1000; sigma_data unused."""
    expected = (1.0, -sigma, 1 / math.sqrt(sigma**2 + 1), 999 * vp_t_reference(sigma))
    for sigma_data in (0.5, 1.0):
        got = vp_precond(torch.tensor(sigma, dtype=torch.float64), sigma_data=sigma_data)
        assert [v.item() for v in got] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_vp_c_noise_at_hand_picked_sigma():
    """sigma(1) = sqrt(e^(19.9/2 + 0.1) - 1) has c_noise 999; sigma(1/2) = sqrt(e^(19.9/8 + 0.05) - 1) has 499.5; float32 too."""
    for t, sigma in [(1.0, math.sqrt(math.exp(10.05) - 1)), (0.5, math.sqrt(math.exp(19.9 / 8 + 0.05) - 1)), (1e-5, math.sqrt(math.expm1(19.9e-10 / 2 + 1e-6)))]:
        for dtype in (torch.float64, torch.float32):
            c_noise = vp_precond(torch.tensor(sigma, dtype=dtype), sigma_data=0.5)[3].item()
            assert c_noise == pytest.approx(999 * t, rel=1e-9 if dtype == torch.float64 else 1e-5)


def test_vp_sigma_and_t_are_inverse():
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) and t(sigma) undo each other over t in [eps_t, 1], sigma in [1e-3, 200]."""
    t = torch.cat([torch.logspace(-5, 0, 200, dtype=torch.float64), torch.linspace(0.01, 1, 100, dtype=torch.float64)])
    sigma = vp_t_to_sigma(t)
    assert sigma.tolist() == pytest.approx([math.sqrt(math.exp(0.5 * BETA_D * v**2 + BETA_MIN * v) - 1) for v in t.tolist()], rel=1e-9)
    torch.testing.assert_close(vp_sigma_to_t(sigma), t, rtol=1e-10, atol=0)
    sigma = torch.logspace(-3, math.log10(200), 100, dtype=torch.float64)
    torch.testing.assert_close(vp_t_to_sigma(vp_sigma_to_t(sigma)), sigma, rtol=1e-10, atol=0)
    small = torch.tensor([2e-3, 1e-2], dtype=torch.float32)  # float32 keeps its precision at small sigma (no 1 + sigma^2 rounding)
    assert vp_sigma_to_t(small).tolist() == pytest.approx([vp_t_reference(s) for s in small.tolist()], rel=1e-5)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_ve_coefficients_are_table1(sigma):
    """VE: c_skip 1, c_out sigma, c_in 1, c_noise ln(sigma / 2); sigma_data unused."""
    for sigma_data in (0.5, 1.0):
        got = ve_precond(torch.tensor(sigma, dtype=torch.float64), sigma_data=sigma_data)
        assert [v.item() for v in got] == pytest.approx((1.0, sigma, 1.0, math.log(sigma / 2)), rel=1e-12, abs=1e-15)
    assert ve_precond(torch.tensor([2.0, 2 * math.e, 1.0]), sigma_data=0.5)[3].tolist() == pytest.approx([0.0, 1.0, -math.log(2)], abs=1e-6)


def test_iddpm_levels_follow_the_recursion():
    """u_M = 0, strictly increasing as j decreases, equal to the step-by-step recursion; a few steps by hand."""
    u = iddpm_sigmas()
    assert u.dtype == torch.float64 and u.shape == (1001,) and u[1000].item() == 0
    assert (u[:-1] > u[1:]).all()
    assert u.tolist() == pytest.approx(iddpm_reference().tolist(), rel=1e-11, abs=0)
    abar = lambda j: math.sin(0.5 * math.pi * j / (1000 * 1.008)) ** 2  # noqa: E731
    assert u[999].item() == pytest.approx(math.sqrt(abar(1000) / abar(999) - 1), rel=1e-9)  # from u_M = 0
    for j in (500, 10):
        assert u[j - 1].item() == pytest.approx(math.sqrt((u[j].item() ** 2 + 1) * abar(j) / abar(j - 1) - 1), rel=1e-9)
    assert u[0].item() ** 2 + 1 == pytest.approx((u[1].item() ** 2 + 1) / 0.001, rel=1e-9)  # abar(0) = 0: the C_1 floor
    assert iddpm_sigmas(M=10, C_2=0.02).tolist() == pytest.approx(iddpm_reference(M=10, C_2=0.02).tolist(), rel=1e-11)


@pytest.mark.parametrize("sigma", SIGMAS + [20.0])
def test_iddpm_coefficients_are_table1(sigma):
    """iDDPM: c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2+1), c_noise M - 1 - argmin_j |u_j - sigma|."""
    u = iddpm_reference()
    expected = (1.0, -sigma, 1 / math.sqrt(sigma**2 + 1), 999 - int(np.abs(u - sigma).argmin()))
    got = iddpm_precond(torch.tensor(sigma, dtype=torch.float64), sigma_data=0.5)
    assert [v.item() for v in got] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_iddpm_c_noise_at_hand_picked_sigma():
    """sigma = u_j gives M-1-j (float32 u_j too); between two levels the nearer wins; 0 -> -1 (u_M); above u_0 -> 999."""
    u = iddpm_reference()
    for j in (0, 8, 500, 998, 999):
        for dtype in (torch.float64, torch.float32):
            assert iddpm_precond(torch.tensor(u[j], dtype=dtype), sigma_data=0.5)[3].item() == 999 - j
    for j in (3, 700):
        near_next = 0.4 * u[j] + 0.6 * u[j + 1]
        near_this = 0.6 * u[j] + 0.4 * u[j + 1]
        assert iddpm_precond(torch.tensor([near_next, near_this], dtype=torch.float64), sigma_data=0.5)[3].tolist() == [998 - j, 999 - j]
    assert iddpm_precond(torch.tensor([0.0, 1e6]), sigma_data=0.5)[3].tolist() == [-1, 999]
    sigma = torch.tensor(u[[5, 6, 7, 8]], dtype=torch.float32).reshape(2, 1, 1, 2)
    assert iddpm_sigma_to_index(sigma).shape == (2, 1, 1, 2) and iddpm_sigma_to_index(sigma).flatten().tolist() == [5, 6, 7, 8]


def test_sigma_ranges_are_table1s_sampling_ranges():
    """vp: sigma(eps_s = 1e-3) .. sigma(1); ve: 0.02 .. 100; iddpm: u_{M-1} .. u_{j_0 = 8}; edm 0.002 .. 80."""
    u = iddpm_reference()
    vp = lambda t: math.sqrt(math.exp(0.5 * BETA_D * t**2 + BETA_MIN * t) - 1)  # noqa: E731
    assert SIGMA_RANGES["vp"] == pytest.approx((vp(1e-3), vp(1.0)), rel=1e-9)
    assert SIGMA_RANGES["ve"] == (0.02, 100.0)
    assert SIGMA_RANGES["iddpm"] == pytest.approx((u[999], u[8]), rel=1e-9)
    assert SIGMA_RANGES["edm"] == (0.002, 80.0)
    assert SIGMA_RANGES["ddpm"] == pytest.approx((ddpm_reference(0)[0], ddpm_reference(999)[0]), rel=1e-9)


class Recorder(torch.nn.Module):
    """A backbone F(x; c_noise) = 2 x + c_noise that remembers what it was given."""

    def forward(self, x, c_noise, labels=None):
        self.seen = (x.clone(), c_noise.clone())
        return 2 * x + c_noise.reshape(-1, 1, 1, 1)


def test_denoiser_applies_the_preconditioning():
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), with the coefficients written out here (EDM, sigma_data 0.5)."""
    net = Denoiser(Recorder(), sigma_data=0.5, logvar_channels=8)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 3, 3, generator=g) * 4
    sigma = torch.tensor([0.1, 7.0])
    D = net(x, sigma).double()
    s = sigma.double().reshape(-1, 1, 1, 1)
    c_in, c_noise = 1 / (s**2 + 0.25).sqrt(), s.log() / 4
    F_x = 2 * c_in * x.double() + c_noise
    expected = 0.25 / (s**2 + 0.25) * x.double() + s * 0.5 / (s**2 + 0.25).sqrt() * F_x
    torch.testing.assert_close(D, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.net.seen[0].double(), c_in * x.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(net.net.seen[1].double(), c_noise.flatten(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("formulation, c_noise", [
    ("edm", lambda s: s.log() / 4), ("flow", lambda s: s / (1 + s)), ("ddpm", lambda s: ddpm_precond(s, sigma_data=0.5)[3]),
    ("ve", lambda s: (s / 2).log()), ("vp", lambda s: 999 * vp_sigma_to_t(s)),
    ("iddpm", lambda s: torch.tensor([999 - int(np.abs(iddpm_reference() - v).argmin()) for v in s.tolist()], dtype=s.dtype)),
], ids=["edm", "flow", "ddpm", "ve", "vp", "iddpm"])
def test_uncertainty_reads_c_noise(formulation, c_noise):
    """u(sigma) = linear(MP-Fourier(c_noise)) (EDM2 Eq. 21): a function of the formulation's c_noise only, not of x."""
    net = Denoiser(Recorder(), formulation=formulation, logvar_channels=16)
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0])
    _, u = net(torch.randn(4, 1, 2, 2), sigma, return_logvar=True)
    _, u_other_x = net(torch.randn(4, 1, 2, 2) * 5, sigma, return_logvar=True)
    expected = net.logvar_linear(net.logvar_fourier(c_noise(sigma.double()).float()))
    torch.testing.assert_close(u.flatten(), expected.flatten(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u_other_x, u, rtol=0, atol=0)


def test_logvar_at_is_the_forward_uncertainty_and_leaves_train_mode_weights_alone():
    from edmkit.checkpoint import build_denoiser
    from edmkit.presets import get_preset

    torch.manual_seed(0)
    net = build_denoiser(get_preset("tiny")).train()
    with torch.no_grad():
        net.logvar_linear.weight.mul_(3.0)  # off the unit norm: a train-mode forward of the head would rescale it in place
    before = net.logvar_linear.weight.clone()
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0])
    u = net.logvar_at(sigma)
    assert torch.equal(net.logvar_linear.weight, before) and net.logvar_linear.training
    net.eval()
    _, logvar = net(torch.zeros(4, 1, 28, 28), sigma, return_logvar=True)
    assert torch.allclose(u, logvar.flatten(), atol=1e-6) and u.std() > 0
