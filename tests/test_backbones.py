"""Every backbone of the registry under the one contract: the denoiser, losses, samplers, checkpoints work unchanged.

Each test runs on the ``tiny-<arch>`` preset (28x28x1, 16 channels) of every image backbone in ``config.ARCHS``.
"""

import pytest
import torch
from click.testing import CliRunner

from edmkit import checkpoint as ckpt
from edmkit.cli import main
from edmkit.config import ARCHS, VIDEO_ARCHS
from edmkit.data.dataset import load_dataset
from edmkit.data.images import images_to_float
from edmkit.diffusion.loss import make_loss
from edmkit.diffusion.samplers import SAMPLERS
from edmkit.diffusion.schedules import karras_sigmas
from edmkit.nn.build import NETWORKS, build_network, network_cost
from edmkit.presets import get_preset
from edmkit.training.ema import PowerFunctionEMA
from edmkit.training.loop import train_step
from edmkit.training.run_state import TrainState


IMAGE_ARCHS = tuple(a for a in ARCHS if a not in VIDEO_ARCHS)  # the clip backbones: tests/test_video.py


def tiny(arch: str, **network):
    cfg = get_preset("tiny" if arch == "edm2-unet" else f"tiny-{arch}")
    return cfg.override("network", **network) if network else cfg


def opened(net: torch.nn.Module) -> torch.nn.Module:
    """Give every all-zero parameter (zero-initialised output layers, gains) random values, so each input matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.is_floating_point() and not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


def test_the_registry_builds_every_arch_the_config_accepts():
    assert set(NETWORKS) == set(ARCHS)
    with pytest.raises(ValueError, match="unknown arch 'nope'"):
        get_preset("tiny").override("network", arch="nope")


@pytest.mark.parametrize("arch", IMAGE_ARCHS)
@pytest.mark.parametrize("channels, resolution", [(1, 28), (3, 32)])
def test_shapes_and_the_zero_output_layer(arch, channels, resolution):
    cfg = tiny(arch, channels=channels, resolution=resolution, attn_resolutions=(resolution // 2,))
    net = ckpt.build_denoiser(cfg)
    x = torch.randn(2, channels, resolution, resolution)
    sigma = torch.tensor([0.3, 5.0])
    c_skip = cfg.network.sigma_data ** 2 / (sigma ** 2 + cfg.network.sigma_data ** 2)
    torch.testing.assert_close(net(x, sigma), c_skip.view(-1, 1, 1, 1) * x)  # D = c_skip x at init: F(...) = 0 exactly
    assert opened(net.net)(x, torch.zeros(2)).shape == x.shape


@pytest.mark.parametrize("arch", IMAGE_ARCHS)
def test_labels_and_augment_labels_condition_and_zeros_mean_none(arch):
    torch.manual_seed(0)
    net = opened(build_network(tiny(arch, label_dim=3, augment_dim=7).network)).eval()
    x, c_noise = torch.randn(2, 1, 28, 28), torch.tensor([-0.5, 0.7])
    base = net(x, c_noise, None)
    assert torch.equal(net(x, c_noise, torch.zeros(2, 3)), base)
    assert torch.equal(net(x, c_noise, None, augment_labels=torch.zeros(2, 7)), base)
    assert not torch.allclose(net(x, c_noise, torch.eye(3)[[0, 2]]), base)
    assert not torch.allclose(net(x, c_noise, None, augment_labels=torch.ones(2, 7)), base)
    assert not torch.allclose(net(x, c_noise + 1, None), base)  # the noise level conditions it too


@pytest.mark.parametrize("arch, formulation", [(arch, "edm") for arch in IMAGE_ARCHS] + [("ddpmpp", "vp"), ("ncsnpp", "ve"), ("adm", "iddpm")])
def test_twenty_steps_lower_a_fixed_noise_loss(arch, formulation):
    """EDM's improved setting for every backbone, and the EDM paper's baselines (DDPM++ / VP, NCSN++ / VE, ADM / iDDPM)."""
    cfg = tiny(arch, formulation=formulation).override("train", batch=16)
    y = images_to_float(load_dataset("mnist5k").images[:16])
    loss_fn = make_loss(cfg)
    g = torch.Generator().manual_seed(0)
    sigma, noise = loss_fn.sample_sigma(16, generator=g), torch.randn(y.shape, generator=g)

    def fixed_loss(net) -> float:
        with torch.no_grad():
            return (loss_fn.weight(sigma).view(-1, 1, 1, 1) * (net(y + sigma.view(-1, 1, 1, 1) * noise, sigma) - y) ** 2).mean().item()

    torch.manual_seed(0)
    net = ckpt.build_denoiser(cfg).train()
    state = TrainState(net=net, optimizer=torch.optim.Adam(net.parameters(), lr=cfg.optim.lr), ema=PowerFunctionEMA(net, stds=(0.1,)))
    before = fixed_loss(net)
    for _ in range(20):
        train_step(state, loss_fn, cfg, y, None)
    assert fixed_loss(net) < 0.9 * before


@pytest.mark.parametrize("arch", IMAGE_ARCHS)
def test_file_round_trip_rebuilds_from_the_config_alone_and_every_sampler_runs(arch, tmp_path):
    cfg = tiny(arch)
    net = ckpt.build_denoiser(cfg)
    opened(net.net)
    path = tmp_path / "net.safetensors"
    ckpt.save_network(path, net.state_dict(), cfg=cfg, nimg=0, ema_std=0.0)
    loaded, meta = ckpt.load_network(path)
    assert meta["config"].network.arch == arch
    for k, v in net.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    noise = torch.randn(1, 1, 28, 28) * 80
    for name, sample in SAMPLERS.items():
        assert torch.isfinite(sample(loaded, noise, karras_sigmas(2))).all(), name


@pytest.mark.parametrize("arch", IMAGE_ARCHS)
def test_bf16_autocast_forward_is_finite_and_the_cost_counts_the_real_parameters(arch):
    cfg = tiny(arch)
    net = opened(build_network(cfg.network))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(net(torch.randn(2, 1, 28, 28), torch.zeros(2)).float()).all()
    params, gflops = network_cost(cfg.network)
    assert params == sum(p.numel() for p in net.parameters()) and gflops > 0


@pytest.mark.parametrize("arch", IMAGE_ARCHS)
def test_dry_run_prints_parameters_and_gflops(arch):
    preset = "tiny" if arch == "edm2-unet" else f"tiny-{arch}"
    result = CliRunner().invoke(main, ["train", "--preset", preset, "--arch", arch, "--dry-run"])
    assert result.exit_code == 0, result.output
    params, gflops = network_cost(get_preset(preset).network)
    assert f"{arch}: {params / 1e6:.2f}M parameters, {gflops:.3g} GFLOPs" in result.stderr


@pytest.mark.parametrize("preset, millions", [("ddpmpp-cifar10", 55.7), ("ncsnpp-cifar10", 56.4), ("adm-imagenet64", 296.0)])
def test_presets_reproduce_the_sources_sizes(preset, millions):
    from edmkit.data.augment import AUGMENT_DIM

    cfg = get_preset(preset)
    params, _ = network_cost(cfg.network)
    assert abs(params / 1e6 - millions) / millions < 0.005, params
    assert cfg.network.augment_dim in (0, AUGMENT_DIM) and (cfg.train.augment_p > 0) == (cfg.network.augment_dim > 0)
