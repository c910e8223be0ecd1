"""DDPM++ / NCSN++ (SongUNet): EDM's CIFAR-10 sizes and parameter layout, shapes, zero output at init, conditioning
inputs, gradients, bf16, the resolution checks, and the embedding / resampling formulas."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from edmkit.diffusion.precond import Denoiser, edm_precond
from edmkit.nn.songunet import (
    VARIANTS,
    Block,
    SongUNet,
    fourier_embedding,
    positional_embedding,
    resample,
)


def tiny(variant="ddpmpp", *, channels=1, resolution=28, **kw):
    """model_channels 16, two levels, one block each; attention at the second level (14 for 28x28, 16 for 32x32)."""
    return SongUNet(resolution=resolution, in_channels=channels, out_channels=channels, model_channels=16,
                    channel_mult=(1, 2), num_blocks=1, attn_resolutions=(resolution // 2,), dropout=0.0, **VARIANTS[variant], **kw)


def random_biases(net):
    """Nonzero biases (they start at zero), so a path that adds a bias for zeros but not for None shows."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p))
    return net


def open_output(net, scale=0.5):
    """Give the zero-initialised output conv(s) random weights, so every path reaches the output."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "_aux_conv" in name:
                p.copy_(torch.randn_like(p) * scale)
    return net


@pytest.mark.parametrize("variant, expected", [("ddpmpp", 55.7e6), ("ncsnpp", 56.4e6)])
def test_edm_cifar10_parameter_count(variant, expected):
    """EDM App. F, Table 7 sizes (meta device: no memory). A missing skip projection, a wrong width or a missing
    residual-encoder conv (NCSN++ - DDPM++ is 1.2%) moves the count by more than 0.5%."""
    with torch.device("meta"):
        net = SongUNet(resolution=32, in_channels=3, out_channels=3, model_channels=128, channel_mult=(2, 2, 2),
                       num_blocks=4, attn_resolutions=(16,), **VARIANTS[variant])
    n = sum(p.numel() for p in net.parameters())
    assert abs(n / expected - 1) < 0.005, n


def test_edm_parameter_names_and_shapes():
    """A few of EDM's released SongUNet names, shapes worked out from the architecture (NCSN++ at CIFAR-10 size):
    noise width 2 x 128, embedding 4 x 128, first conv to 128, blocks at 256, qkv 3 x 256, residual-encoder 3x3 conv."""
    with torch.device("meta"):
        net = SongUNet(resolution=32, in_channels=3, out_channels=3, **VARIANTS["ncsnpp"])
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["map_noise.freqs"] == (128,)
    assert shapes["map_layer0.weight"] == (512, 256) and shapes["map_layer1.weight"] == (512, 512)
    assert shapes["enc.32x32_conv.weight"] == (128, 3, 3, 3)
    assert shapes["enc.32x32_block0.skip.weight"] == (256, 128, 1, 1)
    assert shapes["enc.16x16_down.skip.weight"] == (256, 256, 1, 1)  # EDM projects the resampled skip (1x1 conv)
    assert shapes["enc.16x16_aux_residual.weight"] == (256, 3, 3, 3)
    assert shapes["enc.8x8_aux_residual.weight"] == (256, 256, 3, 3)
    assert shapes["enc.16x16_block0.qkv.weight"] == (768, 256, 1, 1) and "enc.16x16_block0.norm2.weight" in shapes
    assert "dec.8x8_in0.qkv.weight" in shapes and "dec.8x8_in1.qkv.weight" not in shapes
    assert "dec.16x16_block4.qkv.weight" in shapes and "dec.16x16_block3.qkv.weight" not in shapes
    assert shapes["dec.32x32_block0.conv0.weight"] == (256, 512, 3, 3)
    assert shapes["dec.32x32_aux_norm.weight"] == (256,) and shapes["dec.32x32_aux_conv.weight"] == (3, 256, 3, 3)
    assert "dec.16x16_aux_conv.weight" not in shapes  # standard decoder: one output head


@pytest.mark.parametrize("variant", ["ddpmpp", "ncsnpp"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resolution", [28, 32])
def test_output_shape_and_zero_at_init(variant, channels, resolution):
    """Output shaped like x and exactly zero at init, so the EDM denoiser returns c_skip x exactly."""
    net = tiny(variant, channels=channels, resolution=resolution)
    x, c_noise = torch.randn(2, channels, resolution, resolution), torch.randn(2)
    y = net(x, c_noise)
    assert y.shape == x.shape and torch.count_nonzero(y) == 0
    sigma = torch.tensor([0.3, 5.0])
    c_skip = edm_precond(sigma.reshape(-1, 1, 1, 1), sigma_data=0.5)[0]
    assert torch.equal(Denoiser(net)(x, sigma), c_skip * x)


@pytest.mark.parametrize("variant", ["ddpmpp", "ncsnpp"])
def test_skip_decoder_shape_and_zero_at_init(variant):
    """The skip decoder ("progressive output") sums an upsampled output head per level, all starting at zero; the skip
    encoder ("progressive input") adds the downsampled input per level. Three levels, so the running sum is upsampled twice."""
    kw = dict(VARIANTS[variant], decoder_type="skip", encoder_type="skip")
    net = SongUNet(resolution=32, in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2, 2), num_blocks=1,
                   attn_resolutions=(16,), **kw)
    y = net(torch.randn(2, 3, 32, 32), torch.randn(2))
    assert y.shape == (2, 3, 32, 32) and torch.count_nonzero(y) == 0
    open_output(net)
    assert torch.count_nonzero(net(torch.randn(2, 3, 32, 32), torch.randn(2))) > 0


@pytest.mark.parametrize("variant", ["ddpmpp", "ncsnpp"])
def test_labels_augment_and_cond_reach_the_output(variant):
    """Each conditioning input changes the output, and all-zero inputs equal None (the trainer's null label)."""
    torch.manual_seed(0)
    net = open_output(random_biases(tiny(variant, label_dim=10, augment_dim=7, cond_channels=2))).eval()
    x, c = torch.randn(2, 1, 28, 28), torch.randn(2)
    eye = torch.eye(10)
    base = net(x, c)
    assert not torch.allclose(net(x, c, eye[[0, 1]]), net(x, c, eye[[2, 3]]))
    assert torch.equal(net(x, c, torch.zeros(2, 10)), base)
    assert not torch.allclose(net(x, c, augment_labels=torch.randn(2, 7)), base)
    assert torch.equal(net(x, c, augment_labels=torch.zeros(2, 7)), base)
    assert not torch.allclose(net(x, c, cond=torch.randn(2, 2, 28, 28)), base)
    assert torch.equal(net(x, c, cond=torch.zeros(2, 2, 28, 28)), base)


@pytest.mark.parametrize("variant", ["ddpmpp", "ncsnpp"])
def test_gradients_reach_every_parameter(variant):
    """At init only the output conv has a gradient (F = 0); once it is nonzero every parameter has a nonzero one
    (a layer left out of forward, or a path cut off, shows as an exactly zero gradient). Random read-out as loss."""
    torch.manual_seed(0)
    net = tiny(variant, channels=3, resolution=32, label_dim=4, augment_dim=3, cond_channels=1)
    x, c = torch.randn(2, 3, 32, 32), torch.randn(2)
    args = {"labels": torch.eye(4)[[0, 2]], "augment_labels": torch.randn(2, 3), "cond": torch.randn(2, 1, 32, 32)}
    readout = torch.randn(2, 3, 32, 32)
    (net(x, c, **args) * readout).sum().backward()
    assert {n for n, p in net.named_parameters() if p.grad is not None and p.grad.any()} == {
        "dec.32x32_aux_conv.weight", "dec.32x32_aux_conv.bias"}
    net.zero_grad(set_to_none=True)
    (open_output(net)(x, c, **args) * readout).sum().backward()
    zero = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not zero, zero


@pytest.mark.parametrize("variant", ["ddpmpp", "ncsnpp"])
def test_bf16_autocast_forward_is_finite(variant):
    net = open_output(tiny(variant, channels=3, resolution=32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(torch.randn(2, 3, 32, 32), torch.tensor([-3.0, 4.0]))
    assert y.shape == (2, 3, 32, 32) and torch.isfinite(y).all() and y.abs().sum() > 0


@pytest.mark.parametrize("kw, fix", [
    ({"resolution": 28, "attn_resolutions": (16,)}, "choose attn_resolutions from [28, 14, 7]"),
    ({"resolution": 28, "channel_mult": (1, 2, 2, 2)}, "divisible by 8"),
    ({"resolution": 32, "encoder_type": "progressive"}, "valid: standard, skip, residual"),
    ({"resolution": 32, "resample_filter": (1, 2, 1)}, "needs an even number of taps"),
])
def test_resolution_it_cannot_take_raises_one_line_error(kw, fix):
    args = {"in_channels": 1, "out_channels": 1, "model_channels": 16, "channel_mult": (1, 2, 2), "num_blocks": 1,
            "attn_resolutions": ()}
    with pytest.raises(ValueError, match=re.escape(fix)) as err:
        SongUNet(**{**args, **kw})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("attention", [False, True])
def test_block_at_init_scales_its_input_by_sqrt_half_per_residual_sum(attention):
    """Residual-branch outputs (conv1, proj) start near zero (EDM: 1e-5 x Xavier), so a block at init is x -> x sqrt(1/2),
    and x / 2 with attention: catches a missing sqrt(1/2) skip scale or a full-size init of conv1 / proj."""
    torch.manual_seed(0)
    block = Block(16, 16, 32, attention=attention)
    x = torch.randn(2, 16, 8, 8)
    expected = x * (0.5 if attention else math.sqrt(0.5))
    assert torch.allclose(block(x, torch.randn(2, 32)), expected, atol=1e-3)


def test_attention_matches_single_head_reference():
    """Single-head softmax(q^T k / sqrt(C)) v over pixels, with EDM's interleaved qkv channels (q = 0::3, k = 1::3,
    v = 2::3): reading q, k, v as three contiguous chunks instead would map released weights wrongly."""
    torch.manual_seed(0)
    block = Block(8, 8, 4, attention=True)
    x = torch.randn(2, 8, 4, 4)
    qkv = block.qkv(x).reshape(2, 24, 16)  # [N, 3C, HW]
    q, k, v = qkv[:, 0::3], qkv[:, 1::3], qkv[:, 2::3]  # [N, C, HW]
    w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(8)).softmax(dim=2)
    expected = torch.einsum("nqk,nck->ncq", w, v).reshape(2, 8, 4, 4)
    assert torch.allclose(block._attention(x), expected, atol=1e-5)


def test_positional_embedding_frequencies():
    """Song et al.'s DDPM++ embedding: sin first, frequencies 10000^(-i/(C/2-1)) from 1 down to exactly 1/10000
    (EDM's ``endpoint=True``; without it the weights of a released network would see other frequencies)."""
    c = torch.tensor([1.0, 250.0])
    e = positional_embedding(c, num_channels=8)
    f = torch.tensor([math.exp(-math.log(10_000) * i / 3) for i in range(4)])
    assert torch.allclose(e, torch.cat([(c[:, None] * f).sin(), (c[:, None] * f).cos()], dim=1), atol=1e-6)


def test_fourier_frequencies_have_scale_16_and_are_reproducible():
    a = SongUNet(resolution=16, in_channels=1, out_channels=1, model_channels=64, channel_mult=(1,), num_blocks=1,
                 attn_resolutions=(), **VARIANTS["ncsnpp"])
    b = SongUNet(resolution=16, in_channels=1, out_channels=1, model_channels=64, channel_mult=(1,), num_blocks=1,
                 attn_resolutions=(), **VARIANTS["ncsnpp"])
    freqs = a.map_noise.freqs
    assert freqs.shape == (64,) and 12 < freqs.std() < 20 and torch.equal(freqs, b.map_noise.freqs)
    c = torch.tensor([0.1, -0.7])
    y = 2 * math.pi * c[:, None] * freqs  # Song et al.'s Gaussian Fourier projection, sin first
    assert torch.allclose(fourier_embedding(c, freqs), torch.cat([y.sin(), y.cos()], dim=1), atol=1e-4)


@pytest.mark.parametrize("f", [(1, 1), (1, 3, 3, 1)])
def test_resampling_keeps_constants_and_shapes(f):
    """The normalised FIR filter keeps a constant image constant (interior: the border sees zero padding), and the
    2x box filter is exact 2x2 averaging / nearest-neighbour upsampling."""
    x = torch.full((1, 2, 8, 8), 3.0)
    down, up = resample(x, f, mode="down"), resample(x, f, mode="up")
    assert down.shape == (1, 2, 4, 4) and up.shape == (1, 2, 16, 16)
    assert torch.allclose(down[..., 1:-1, 1:-1], x[..., :2, :2])
    assert torch.allclose(up[..., 2:-2, 2:-2], torch.full((1, 2, 12, 12), 3.0))
    if f == (1, 1):
        z = torch.randn(1, 1, 4, 4)
        assert torch.allclose(resample(z, f, mode="down"), torch.nn.functional.avg_pool2d(z, 2))
        assert torch.equal(resample(z, f, mode="up"), z.repeat_interleave(2, -1).repeat_interleave(2, -2))


# Reference outputs of EDM's released SongUNet (NVlabs/edm, training/networks.py) for three switch sets that between
# them take every switch value, with weights and inputs given by formulas (no RNG); tests/fixtures/songunet/make_reference.py
# wrote them. They pin what the formula tests above cannot: the sqrt(1/2) of the residual encoder, the embedding added
# before norm1 (not scale-shift), SiLU after the mapping MLP, the sqrt(label_dim) label scale, the FIR pyramids.
REFERENCE = Path(__file__).parent / "fixtures" / "songunet" / "edm_reference.json"
REFERENCE_NET = {"resolution": 8, "in_channels": 3, "out_channels": 2, "label_dim": 3, "augment_dim": 2, "model_channels": 16,
                     "channel_mult": (1, 2, 2), "num_blocks": 1, "attn_resolutions": (4,), "dropout": 0.0}
REFERENCE_SWITCHES = {"ddpmpp": dict(VARIANTS["ddpmpp"]), "ncsnpp": dict(VARIANTS["ncsnpp"]),
                      "fourier-skip-skip": dict(VARIANTS["ncsnpp"], encoder_type="skip", decoder_type="skip")}


def formula_state(names_shapes):
    """Deterministic weights for the reference comparison: key j of the sorted names gets 0.3 sin(0.37 i + j)."""
    return {name: 0.3 * torch.sin(0.37 * torch.arange(math.prod(shape), dtype=torch.float64) + j).float().reshape(shape)
            for j, (name, shape) in enumerate(sorted(names_shapes.items()))}


def reference_inputs():
    """x [2, 3, 8, 8], c_noise [2], labels [2, 3] one-hot, augment_labels [2, 2]."""
    x = 0.8 * torch.sin(0.5 * torch.arange(2 * 3 * 8 * 8, dtype=torch.float64)).float().reshape(2, 3, 8, 8)
    return x, torch.tensor([-1.2, 0.7]), torch.eye(3)[[0, 2]], torch.tensor([[0.3, -0.5], [0.0, 1.0]])


@pytest.mark.parametrize("name", list(REFERENCE_SWITCHES))
def test_matches_edm_released_network(name):
    net = SongUNet(**REFERENCE_NET, **REFERENCE_SWITCHES[name]).eval()
    net.load_state_dict(formula_state({k: tuple(v.shape) for k, v in net.state_dict().items()}), strict=True)
    expected = torch.tensor(json.loads(REFERENCE.read_text())[name]).reshape(2, 2, 8, 8)
    y = net(*reference_inputs())
    assert torch.allclose(y, expected, rtol=0, atol=1e-5 * expected.abs().max())
