"""Preconditioning: unit-variance network inputs and targets across sigma; each formulation's coefficients exactly."""

import math

import numpy as np
import pytest
import torch

from edmkit.diffusion.loss import EDMLoss, edm_loss_weight
from edmkit.diffusion.precond import Denoiser, ddpm_precond, edm_precond, flow_precond, network_target


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
    loss_iid = EDMLoss(stratified=False)
    loss_ld = EDMLoss(stratified=True)
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
], ids=["edm", "flow", "ddpm"])
def test_uncertainty_reads_c_noise(formulation, c_noise):
    """u(sigma) = linear(MP-Fourier(c_noise)) (EDM2 Eq. 21): a function of the formulation's c_noise only, not of x."""
    net = Denoiser(Recorder(), formulation=formulation, logvar_channels=16)
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0])
    _, u = net(torch.randn(4, 1, 2, 2), sigma, return_logvar=True)
    _, u_other_x = net(torch.randn(4, 1, 2, 2) * 5, sigma, return_logvar=True)
    expected = net.logvar_linear(net.logvar_fourier(c_noise(sigma.double()).float()))
    torch.testing.assert_close(u.flatten(), expected.flatten(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u_other_x, u, rtol=0, atol=0)
