"""Cross-attention conditioning on a context token sequence [N, L, D] (issue 27 item 3): edm2-unet, dit, hdit.

Per backbone: the branch starts switched off, a context changes the output once opened, zeros == None exactly (the
null context, per row), a wrong shape is a one-line error; the other archs refuse context_dim; the checkpoint file
round trip is bit-exact; a tiny npz dataset with a context trains; ``edmkit generate --context`` with CFG runs.
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edmkit import checkpoint as ckpt
from edmkit.cli import main
from edmkit.config import CONTEXT_ARCHS, NetworkConfig
from edmkit.nn.build import build_network
from edmkit.nn.mp import mp_sum
from edmkit.presets import get_preset

L, D = 3, 8  # context tokens per image and their width


def tiny(arch: str, **network):
    cfg = get_preset("tiny" if arch == "edm2-unet" else f"tiny-{arch}")
    return cfg.override("network", **{"context_dim": D, **network})


def opened(net: torch.nn.Module) -> torch.nn.Module:
    """Give every all-zero parameter (zero-initialised outputs, gains, the cross-attention gate) random values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.is_floating_point() and not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


def test_mp_sum_with_a_learned_balance_is_the_identity_at_zero_and_preserves_magnitude():
    a, b = torch.randn(4096), torch.randn(4096)
    assert torch.equal(mp_sum(a, b, t=torch.tensor(0.0)), a)  # the gate at init: exactly the main path
    torch.testing.assert_close(mp_sum(a, b, t=torch.tensor(0.3)), mp_sum(a, b, t=0.3))
    assert abs(mp_sum(a, b, t=torch.tensor(0.3)).square().mean().sqrt() - 1) < 0.05


@pytest.mark.parametrize("arch", CONTEXT_ARCHS)
def test_context_starts_off_conditions_once_opened_and_zeros_mean_none(arch):
    torch.manual_seed(0)
    net = build_network(tiny(arch).network).eval()
    x, c_noise, ctx = torch.randn(2, 1, 28, 28), torch.tensor([-0.5, 0.7]), torch.randn(2, L, D)
    assert torch.equal(net(x, c_noise, context=ctx), net(x, c_noise))  # zero-init output / gate: starts unchanged
    opened(net)
    base = net(x, c_noise)
    with_ctx = net(x, c_noise, context=ctx)
    assert not torch.allclose(with_ctx[0], base[0]) and not torch.allclose(with_ctx[1], base[1])
    assert torch.equal(net(x, c_noise, context=torch.zeros(2, L, D)), base)
    mixed = net(x, c_noise, context=torch.stack([ctx[0], torch.zeros(L, D)]))  # null row 1 only: row 1 as without context
    assert torch.equal(mixed[1], base[1]) and torch.allclose(mixed[0], with_ctx[0], atol=1e-5)
    assert not torch.allclose(net(x, c_noise, context=ctx[:, :2]), with_ctx)  # the tokens themselves matter


@pytest.mark.parametrize("arch", CONTEXT_ARCHS)
def test_a_wrong_context_is_a_one_line_error(arch):
    net = build_network(tiny(arch).network)
    x, c_noise = torch.randn(2, 1, 28, 28), torch.zeros(2)
    with pytest.raises(ValueError, match=r"does not match \[N=2, L, D=8\]"):
        net(x, c_noise, context=torch.randn(2, L, D + 1))
    with pytest.raises(ValueError, match="context_dim = 0"):
        build_network(tiny(arch, context_dim=0).network)(x, c_noise, context=torch.randn(2, L, D))


def test_backbones_without_cross_attention_refuse_context_dim():
    for arch in ("ddpmpp", "ncsnpp", "adm"):
        with pytest.raises(ValueError, match="supported by edm2-unet, dit, hdit only"):
            NetworkConfig(arch=arch, context_dim=D)


@pytest.mark.parametrize("arch", CONTEXT_ARCHS)
def test_checkpoint_round_trip_is_bit_exact_with_a_context(arch, tmp_path):
    cfg = tiny(arch)
    net = ckpt.build_denoiser(cfg)
    opened(net.net)
    path = tmp_path / "net.safetensors"
    ckpt.save_network(path, net.state_dict(), cfg=cfg, nimg=0, ema_std=0.0)
    again, meta = ckpt.load_network(path)
    assert meta["config"].network.context_dim == D
    x, sigma, ctx = torch.randn(2, 1, 28, 28), torch.tensor([0.5, 2.0]), torch.randn(2, L, D)
    assert torch.equal(again.eval()(x, sigma, context=ctx), net.eval()(x, sigma, context=ctx))
