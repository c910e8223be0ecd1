"""EDM / DDPM (epsilon, discrete VP) / rectified-flow / VP / VE / iDDPM formulations: preconditioning, sigma <-> t, losses, training."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edmkit import checkpoint as ckpt
from edmkit.cli import main
from edmkit.config import FORMULATIONS as CONFIG_FORMULATIONS
from edmkit.config import NetworkConfig
from edmkit.diffusion.loss import LOSSES, DDPMLoss, EDMLoss, FlowLoss, IDDPMLoss, VELoss, VPLoss, make_loss
from edmkit.diffusion.precond import (
    FORMULATIONS,
    Denoiser,
    ddpm_alpha_bar,
    ddpm_sigma_to_t,
    ddpm_sigmas,
    ddpm_t_to_sigma,
    flow_sigma_to_t,
    flow_t_to_sigma,
    iddpm_sigmas,
    network_target,
)
from edmkit.diffusion.schedules import vp_sigmas
from edmkit.nn.unet import UNet
from edmkit.presets import get_preset, resolve_formulation, resolve_ladder
from edmkit.sampling.generate import generate_images
from edmkit.training.ema import PowerFunctionEMA
from edmkit.training.loop import train_step
from edmkit.training.run_state import TrainState

SIGMAS = torch.logspace(math.log10(0.01), math.log10(80.0), 9)


def noisy(sigma, *, sigma_data, n=20_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, generator=g) * sigma_data
    eps = torch.randn(n, generator=g)
    return y, eps, y + sigma * eps


def test_registries_agree():
    assert set(FORMULATIONS) == set(CONFIG_FORMULATIONS) == set(LOSSES)


@pytest.mark.parametrize("sigma", SIGMAS.tolist())
def test_edm_input_and_target_have_unit_variance(sigma):
    y, eps, x = noisy(torch.tensor(sigma), sigma_data=0.5)
    _, _, c_in, _ = FORMULATIONS["edm"](torch.tensor(sigma), sigma_data=0.5)
    assert (c_in * x).std().item() == pytest.approx(1, abs=0.03)
    assert network_target(y, x, torch.tensor(sigma), sigma_data=0.5).std().item() == pytest.approx(1, abs=0.03)


@pytest.mark.parametrize("t", [0, 10, 250, 999])
def test_ddpm_target_is_eps_and_input_unit_variance_for_unit_data(t):
    sigma = ddpm_t_to_sigma(torch.tensor(float(t)))
    y, eps, x = noisy(sigma, sigma_data=1.0)  # DDPM assumes unit-variance data (EDM Table 1, VP)
    target = network_target(y, x, sigma, sigma_data=1.0, formulation="ddpm")
    assert torch.allclose(target, eps, atol=1e-3)  # epsilon prediction: unit variance at every step
    _, _, c_in, c_noise = FORMULATIONS["ddpm"](sigma, sigma_data=1.0)
    assert (c_in * x).std().item() == pytest.approx(1, abs=0.03)
    assert c_noise.item() == pytest.approx(t / 1000, abs=1e-4)
    # and the scaled input is exactly DDPM's x_t = sqrt(alpha_bar) y + sqrt(1 - alpha_bar) eps
    ab = ddpm_alpha_bar()[t].float()
    assert torch.allclose(c_in * x, ab.sqrt() * y + (1 - ab).sqrt() * eps, atol=1e-4)


@pytest.mark.parametrize("sigma", SIGMAS.tolist())
def test_flow_input_is_the_interpolant_and_target_the_velocity(sigma):
    sigma = torch.tensor(sigma)
    y, eps, x = noisy(sigma, sigma_data=0.5, n=1000)
    t = flow_sigma_to_t(sigma)
    _, _, c_in, c_noise = FORMULATIONS["flow"](sigma, sigma_data=0.5)
    assert torch.allclose(c_in * x, (1 - t) * y + t * eps, atol=1e-5)
    assert torch.allclose(network_target(y, x, sigma, sigma_data=0.5, formulation="flow"), eps - y, atol=1e-3 * (1 + sigma.item()))
    assert c_noise.item() == pytest.approx(t.item())


@pytest.mark.parametrize("formulation", ["vp", "iddpm"])
@pytest.mark.parametrize("sigma", SIGMAS.tolist() + [500.0])
def test_vp_and_iddpm_input_unit_variance_for_unit_data_and_target_is_eps(formulation, sigma):
    """What EDM Table 1 promises for VP and iDDPM: c_in x has unit variance for unit-variance data (sigma_data = 1: c_in ignores
    sigma_data), and the target is eps (unit variance for any data). With sigma_data = 0.5 the input is below 1 at low sigma."""
    sigma = torch.tensor(sigma)
    y, eps, x = noisy(sigma, sigma_data=1.0)
    _, _, c_in, _ = FORMULATIONS[formulation](sigma, sigma_data=1.0)
    assert (c_in * x).std().item() == pytest.approx(1, abs=0.03)
    assert torch.allclose(network_target(y, x, sigma, sigma_data=1.0, formulation=formulation), eps, atol=1e-3)
    y, eps, x = noisy(sigma, sigma_data=0.5)
    _, _, c_in, _ = FORMULATIONS[formulation](sigma, sigma_data=0.5)
    expected = math.sqrt((0.25 + sigma.item() ** 2) / (1 + sigma.item() ** 2))
    assert (c_in * x).std().item() == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("sigma", SIGMAS.tolist())
def test_ve_target_is_minus_eps_and_input_is_not_scaled(sigma):
    """VE promises only a unit-variance target: (y - x) / sigma = -eps; c_in = 1 leaves the input's std at sqrt(sigma_data^2 + sigma^2)."""
    sigma = torch.tensor(sigma)
    y, eps, x = noisy(sigma, sigma_data=0.5)
    assert torch.allclose(network_target(y, x, sigma, sigma_data=0.5, formulation="ve"), -eps, atol=1e-3)
    _, _, c_in, _ = FORMULATIONS["ve"](sigma, sigma_data=0.5)
    assert (c_in * x).std().item() == pytest.approx(math.sqrt(0.25 + sigma.item() ** 2), rel=0.03)


