"""EDM2 config ladder A-G (EDM2 Table 1): every rung builds, trains, and keeps the invariants it promises."""

import dataclasses
import math

import pytest
import torch
from click.testing import CliRunner

import edmkit.nn.unet as unet_mod
from edmkit import checkpoint as ckpt
from edmkit.cli import main
from edmkit.config import LADDER, LadderSwitches, NetworkConfig
from edmkit.diffusion.schedules import learning_rate
from edmkit.nn.mp import MPConv
from edmkit.nn.unet import UNet
from edmkit.presets import get_preset, resolve_config, resolve_ladder

RUNGS = list(LADDER)


def tiny(rung, channels=1, label_dim=0):
    return UNet(resolution=8, channels=channels, label_dim=label_dim, model_channels=8, channel_mult=(1, 1, 1), num_blocks=1,
                attn_resolutions=(2,), channels_per_head=8, ladder=rung)


def layers(net):
    return [m for m in net.modules() if isinstance(m, MPConv)]


def rms(x):
    return x.pow(2).mean().sqrt().item()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("rung", RUNGS)
def test_forward_backward_every_rung(rung, channels):
    net = tiny(rung, channels, label_dim=10)
    x = torch.randn(2, channels, 8, 8)
    y = net(x, torch.randn(2), torch.eye(10)[:2])
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y - x).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("rung", RUNGS)
def test_structure_follows_the_switches(rung):
    s, net = LADDER[rung], tiny(rung, label_dim=10)
    assert all(m.weight_norm == s.weight_norm and m.forced == s.forced_weight_norm for m in layers(net))
    assert all((m.bias is not None) == s.biases for m in layers(net))
    assert net.enc["8x8_conv"].weight.shape[1] == 1 + (not s.biases)  # ones channel replaces biases (C+)
    group_norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert bool(group_norms) == (s.groupnorm_affine and not s.pixel_norm)
    assert (net.emb_fourier is not None) == s.fourier_embedding and (net.emb_mlp is None) == s.fourier_embedding
    assert (net.out_gain is not None) == s.mp_fixed
    attn_res = sorted({int(n.split("x")[0]) for n, b in list(net.enc.items()) + list(net.dec.items()) if getattr(b, "num_heads", 0)})
    assert attn_res == ([2, 4] if s.adm_attention else [2])  # A also attends at resolution/2


def test_rung_a_is_an_adm_baseline():
    net = tiny("A")
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.affine and m.weight.requires_grad for m in norms)
    assert all(m.bias is not None and not m.weight_norm for m in layers(net))
    assert torch.count_nonzero(net.out_conv.weight) == 0  # ADM zero-initialized output layer
    assert torch.count_nonzero(net(torch.randn(2, 1, 8, 8), torch.zeros(2))) == 0
    cfg = resolve_ladder(get_preset("tiny"), "A")
    assert not cfg.loss.uncertainty and cfg.optim.lr_ref_nimg == 0


@pytest.mark.parametrize("rung", RUNGS)
def test_group_norms_only_before_f(rung, monkeypatch):
    calls = []
    original = unet_mod.group_rms_norm
    monkeypatch.setattr(unet_mod, "group_rms_norm", lambda x, **kw: calls.append(1) or original(x, **kw))
    net = tiny(rung)
    modules = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    net(torch.randn(2, 1, 8, 8), torch.zeros(2))
    s = LADDER[rung]
    if s.pixel_norm:  # F+: no group norm of any kind
        assert not modules and not calls
    else:  # A-B: GroupNorm modules with affine; C-E: RMS group norm without mean subtraction or scale
        assert bool(modules) == s.groupnorm_affine and bool(calls) == (not s.groupnorm_affine)


@pytest.mark.parametrize("rung", RUNGS)
def test_weight_normalized_layers_keep_unit_rms(rung):
    g = torch.Generator().manual_seed(0)
    for m in layers(tiny(rung, label_dim=10)):
        with torch.no_grad():
            m.weight.mul_(torch.rand(m.weight.shape[0], *[1] * (m.weight.ndim - 1), generator=g) * 3 + 3)  # rows of any size >= 3
            if m.bias is not None:
                m.bias.zero_()
        m.eval()
        fan_in = m.weight.shape[1]
        if m.weight.ndim == 2:
            y = m(torch.randn(2048, fan_in, generator=g))
        else:
            y = m(torch.randn(16, fan_in, 10, 10, generator=g))[..., 1:-1, 1:-1]  # interior: zero padding shrinks borders
        if LADDER[rung].weight_norm:
            assert rms(y) == pytest.approx(1.0, abs=0.05)
        else:
            assert abs(rms(y) - 1.0) > 0.1  # plain layers follow their (rescaled) weights


@pytest.mark.parametrize("rung", ["D", "E"])
def test_forced_weight_norm_keeps_unit_rows_after_steps(rung):
    net = tiny(rung).train()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    x = torch.randn(2, 1, 8, 8)
    (net(x, torch.randn(2)) - x).square().mean().backward()
    opt.step()
    net(x, torch.randn(2))  # E+: the training forward re-normalizes the stored weights
    row_rms = torch.cat([m.weight.detach().flatten(1).pow(2).mean(1).sqrt() for m in layers(net)])
    if LADDER[rung].forced_weight_norm:
        assert torch.allclose(row_rms, torch.ones_like(row_rms), atol=1e-3)
    else:  # D: weight normalization only in the forward pass, stored rows drift away from unit magnitude
        assert (row_rms - 1).abs().median() > 0.01


