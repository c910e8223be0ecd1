"""The core invariants on the accelerator: MP layers, preconditioning, loss, sampler, EMA, checkpoints, resume, bf16, compile.

``gpu``-marked: skipped without CUDA unless ``$EDMKIT_TEST_DEVICE`` names a device (``gpu_device``, tests/conftest.py).
``benchmarks/gpu_check.py`` runs them on a CUDA machine; ``EDMKIT_TEST_DEVICE=cpu`` runs them here, which checks the tests.
Each test checks an invariant of the CPU tests on the device, or that the device computes what the CPU computes. The
device-vs-CPU comparisons run with TF32 off (``no_tf32``): ``edmkit`` commands turn TF32 on for CUDA, and its ~10-bit
mantissas in convolutions and matmuls would need tolerances too loose to catch a real difference.
"""

import copy
import math
import os

import pytest
import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; read when cuBLAS starts, so set at import

from edmkit import checkpoint as ckpt  # noqa: E402
from edmkit.diffusion.loss import make_loss  # noqa: E402
from edmkit.diffusion.precond import edm_precond, network_target  # noqa: E402
from edmkit.diffusion.samplers import sample_heun  # noqa: E402
from edmkit.diffusion.schedules import karras_sigmas  # noqa: E402
from edmkit.nn.mp import MPConv, mp_silu, mp_sum  # noqa: E402
from edmkit.presets import get_preset  # noqa: E402
from edmkit.training.ema import PowerFunctionEMA  # noqa: E402
from edmkit.training.loop import train, train_step, wrap_for_training  # noqa: E402
from edmkit.training.run_state import TrainState  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def deterministic():
    saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]


def tiny_cfg():
    return get_preset("tiny").override("network", dropout=0.0).override("train", grid_nimg=10**9, total_nimg=320)


def rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def test_mp_layers_keep_unit_rms_on_device(gpu_device, no_tf32):
    g = torch.Generator(gpu_device).manual_seed(0)
    x = torch.randn(16, 64, 16, 16, generator=g, device=gpu_device)
    conv = MPConv(64, 32, (3, 3)).to(gpu_device).train()
    y = conv(x)
    assert rms(y[..., 1:-1, 1:-1]) == pytest.approx(1.0, abs=0.02)  # interior pixels: the zero padding lowers the border
    # forced weight normalization: the train-mode forward left every output row at norm sqrt(fan_in)
    norms = conv.weight.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, math.sqrt(conv.fan_in)), rtol=1e-3, atol=0)  # normalize's eps
    cpu = copy.deepcopy(conv).cpu()
    torch.testing.assert_close(y.cpu(), cpu(x.cpu()), rtol=1e-4, atol=1e-5)
    a, b = torch.randn(2, 1_000_000, generator=g, device=gpu_device)
    assert rms(mp_sum(a, b, t=0.3)) == pytest.approx(1.0, abs=0.01)
    assert rms(mp_silu(a)) == pytest.approx(1.0, abs=0.01)


def test_precond_gives_unit_variance_inputs_and_targets_on_device(gpu_device):
    sigma_data = 0.5
    g = torch.Generator(gpu_device).manual_seed(1)
    for s in (0.01, 0.3, 2.0, 80.0):
        sigma = torch.full((200_000, 1), s, device=gpu_device)
        y = torch.randn(200_000, 1, generator=g, device=gpu_device) * sigma_data
        x = y + sigma * torch.randn(200_000, 1, generator=g, device=gpu_device)
        c_in = edm_precond(sigma, sigma_data=sigma_data)[2]
        assert rms(c_in * x) == pytest.approx(1.0, abs=0.01), s
        assert rms(network_target(y, x, sigma, sigma_data=sigma_data)) == pytest.approx(1.0, abs=0.01), s


def test_denoiser_loss_and_gradients_match_cpu(gpu_device, no_tf32):
    cfg = tiny_cfg()
    net = ckpt.build_denoiser(cfg).train()
    dev = copy.deepcopy(net).to(gpu_device)
    loss_fn = make_loss(cfg)
    g = torch.Generator().manual_seed(2)
    y = torch.rand(8, 1, 28, 28, generator=g) * 2 - 1
    sigma, noise = loss_fn.sample_sigma(8, generator=g), torch.randn(y.shape, generator=g)
    losses = []
    for model, d in ((net, torch.device("cpu")), (dev, gpu_device)):
        loss, _ = loss_fn(model, y.to(d), None, sigma=sigma.to(d), noise=noise.to(d))
        loss.sum().backward()
        losses.append(loss.detach().cpu())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(net.named_parameters(), dev.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_heun_converges_at_second_order_on_device(gpu_device):
    """Exact denoiser of Gaussian data N(0, s^2): the probability-flow ODE's solution is x_T sqrt((s^2 + sigma^2) /
    (s^2 + sigma_T^2)) (EDM Eq. 4); Heun's error at the last grid point falls >= 10x per 4x steps."""
    s, sigma_max = 0.5, 80.0
    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator(gpu_device).manual_seed(3), device=gpu_device)

    def denoiser(x, sigma, labels):
        return s**2 / (s**2 + sigma.reshape(-1, 1, 1, 1) ** 2) * x

    def error(steps: int) -> float:
        sigmas = karras_sigmas(steps + 1, sigma_min=0.02, sigma_max=sigma_max, device=gpu_device)[:-1]  # ends at 0.02
        x = sample_heun(denoiser, noise, sigmas)  # scales the unit noise to sigma_max
        exact = noise * sigma_max * math.sqrt((s**2 + sigmas[-1].item() ** 2) / (s**2 + sigma_max**2))
        return (x - exact).abs().max().item()

    assert error(8) / error(32) >= 10