def test_ddpm_sigma_t_round_trips_and_matches_the_schedule():
    t = torch.linspace(0, 999, 3001)
    assert torch.allclose(ddpm_sigma_to_t(ddpm_t_to_sigma(t)), t, atol=1e-3)
    sigma = torch.logspace(math.log10(0.0101), math.log10(157.0), 200)
    assert torch.allclose(ddpm_t_to_sigma(ddpm_sigma_to_t(sigma)), sigma, rtol=1e-4)
    grid = ddpm_sigmas()
    assert grid[0].item() == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-6)  # sigma_0 = sqrt(beta_0 / (1 - beta_0))
    assert torch.allclose(vp_sigmas(1000, spacing="linspace")[:-1].flip(0).double(), grid, rtol=1e-6)
    assert torch.equal(ddpm_t_to_sigma(torch.arange(1000)), grid.float())


def test_flow_sigma_t_round_trips():
    t = torch.linspace(0.001, 0.999, 500, dtype=torch.float64)
    assert torch.allclose(flow_sigma_to_t(flow_t_to_sigma(t)), t)
    sigma = torch.logspace(-3, 3, 100, dtype=torch.float64)
    assert torch.allclose(flow_t_to_sigma(flow_sigma_to_t(sigma)), sigma)


class Affine(torch.nn.Module):
    """A stand-in backbone F(x) = a x + b c_noise with learnable a, b."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(0.3)), torch.nn.Parameter(torch.tensor(-0.2))

    def forward(self, x, c_noise, labels=None):
        return self.a * x + self.b * c_noise.reshape(-1, 1, 1, 1)


def papers_mse(formulation, y, eps, sigma):
    """The paper's per-sample loss with the Affine backbone, in its own variables (float64, no edmkit preconditioning).

    DDPM (Ho et al. 2020, L_simple): step t with sigma_t, x_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps, ||eps_theta(x_t, t/T) - eps||^2.
    Rectified flow: t = sigma / (1 + sigma), x_t = (1 - t) y + t eps, ||v_theta(x_t, t) - (eps - y)||^2.
    VP (Song et al. 2021): t(sigma), alpha_bar = 1 / (1 + sigma^2), x_t as DDPM, ||eps_theta(x_t, 999 t) - eps||^2.
    iDDPM: level j with u_j = sigma, alpha_bar_j = 1 / (1 + u_j^2), x_t as DDPM, ||eps_theta(x_t, 999 - j) - eps||^2.
    VE (NCSN): x = y + sigma eps, score s_theta = F / sigma, sigma^2 ||s_theta + eps / sigma||^2 = ||F(x, ln(sigma/2)) + eps||^2.
    """
    affine = Affine()
    a, b = affine.a.item(), affine.b.item()
    y, eps, sigma = y.double(), eps.double(), sigma.double()
    if formulation == "ddpm":
        alpha_bar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))
        grid = ((1 - alpha_bar) / alpha_bar).sqrt()
        t = (sigma[:, None].log() - grid.log()).abs().argmin(dim=1)  # the discrete step each sigma was drawn from
        assert torch.allclose(grid[t], sigma, rtol=1e-6)
        ab = alpha_bar[t].reshape(-1, 1, 1, 1)
        x_t = ab.sqrt() * y + (1 - ab).sqrt() * eps
        prediction, target = a * x_t + b * (t / 1000).reshape(-1, 1, 1, 1), eps
    elif formulation in ("vp", "iddpm"):
        ab = (1 / (1 + sigma**2)).reshape(-1, 1, 1, 1)
        x_t = ab.sqrt() * y + (1 - ab).sqrt() * eps
        if formulation == "vp":
            c_noise = 999 * (torch.sqrt(0.01 + 2 * 19.9 * torch.log(sigma**2 + 1)) - 0.1) / 19.9
        else:
            j = (sigma[:, None] - iddpm_sigmas()).abs().argmin(dim=1)  # the level each sigma was drawn from
            assert torch.allclose(iddpm_sigmas()[j], sigma, rtol=1e-6)
            c_noise = 999 - j.double()
        prediction, target = a * x_t + b * c_noise.reshape(-1, 1, 1, 1), eps
    elif formulation == "ve":
        prediction, target = a * (y + sigma.reshape(-1, 1, 1, 1) * eps) + b * (sigma / 2).log().reshape(-1, 1, 1, 1), -eps
    else:
        t = (sigma / (1 + sigma)).reshape(-1, 1, 1, 1)
        x_t = (1 - t) * y + t * eps
        prediction, target = a * x_t + b * t, eps - y
    return (prediction - target).square().mean(dim=(1, 2, 3))


@pytest.mark.parametrize("uncertainty", [False, True])
@pytest.mark.parametrize("formulation", ["ddpm", "flow", "vp", "ve", "iddpm"])
def test_losses_are_the_papers_eps_and_velocity_mse(formulation, uncertainty):
    """The optimized loss is the eps-MSE (DDPM) / velocity MSE (flow) computed from the papers' own variables; with the
    uncertainty weighting on, that MSE / e^u + u (EDM2 Eq. 21) with u the network's log-variance."""
    net = Denoiser(Affine(), formulation=formulation, logvar_channels=8)
    loss_fn = make_loss(get_preset("tiny").override("network", formulation=formulation).override("loss", uncertainty=uncertainty))
    g = torch.Generator().manual_seed(0)
    y = torch.randn(16, 1, 4, 4, generator=g) * 0.5
    sigma = loss_fn.sample_sigma(16, generator=g)
    eps = torch.randn(y.shape, generator=g)
    loss, weighted = loss_fn(net, y, None, sigma=sigma, noise=eps)
    mse = papers_mse(formulation, y, eps, sigma)
    torch.testing.assert_close(weighted.double(), mse, rtol=2e-3, atol=1e-5)
    if uncertainty:
        _, u = net(y + sigma.reshape(-1, 1, 1, 1) * eps, sigma, return_logvar=True)
        u = u.flatten().double()
        assert u.abs().max() > 0.3  # far enough from 0 that a wrong Eq. 21 shows
        torch.testing.assert_close(loss.double(), mse / u.exp() + u, rtol=2e-3, atol=1e-5)
    else:
        torch.testing.assert_close(loss.double(), mse, rtol=2e-3, atol=1e-5)


