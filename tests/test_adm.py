"""The ADM U-Net (Dhariwal & Nichol 2021 as configured by EDM): size, EDM's names, zero output at init, conditioning
paths, the scale-shift convention, multi-head attention, gradients, bf16, and the one-line geometry errors."""

import math

import pytest
import torch

from edmkit.nn.adm import ADMBlock, ADMUNet


def tiny_adm(*, channels=1, resolution=28, label_dim=0, augment_dim=0, cond_channels=0):
    return ADMUNet(resolution=resolution, in_channels=channels, out_channels=channels, label_dim=label_dim,
                   augment_dim=augment_dim, cond_channels=cond_channels, model_channels=16, channel_mult=(1, 2),
                   num_blocks=1, attn_resolutions=(resolution // 2,), channels_per_head=8, dropout=0.0)


def open_zero_parameters(net, *, seed=0):
    """Give every parameter that starts at exactly zero (output conv, each block's conv1 and attention proj, the
    augment map, norm biases) small random values, as a few training steps would, so every path reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


def test_imagenet64_size_and_edm_names():
    """EDM App. F / Table 7 ADM at ImageNet-64, 1000 classes, no augmentation: about 296M parameters; names and
    shapes as in EDM's DhariwalUNet (so its weights load one-to-one). Built on the meta device: no memory, no time."""
    with torch.device("meta"):
        net = ADMUNet(resolution=64, in_channels=3, out_channels=3, label_dim=1000, model_channels=192,
                      channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8), channels_per_head=64,
                      dropout=0.1)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(296e6, rel=0.01)
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
    assert shapes["map_layer0.weight"] == (768, 192) and shapes["map_layer1.weight"] == (768, 768)
    assert shapes["map_label.weight"] == (768, 1000) and "map_label.bias" not in shapes
    assert shapes["enc.64x64_conv.weight"] == (192, 3, 3, 3)
    assert shapes["enc.32x32_down.conv0.weight"] == (192, 192, 3, 3) and "enc.32x32_down.skip.weight" not in shapes
    assert shapes["enc.32x32_block0.skip.weight"] == (384, 192, 1, 1)
    assert shapes["enc.32x32_block0.affine.weight"] == (768, 768)  # scale and shift for 384 channels
    assert shapes["enc.32x32_block0.qkv.weight"] == (1152, 384, 1, 1) and "enc.64x64_block0.qkv.weight" not in shapes
    assert shapes["dec.8x8_in0.proj.weight"] == (768, 768, 1, 1) and "dec.8x8_in1.qkv.weight" not in shapes
    assert shapes["dec.64x64_block3.conv0.weight"] == (192, 384, 3, 3)  # last decoder block: 192 + the conv's 192
    assert shapes["out_conv.weight"] == (3, 192, 3, 3)
    assert sum(n.startswith("dec.") and n.endswith("_block0.norm0.weight") for n in shapes) == 4


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resolution", [28, 32])
def test_shape_and_exact_zero_at_init(channels, resolution):
    net = tiny_adm(channels=channels, resolution=resolution, label_dim=10)
    x = torch.randn(2, channels, resolution, resolution)
    y = net(x, torch.randn(2), torch.eye(10)[:2])
    assert y.shape == x.shape
    assert torch.count_nonzero(y) == 0  # zero output conv: the denoiser returns c_skip x at init


def test_labels_and_augment_labels_change_the_output_and_zeros_equal_none():
    net = open_zero_parameters(tiny_adm(label_dim=10, augment_dim=9)).eval()
    x, c = torch.randn(2, 1, 28, 28), torch.randn(2)
    eye, aug = torch.eye(10), torch.randn(2, 9)
    base = net(x, c)
    assert not torch.allclose(net(x, c, eye[:2]), net(x, c, eye[2:4]))
    assert torch.equal(net(x, c, torch.zeros(2, 10)), base)  # the trainer's null label is "no label"
    assert not torch.allclose(net(x, c, augment_labels=aug), base)
    assert torch.equal(net(x, c, augment_labels=torch.zeros(2, 9)), base)  # zeros = not augmented


def test_augment_map_starts_at_zero():
    """EDM initialises the augment map to zero: an untrained network ignores augment labels until it learns them."""
    net = tiny_adm(augment_dim=9)
    assert torch.count_nonzero(net.map_augment.weight) == 0


def test_cond_channels_are_used():
    net = open_zero_parameters(tiny_adm(channels=3, resolution=32, cond_channels=2)).eval()
    x, c = torch.randn(2, 3, 32, 32), torch.randn(2)
    assert net.enc["32x32_conv"].in_channels == 5
    assert not torch.allclose(net(x, c, cond=torch.randn(2, 2, 32, 32)), net(x, c))
    assert torch.equal(net(x, c, cond=torch.zeros(2, 2, 32, 32)), net(x, c))
    with pytest.raises(ValueError, match="cond_channels"):
        tiny_adm()(torch.randn(1, 1, 28, 28), torch.zeros(1), cond=torch.zeros(1, 1, 28, 28))


def test_noise_level_modulates_the_output():
    """c_noise reaches the image path only through each block's affine (scale, shift): dropping it would leave F unchanged."""
    net = open_zero_parameters(tiny_adm()).eval()
    x = torch.randn(2, 1, 28, 28)
    assert not torch.allclose(net(x, torch.full((2,), -1.0)), net(x, torch.full((2,), 2.0)), atol=1e-4)


def test_scale_shift_convention():
    """Adaptive group norm is norm(h) * (1 + scale) + shift with the affine output ordered [scale, shift] (ADM, EDM):
    scale = -1, shift = 0 zeroes the residual branch, so the block returns its input exactly (with conv1's bias at 0).
    A swapped order (shift first) or a missing "+ 1" leaves the branch on."""
    block = open_zero_parameters(ADMBlock(16, 16, 32, attention=False)).eval()
    with torch.no_grad():
        block.conv1.bias.zero_()
        block.affine.weight.zero_()
        block.affine.bias.copy_(torch.cat([torch.full((16,), -1.0), torch.zeros(16)]))
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x, torch.randn(2, 32)), x)
    with torch.no_grad():
        block.affine.bias.copy_(torch.cat([torch.zeros(16), torch.full((16,), -1.0)]))  # scale 0, shift -1: branch on
    assert not torch.allclose(block(x, torch.randn(2, 32)), x)