def test_ema_on_device_matches_cpu(gpu_device):
    net = torch.nn.Linear(16, 16)
    dev = copy.deepcopy(net).to(gpu_device)
    emas = PowerFunctionEMA(net, stds=(0.05, 0.1)), PowerFunctionEMA(dev, stds=(0.05, 0.1))
    g = torch.Generator().manual_seed(4)
    for k in range(10):
        step = [torch.randn(p.shape, generator=g) * 0.1 for p in net.parameters()]
        for model, ema in zip((net, dev), emas):
            with torch.no_grad():
                for p, d in zip(model.parameters(), step):
                    p.add_(d.to(p.device))
            ema.update(cur_nimg=(k + 1) * 8, batch_nimg=8)
    for i in range(2):
        for name, v in emas[0].averaged(i).items():
            torch.testing.assert_close(emas[1].averaged(i)[name].cpu(), v, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpoint_round_trip_from_device_is_bit_exact(gpu_device, tmp_path):
    cfg = tiny_cfg()
    net = ckpt.build_denoiser(cfg).to(gpu_device)
    ckpt.save_network(tmp_path / "net.safetensors", net.state_dict(), cfg=cfg, nimg=16, ema_std=0.1)
    loaded, meta = ckpt.load_network(tmp_path / "net.safetensors", device=gpu_device)
    assert meta["nimg"] == 16
    for k, v in net.state_dict().items():
        assert loaded.state_dict()[k].device.type == gpu_device.type and torch.equal(loaded.state_dict()[k], v), k


def test_resume_on_device_is_bit_exact(gpu_device, tmp_path, deterministic):
    """One device with deterministic algorithms: 20 steps straight == 10 steps, stop, resume, 10 steps."""
    cfg = tiny_cfg()
    straight = train(cfg, tmp_path / "a", device=gpu_device, progress=False, log=lambda s: None)
    train(cfg, tmp_path / "b", device=gpu_device, stop_nimg=160, progress=False, log=lambda s: None)
    resumed = train(cfg, tmp_path / "b", device=gpu_device, progress=False, log=lambda s: None)
    assert resumed.nimg == straight.nimg == 320
    for k, v in straight.net.state_dict().items():
        assert v.device.type == gpu_device.type and torch.equal(v, resumed.net.state_dict()[k]), k
    for k, v in straight.ema.averaged(0).items():
        assert torch.equal(v, resumed.ema.averaged(0)[k]), k


def one_step_loss(cfg, device: torch.device) -> float:
    """The loss of one training step of a fresh tiny net through ``wrap_for_training`` (precision, compile)."""
    torch.manual_seed(0)
    net = ckpt.build_denoiser(cfg).to(device).train()
    state = TrainState(net=net, optimizer=torch.optim.Adam(net.parameters(), lr=cfg.optim.lr), ema=PowerFunctionEMA(net, stds=(0.1,)))
    state.train_net = wrap_for_training(net, cfg, device)
    y = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(5)).to(device) * 2 - 1
    stats = train_step(state, make_loss(cfg), cfg, y, None)
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in net.parameters())  # bf16 only inside autocast
    return stats["mse"]


def test_bf16_autocast_step_tracks_fp32(gpu_device, no_tf32):
    cfg = tiny_cfg()
    fp32, bf16 = one_step_loss(cfg, gpu_device), one_step_loss(cfg.override("train", precision="bf16"), gpu_device)
    assert math.isfinite(bf16) and bf16 == pytest.approx(fp32, rel=0.02)


def test_compiled_step_matches_eager(gpu_device, no_tf32):
    if gpu_device.type != "cuda":
        pytest.skip("torch.compile runs on CUDA here; on a CPU it spends minutes building C++ kernels")
    cfg = tiny_cfg()
    eager, compiled = one_step_loss(cfg, gpu_device), one_step_loss(cfg.override("train", compile=True), gpu_device)
    assert compiled == pytest.approx(eager, rel=1e-3)