def test_g_is_the_default_network():
    torch.manual_seed(5)
    a = UNet(resolution=16, channels=1, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), channels_per_head=8)
    torch.manual_seed(5)
    b = UNet(resolution=16, channels=1, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), channels_per_head=8, ladder="G")
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert get_preset("mnist").network.ladder == "G" and resolve_ladder(get_preset("mnist"), "G") == get_preset("mnist")


@pytest.mark.parametrize("rung", ["A", "C", "D", "E", "G"])
def test_ladder_derives_loss_and_optimizer_parts(rung):
    s, preset = LADDER[rung], get_preset("mnist")
    cfg = resolve_ladder(preset, rung)
    assert cfg.network.ladder == rung and cfg.loss.uncertainty == s.uncertainty_loss
    assert cfg.optim.lr_ref_nimg == (preset.optim.lr_ref_nimg if s.lr_decay else 0)
    assert cfg.optim.lr == (s.lr or preset.optim.lr)
    explicit = resolve_config(preset, ladder=rung, lr=0.0042)  # an explicit flag wins over the derived value
    assert explicit.optim.lr == 0.0042 and explicit.network.ladder == rung


def test_learning_rate_is_inverse_sqrt_decay_with_linear_warmup():
    """EDM2 Eq. 67 in images: alpha_ref / sqrt(max(t / t_ref, 1)), times min(t / t_warmup, 1); t_ref = 0 keeps it constant (A-D)."""
    lr = lambda nimg, **kw: learning_rate(nimg, lr=0.012, **kw)
    assert lr(1000, ref_nimg=1000) == pytest.approx(0.012, rel=1e-12)
    assert lr(4000, ref_nimg=1000) == pytest.approx(0.006, rel=1e-12)  # 4 t_ref: half
    assert lr(9000, ref_nimg=1000) == pytest.approx(0.004, rel=1e-12)  # 9 t_ref: a third
    assert lr(500, ref_nimg=1000) == pytest.approx(0.012, rel=1e-12)  # flat before t_ref
    assert lr(25, ref_nimg=1000, warmup_nimg=100) == pytest.approx(0.003, rel=1e-12)  # a quarter into the warm-up
    assert lr(100, ref_nimg=1000, warmup_nimg=100) == pytest.approx(0.012, rel=1e-12)
    assert lr(16_000, ref_nimg=1000, warmup_nimg=100) == pytest.approx(0.003, rel=1e-12)
    assert lr(10**9, ref_nimg=0) == 0.012 and lr(0, ref_nimg=0) == 0.012


def test_checkpoint_carries_the_rung(tmp_path):
    cfg = resolve_ladder(get_preset("tiny"), "B").override("network", formulation="ddpm")
    net = ckpt.build_denoiser(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt.save_network(tmp_path / "n.safetensors", net.state_dict(), cfg=cfg, nimg=0, ema_std=0.0)
    loaded, meta = ckpt.load_network(tmp_path / "n.safetensors")
    assert meta["config"].network.ladder == "B" and loaded.net.switches == LADDER["B"]
    x, sigma = torch.randn(2, 1, 28, 28), torch.tensor([0.5, 3.0])
    assert torch.equal(net.eval()(x, sigma), loaded(x, sigma))


def test_bad_names_and_combinations():
    with pytest.raises(ValueError, match="valid: A, B, C, D, E, F, G"):
        NetworkConfig(ladder="H")
    with pytest.raises(ValueError, match="valid: A, B, C, D, E, F, G"):
        tiny("H")
    with pytest.raises(ValueError, match="valid: A, B, C, D, E, F, G"):
        resolve_ladder(get_preset("tiny"), "g")
    with pytest.raises(ValueError, match="forced weight normalization needs weight_norm"):
        dataclasses.replace(LADDER["C"], forced_weight_norm=True)
    with pytest.raises(ValueError, match="need weight-normalized"):
        dataclasses.replace(LADDER["C"], mp_fixed=True)
    with pytest.raises(ValueError, match="cannot start at zero"):
        MPConv(4, 4, init="zero")
    res = CliRunner().invoke(main, ["train", "--config", "Q", "--dry-run"])
    assert res.exit_code != 0 and "valid: A, B, C, D, E, F, G" in res.output and "Traceback" not in res.output


def test_custom_switches_object_is_accepted():
    s = dataclasses.replace(LADDER["E"], cosine_attention=False)
    assert isinstance(s, LadderSwitches)
    net = UNet(resolution=8, channels=1, model_channels=8, channel_mult=(1, 2), num_blocks=1, channels_per_head=8, ladder=s)
    assert net(torch.randn(1, 1, 8, 8), torch.zeros(1)).shape == (1, 1, 8, 8)
    assert math.isfinite(rms(net(torch.randn(1, 1, 8, 8), torch.zeros(1))))