def test_downsampling_block_follows_adm_order():
    """ADM's ResBlock with down=True: norm, SiLU, *then* average-pool, then conv (guided-diffusion in_rest, h_upd,
    in_conv); the skip is the pooled input. Pooling before the norm (or after the conv) gives other numbers."""
    torch.manual_seed(0)
    block = open_zero_parameters(ADMBlock(8, 8, 4, resample_mode="down")).eval()
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 4)
    silu, pool = torch.nn.functional.silu, torch.nn.functional.avg_pool2d
    h = block.conv0(pool(silu(block.norm0(x)), 2))  # [2, 8, 3, 3]
    scale, shift = block.affine(emb)[:, :, None, None].chunk(2, dim=1)
    expected = block.conv1(silu(block.norm1(h) * (1 + scale) + shift)) + pool(x, 2)
    torch.testing.assert_close(block(x, emb), expected)


def test_multi_head_attention_matches_a_per_head_reference():
    """The attention branch equals softmax(q_h^T k_h / sqrt(d)) per head, q, k, v read from EDM's qkv channel layout
    [heads, d, (q, k, v)]; d = channels_per_head. Catches a wrong layout, a single head, or a wrong scale."""
    torch.manual_seed(0)
    block = open_zero_parameters(ADMBlock(16, 16, 8, attention=True, channels_per_head=4)).eval()
    assert block.num_heads == 4
    x = torch.randn(2, 16, 3, 5)
    qkv = block.qkv(block.norm2(x)).reshape(2, 4, 4, 3, 15)  # [N, heads, d, 3, HW]
    heads = []
    for h in range(4):
        q, k, v = qkv[:, h, :, 0], qkv[:, h, :, 1], qkv[:, h, :, 2]  # each [N, d, HW]
        w = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(4), dim=2)
        heads.append(torch.einsum("nqk,nck->ncq", w, v))
    expected = block.proj(torch.stack(heads, dim=1).reshape(2, 16, 3, 5))
    torch.testing.assert_close(block.attention(x), expected, rtol=1e-5, atol=1e-6)


def test_gradients_reach_every_parameter():
    """At init only the output conv learns (its zero weight blocks every other gradient); once the zero-initialised
    parameters are opened, every parameter gets a nonzero gradient (one cut off from the output would show exactly 0)."""
    net = tiny_adm(label_dim=10, augment_dim=9, cond_channels=1)
    x, c = torch.randn(3, 1, 28, 28), torch.randn(3)
    inputs = dict(labels=torch.eye(10)[:3], augment_labels=torch.randn(3, 9), cond=torch.randn(3, 1, 28, 28))
    readout = torch.randn(3, 1, 28, 28)
    (net(x, c, **inputs) * readout).sum().backward()
    assert {n for n, p in net.named_parameters() if p.grad is not None and p.grad.any()} == {"out_conv.weight", "out_conv.bias"}
    net.zero_grad(set_to_none=True)
    open_zero_parameters(net)
    (net(x, c, **inputs) * readout).sum().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, dead


def test_bf16_autocast_forward_is_finite():
    net = open_zero_parameters(tiny_adm(channels=3, resolution=32, label_dim=10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(torch.randn(2, 3, 32, 32), torch.randn(2), torch.eye(10)[:2])
    assert y.shape == (2, 3, 32, 32) and torch.isfinite(y.float()).all()


def test_dropout_acts_in_training_only():
    net = open_zero_parameters(ADMUNet(resolution=28, in_channels=1, out_channels=1, model_channels=16,
                                       channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), channels_per_head=8,
                                       dropout=0.5))
    x, c = torch.randn(1, 1, 28, 28), torch.zeros(1)
    assert not torch.equal(net.train()(x, c), net(x, c))
    assert torch.equal(net.eval()(x, c), net(x, c))


@pytest.mark.parametrize("kwargs, fix", [
    (dict(resolution=28, attn_resolutions=(16,)), r"subset of \(28, 14\)"),  # 16 never occurs at 28x28
    (dict(resolution=30, channel_mult=(1, 2, 2)), "multiple of 4"),  # 30 -> 15 -> 7.5
    (dict(resolution=28, attn_resolutions=(14,), channels_per_head=12), "channels_per_head dividing 32"),
])
def test_impossible_geometry_is_a_one_line_error(kwargs, fix):
    base = dict(in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                attn_resolutions=(), channels_per_head=8)
    with pytest.raises(ValueError, match=fix) as info:
        ADMUNet(**{**base, **kwargs})
    assert "\n" not in str(info.value)
