"""Cascade super-resolution stage: training on the tiny preset, conditioning reaches the network, exact resume, bad input."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edmkit import checkpoint as ckpt
from edmkit.data.dataset import load_dataset
from edmkit.data.images import images_to_float
from edmkit.diffusion.loss import EDMLoss
from edmkit.diffusion.operators import downsample
from edmkit.diffusion.samplers import get_sampler
from edmkit.diffusion.schedules import karras_sigmas
from edmkit.presets import check_sr_config, get_preset, resolve_sr
from edmkit.sampling.cascade import aug_level_label, cascade_denoiser, low_res_condition, super_resolve, training_condition
from edmkit.training.loop import train

QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture
def cfg():
    c = resolve_sr(get_preset("tiny"), scale=2)
    return c.override("train", grid_nimg=10**9, total_nimg=160)


def fixed_sr_loss(net, cfg) -> float:
    """Weighted denoising error of the SR model on fixed images, sigmas, noise and (clean) conditioning."""
    y = images_to_float(load_dataset("mnist5k").images[:32])
    g = torch.Generator().manual_seed(123)
    loss_fn = EDMLoss(uncertainty=False)
    sigma, noise = loss_fn.sample_sigma(32, generator=g), torch.randn(y.shape, generator=g)
    cond_net = cascade_denoiser(net.eval(), downsample(y, scale=2), scale=2, sigma_aug=0.0, sigma_max=cfg.train.sr_aug_max,
                                augment_dim=cfg.network.augment_dim)
    with torch.no_grad():
        return loss_fn(cond_net, y, None, sigma=sigma, noise=noise)[0].mean().item()


def test_sr_model_trains_and_loss_falls(tmp_path, cfg):
    before = fixed_sr_loss(ckpt.build_denoiser(cfg), cfg)
    state = train(cfg, tmp_path / "run", **QUIET)
    assert state.step == 10
    after = fixed_sr_loss(state.net, cfg)
    assert np.isfinite(after) and after < before, (before, after)


def test_conditioning_reaches_the_network(cfg):
    torch.manual_seed(0)
    net = ckpt.build_denoiser(cfg).eval()
    for name, p in net.net.named_parameters():  # G's output and embedding gains start at 0 (F, emb ignored at init)
        if name.endswith("gain"):
            p.data.fill_(1.0)
    x, sigma = torch.randn(2, 1, 28, 28), torch.full((2,), 1.0)
    low = torch.rand(2, 1, 14, 14) * 2 - 1
    run = lambda low, s_aug: cascade_denoiser(net, low, scale=2, sigma_aug=s_aug, sigma_max=0.5, augment_dim=1,
                                              noise=torch.zeros(2, 1, 28, 28))(x, sigma)
    with torch.no_grad():
        base, other_image, other_level = run(low, 0.0), run(-low, 0.0), run(low, 0.3)
    assert not torch.allclose(base, other_image)  # the image enters through the concatenated channels
    assert not torch.allclose(base, other_level)  # the aug level enters through the augment-label embedding
    with pytest.raises(ValueError, match="conditioning"):
        net.net(x, sigma, cond=torch.zeros(2, 2, 28, 28))


def test_training_condition_is_low_pass_plus_scaled_noise():
    y = torch.rand(4, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    cond, labels = training_condition(y, scale=2, sigma_max=0.0, generator=g, batch=4, rows=torch.arange(4))
    assert torch.equal(cond, low_res_condition(y, scale=2))  # sigma_aug = 0: the exact low-pass
    assert torch.equal(downsample(cond, scale=2), downsample(y, scale=2))
    assert labels.shape == (4, 1) and torch.equal(labels, torch.zeros(4, 1))
    g = torch.Generator().manual_seed(0)
    cond, labels = training_condition(y, scale=2, sigma_max=0.5, generator=g, batch=4, rows=torch.arange(4))
    level = labels[:, 0] * 0.5
    assert ((level >= 0) & (level <= 0.5)).all() and level.unique().numel() == 4
    resid = (cond - low_res_condition(y, scale=2)).flatten(1)  # sigma_aug * eps: its std tracks the level
    assert torch.corrcoef(torch.stack([resid.std(dim=1), level]))[0, 1] > 0.9
    assert torch.equal(aug_level_label(torch.tensor([0.25]), sigma_max=0.5), torch.tensor([[0.5]]))


def test_cascade_denoiser_passes_the_noised_upsampled_image_and_its_level(cfg):
    """Sampling conditions on z = nearest-upsampled low-res + σ_aug·ε and the label column σ_aug/σ_aug,max (zeros in the
    non-leaky columns: not augmented); super_resolve forwards its σ_aug, ε and labels to that denoiser."""
    seen = []

    def spy(x, sigma, labels, *, cond, augment_labels):
        seen.append(dict(cond=cond, augment_labels=augment_labels, labels=labels))
        return torch.zeros_like(x)

    low, eps = torch.rand(2, 1, 2, 2) * 2 - 1, torch.randn(2, 1, 4, 4)
    up = low.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)  # [2, 1, 4, 4]
    cascade_denoiser(spy, low, scale=2, sigma_aug=0.2, sigma_max=0.5, augment_dim=3, noise=eps)(torch.zeros(2, 1, 4, 4), torch.ones(2))
    torch.testing.assert_close(seen[-1]["cond"], up + 0.2 * eps, rtol=0, atol=1e-7)
    assert torch.equal(seen[-1]["augment_labels"], torch.tensor([[0.0, 0.0, 0.4], [0.0, 0.0, 0.4]]))
    cascade_denoiser(spy, low, scale=2, sigma_aug=0.0, sigma_max=0.5, augment_dim=1)(torch.zeros(2, 1, 4, 4), torch.ones(2))
    assert torch.equal(seen[-1]["cond"], up) and torch.equal(seen[-1]["augment_labels"], torch.zeros(2, 1))

    low28, eps28 = torch.rand(1, 1, 14, 14) * 2 - 1, torch.randn(1, 1, 28, 28)
    labels = torch.eye(10)[[4]]
    seen.clear()
    super_resolve(spy, low28, cfg=cfg, sample=get_sampler("euler"), sigmas=karras_sigmas(2), noise=torch.randn(1, 1, 28, 28),
                  sigma_aug=0.3, aug_noise=eps28, labels=labels)  # not the default 0.1
    assert len(seen) == 2
    up28 = low28.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    torch.testing.assert_close(seen[0]["cond"], up28 + 0.3 * eps28, rtol=0, atol=1e-7)
    torch.testing.assert_close(seen[0]["augment_labels"][:, -1], torch.tensor([0.3 / cfg.train.sr_aug_max]))
    assert seen[0]["labels"] is labels


def test_sr_resume_is_bit_exact(tmp_path, cfg):
    cfg = cfg.override("train", total_nimg=96, state_nimg=48)
    straight = train(cfg, tmp_path / "a", **QUIET)
    train(cfg, tmp_path / "b", stop_nimg=48, **QUIET)
    resumed = train(cfg, tmp_path / "b", **QUIET)
    assert resumed.nimg == straight.nimg == 96
    for k, v in straight.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k


def test_cascade_sampling_uses_the_conditioning(cfg):
    torch.manual_seed(0)
    net = ckpt.build_denoiser(cfg).eval()
    net.net.out_gain.data.fill_(1.0)
    noise = torch.randn(1, 1, 28, 28)
    sigmas = karras_sigmas(3, sigma_min=0.002, sigma_max=80.0)
    low = torch.rand(1, 1, 14, 14) * 2 - 1
    a = super_resolve(net, low, cfg=cfg, sample=get_sampler("euler"), sigmas=sigmas, noise=noise, sigma_aug=0.0)
    b = super_resolve(net, -low, cfg=cfg, sample=get_sampler("euler"), sigmas=sigmas, noise=noise, sigma_aug=0.0)
    assert a.shape == (1, 1, 28, 28) and torch.isfinite(a).all() and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="scale"):
        super_resolve(net, torch.zeros(1, 1, 7, 7), cfg=cfg, sample=get_sampler("euler"), sigmas=sigmas, noise=noise)
    with pytest.raises(ValueError, match="not a super-resolution model"):
        super_resolve(net, low, cfg=get_preset("tiny"), sample=get_sampler("euler"), sigmas=sigmas, noise=noise)


def test_bad_scale_is_a_clear_error():
    with pytest.raises(ValueError, match="does not divide the image size 28"):
        resolve_sr(get_preset("tiny"), scale=3)
    with pytest.raises(ValueError, match=">= 2"):
        resolve_sr(get_preset("tiny"), scale=1)
    with pytest.raises(ValueError, match="cond_channels"):
        check_sr_config(get_preset("tiny").override("train", task="sr"))


def cli(*args):
    from edmkit.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_train_sr_and_cascade_restore(tmp_path):
    bad = cli("train", "--preset", "tiny", "--task", "sr", "--sr-scale", "3", "--dry-run")
    assert bad.exit_code != 0 and len(bad.output.strip().splitlines()) == 1 and "does not divide" in bad.output
    run = tmp_path / "run"
    res = cli("train", "--preset", "tiny", "--task", "sr", "--sr-scale", "2", "--duration", "32", "--run", run, "--quiet", "--device", "cpu")
    assert res.exit_code == 0, res.output
    low = tmp_path / "low.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (14, 14), dtype=np.uint8)).save(low)
    out = tmp_path / "sr.png"
    res = cli("restore", "--checkpoint", run, "--ema", "0", "--task", "sr", "--scale", "2", "--method", "cascade", "--image", low,
              "--steps", "2", "--sampler", "euler", "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert Image.open(out).size == (28, 28)
    res = cli("restore", "--checkpoint", run, "--ema", "0", "--task", "sr", "--scale", "4", "--method", "cascade", "--image", low,
              "--steps", "2", "--out", out, "--device", "cpu")
    assert res.exit_code != 0 and "--method cascade" in res.output