def test_ddpm_draws_discrete_steps_uniformly():
    loss_fn = DDPMLoss()
    sigma = loss_fn.sample_sigma(20_000, generator=torch.Generator().manual_seed(0))
    t = ddpm_sigma_to_t(sigma)
    assert torch.allclose(t, t.round(), atol=2e-3)  # only the 1000 discrete steps
    assert t.mean().item() == pytest.approx(499.5, abs=8) and t.std().item() == pytest.approx(1000 / math.sqrt(12), rel=0.03)
    strat = DDPMLoss(sigma_sampling="stratified").sample_sigma(1000, generator=torch.Generator().manual_seed(1))
    assert len(torch.unique(strat)) == 1000  # one per step


def test_flow_logit_normal_t_is_lognormal_sigma_and_uniform_option():
    g = torch.Generator().manual_seed(0)
    cfg = resolve_formulation(get_preset("tiny"), "flow")
    t = flow_sigma_to_t(make_loss(cfg).sample_sigma(20_000, generator=g))
    logit = (t / (1 - t)).log()
    assert logit.mean().item() == pytest.approx(0.0, abs=0.03) and logit.std().item() == pytest.approx(1.0, abs=0.03)  # SD3 default (0, 1)
    t = flow_sigma_to_t(make_loss(cfg.override("loss", uniform_t=True)).sample_sigma(20_000, generator=g))
    assert t.mean().item() == pytest.approx(0.5, abs=0.01) and t.var().item() == pytest.approx(1 / 12, rel=0.05)


def test_make_loss_picks_the_formulation():
    tiny = get_preset("tiny")
    for name, cls in [("edm", EDMLoss), ("ddpm", DDPMLoss), ("flow", FlowLoss), ("vp", VPLoss), ("ve", VELoss), ("iddpm", IDDPMLoss)]:
        assert type(make_loss(tiny.override("network", formulation=name))) is cls


def tiny_cfg(rung, formulation):
    cfg = resolve_formulation(resolve_ladder(get_preset("tiny"), rung), formulation)
    return cfg.override("network", resolution=8, channel_mult=(1, 2), attn_resolutions=(4,)).override("train", batch=4)


@pytest.mark.parametrize("rung", ["A", "G"])
@pytest.mark.parametrize("formulation", list(CONFIG_FORMULATIONS))
def test_a_train_step_runs_for_every_formulation_and_rung(formulation, rung):
    cfg = tiny_cfg(rung, formulation)
    torch.manual_seed(0)
    net = ckpt.build_denoiser(cfg).train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr)
    state = TrainState(net=net, optimizer=opt, ema=PowerFunctionEMA(net, stds=cfg.ema.stds))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stats = train_step(state, make_loss(cfg), cfg, torch.rand(4, 1, 8, 8) * 2 - 1, None)
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["mse"]) and stats["mse"] > 0
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("formulation", ["ddpm", "flow", "vp", "ve", "iddpm"])
def test_sampling_needs_no_formulation_flag(formulation, tmp_path):
    """A network file carries its formulation: loading it rebuilds that preconditioning, and sampling from the file gives
    the saved network's images, not those of the same weights read as EDM."""
    cfg = tiny_cfg("G", formulation)
    net = ckpt.build_denoiser(cfg)
    with torch.no_grad():  # open the output gain so the backbone matters, and move off the init
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ckpt.save_network(tmp_path / "n.safetensors", net.state_dict(), cfg=cfg, nimg=0, ema_std=0.0)
    loaded, _ = ckpt.load_network(tmp_path / "n.safetensors")
    assert loaded.precond is FORMULATIONS[formulation]
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 4.0])
    assert torch.equal(loaded(x, sigma), net.eval()(x, sigma))
    as_edm = ckpt.build_denoiser(cfg.override("network", formulation="edm")).eval()
    as_edm.load_state_dict(net.state_dict())
    kw = dict(seeds=[0, 1], resolution=8, channels=1, steps=3)
    images = generate_images(loaded, **kw)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    assert torch.equal(images, generate_images(net, **kw))
    assert (images - generate_images(as_edm, **kw)).abs().max() > 0.01


def smooth_images(n, *, seed):
    """[n, 1, 8, 8] images in [-1, 1]: a random 2x2 pattern, bilinearly upsampled (structure a tiny network can learn)."""
    z = torch.rand(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(z, size=8, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("formulation", ["vp", "ve", "iddpm"])
def test_twenty_steps_lower_the_weighted_validation_error(formulation):
    """20 steps of the tiny EDM2 U-Net (rung G) lower the lambda-weighted error at fixed sigmas (8 quantiles of the training
    density) and fixed noise on held-out images. At init F = 0, so D = x and the error is ||eps||^2 ~ 1."""
    cfg = tiny_cfg("G", formulation).override("train", batch=16)
    torch.manual_seed(0)
    net = ckpt.build_denoiser(cfg).train()
    state = TrainState(net=net, optimizer=torch.optim.Adam(net.parameters(), lr=cfg.optim.lr), ema=PowerFunctionEMA(net, stds=cfg.ema.stds))
    loss_fn = make_loss(cfg)
    y_val, sigma = smooth_images(64, seed=1), loss_fn.sigma_quantiles(8).repeat_interleave(8)
    noise = torch.randn(y_val.shape, generator=torch.Generator().manual_seed(2))

    def val_error():
        with torch.no_grad():
            return loss_fn(net.eval(), y_val, None, sigma=sigma, noise=noise)[1].mean().item()

    before = val_error()
    assert before == pytest.approx(noise.square().mean().item(), rel=1e-4)  # D = c_skip x = x at init
    for step in range(20):
        train_step(state, loss_fn, cfg, smooth_images(16, seed=100 + step), None)
    assert val_error() < 0.9 * before


def test_dry_run_prints_each_new_formulation():
    for name in ("vp", "ve", "iddpm"):
        res = CliRunner().invoke(main, ["train", "--preset", "tiny", "--formulation", name, "--dry-run"], catch_exceptions=False)
        assert res.exit_code == 0 and json.loads(res.stdout)["network"]["formulation"] == name  # stderr: params, GFLOPs


def test_bad_formulation_names_and_combinations():
    valid = "valid: edm, ddpm, flow, vp, ve, iddpm"
    with pytest.raises(ValueError, match=valid):
        NetworkConfig(formulation="VP")
    with pytest.raises(ValueError, match=valid):
        Denoiser(UNet(resolution=8, channels=1, model_channels=8, channel_mult=(1,)), formulation="rf")
    with pytest.raises(ValueError, match=valid):
        resolve_formulation(get_preset("tiny"), "DDPM")
    with pytest.raises(ValueError, match="rectified-flow option"):
        make_loss(get_preset("tiny").override("network", formulation="ve").override("loss", uniform_t=True))
    with pytest.raises(ValueError, match="rectified-flow option"):
        make_loss(get_preset("tiny").override("loss", uniform_t=True))
