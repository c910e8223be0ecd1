"""The EDM2 U-Net: shapes for 1 and 3 channels, labels, gradients, and magnitude behaviour at init."""

import math

import pytest
import torch

from edmkit.checkpoint import build_denoiser
from edmkit.config import NetworkConfig
from edmkit.nn.unet import Block, UNet
from edmkit.presets import get_preset


def tiny_unet(channels=1, label_dim=0, resolution=16):
    return UNet(resolution=resolution, channels=channels, label_dim=label_dim, model_channels=8,
                channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), channels_per_head=8)


def open_gains(net, value=0.7):
    """Set the zero-initialised learned gains (output, per-block embedding) to ``value`` so every path reaches the output."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name == "out_gain" or name.endswith("emb_gain"):
                p.fill_(value)


def grad_is_nonzero(net):
    return {n: p.grad is not None and bool((p.grad != 0).any()) for n, p in net.named_parameters()}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("label_dim", [0, 10])
def test_forward_backward_shapes(channels, label_dim):
    """At init the zero output gain makes F = 0, so only that gain has a gradient; once the gains are opened every
    parameter has a nonzero one (a parameter cut off from the output shows as an exactly zero gradient).

    The loss is a random linear read-out of F, so its gradient does not vanish where F does.
    """
    net = tiny_unet(channels, label_dim)
    x, c_noise = torch.randn(3, channels, 16, 16), torch.randn(3)
    readout = torch.randn(3, channels, 16, 16)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 9]), 10).float() if label_dim else None
    y = net(x, c_noise, labels)
    assert y.shape == x.shape and torch.count_nonzero(y) == 0
    (y * readout).sum().backward()
    assert {n for n, ok in grad_is_nonzero(net).items() if ok} == {"out_gain"}
    net.zero_grad(set_to_none=True)
    open_gains(net)
    (net(x, c_noise, labels) * readout).sum().backward()
    zero = [n for n, ok in grad_is_nonzero(net).items() if not ok]
    assert not zero, zero


def test_output_gain_starts_at_zero_and_learns():
    net = tiny_unet()
    x = torch.randn(2, 1, 16, 16)
    assert torch.count_nonzero(net(x, torch.zeros(2))) == 0  # zero output gain at init
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    (net(x, torch.zeros(2)) - x).square().mean().backward()
    opt.step()
    assert torch.count_nonzero(net(x, torch.zeros(2))) > 0


def test_labels_reach_the_output():
    net = tiny_unet(label_dim=10)
    with torch.no_grad():  # open every gain so conditioning can show
        net.out_gain.fill_(1.0)
        for name, p in net.named_parameters():
            if name.endswith("emb_gain"):
                p.fill_(1.0)
    x, c = torch.randn(1, 1, 16, 16), torch.zeros(1)
    eye = torch.eye(10)
    assert not torch.allclose(net(x, c, eye[:1]), net(x, c, eye[1:2]))


def test_label_embedding_has_unit_magnitude():
    """One-hot labels are scaled by sqrt(label_dim) before the weight-normalized linear layer (EDM2), so the label
    embedding has unit RMS: over all classes it is the RMS of the unit-RMS weight rows, 1 up to normalize's eps."""
    net = tiny_unet(label_dim=10)
    out = []
    net.emb_label.register_forward_hook(lambda m, i, o: out.append(o))
    net(torch.randn(10, 1, 16, 16), torch.zeros(10), torch.eye(10))
    assert out[0].pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-3)


def test_activations_stay_near_unit_magnitude_at_init():
    """Every block output of the whole net stays O(1) and their geometric mean near 1 (measured: per block 0.73-1.17,
    geometric mean 0.87-1.02 over 20 seeds; an MP sum without its denominator gives a geometric mean of 0.45).

    Below 1 on its own: zero padding, box downsampling and diffuse attention at init shrink magnitudes a little, and
    the input has one image channel plus the ones channel, so channels are correlated. ``test_block_keeps_unit_rms``
    checks each block on independent inputs, where MP gives 1 to within 2%.
    """
    net = UNet(resolution=16, channels=1, model_channels=32, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(8,), channels_per_head=32)
    rms = {}
    for name, block in list(net.enc.items()) + list(net.dec.items()):
        block.register_forward_hook(lambda m, i, o, name=name: rms.__setitem__(name, o.pow(2).mean().sqrt().item()))
    net(torch.randn(16, 1, 16, 16), torch.randn(16))
    assert all(0.65 < v < 1.35 for v in rms.values()), rms
    geometric_mean = math.exp(sum(math.log(v) for v in rms.values()) / len(rms))
    assert 0.85 < geometric_mean < 1.15, rms


@pytest.mark.parametrize("flavor, in_channels, attention", [
    ("enc", 64, False), ("enc", 32, False), ("dec", 96, False), ("enc", 64, True), ("dec", 64, True),
])
def test_block_keeps_unit_rms(flavor, in_channels, attention):
    """A config-G block at init maps unit-RMS independent input to unit-RMS output (EDM2 Sec. 2.5; interior pixels).

    Without attention 1 +- 0.035 (measured 0.987-1.024 over 30 seeds); MP-SiLU without its 0.596 gives 0.93, an
    MP sum without its denominator 0.76, a lost "+1" in the embedding modulation 0.92. With attention the (at init
    nearly uniform) attention averages its values, so its branch is small and the MP sum leaves about
    0.7 / sqrt(0.7^2 + 0.3^2) = 0.92 (measured 0.91-0.945; 0.85-0.86 without the MP-SiLU divisor).
    """
    block = Block(in_channels, 64, 32, flavor=flavor, attention=attention, channels_per_head=32)
    x, emb = torch.randn(8, in_channels, 12, 12), torch.randn(8, 32)
    y = block(x, emb)[..., 2:-2, 2:-2]  # two 3x3 convs: zero padding reaches two pixels in
    rms = y.pow(2).mean().sqrt().item()
    assert (0.89 < rms < 0.97) if attention else (0.965 < rms < 1.035), rms


def test_edm2_default_balances_and_clip():
    """EDM2 defaults (PAPERS.md): residual and attention balance 0.3, skip concat and label balance 0.5, clip at 256."""
    net = tiny_unet(label_dim=10)
    blocks = list(net.enc.values())[1:] + list(net.dec.values())
    assert {(b.res_balance, b.attn_balance, b.clip_act) for b in blocks} == {(0.3, 0.3, 256.0)}
    assert (net.concat_balance, net.label_balance) == (0.5, 0.5)


def test_bad_resolution_rejected():
    with pytest.raises(ValueError, match="divisible"):
        NetworkConfig(resolution=30, channel_mult=(1, 2, 2))


def config_g_parameter_count(n):
    """Parameters of the EDM2 config-G U-Net a NetworkConfig describes, counted from the layout (EDM2 Fig. 21).

    Embedding: Fourier features (buffers) -> linear model_channels -> 4 model_channels, label linear. Encoder: 3x3 conv of the
    image + ones channel, then per level a downsampling block (below the top) and ``num_blocks`` blocks; decoder: per
    level two blocks (lowest: the first with attention) or an upsampling block, then ``num_blocks + 1`` blocks taking a
    skip each. Block: gain, [1x1 skip if widths differ], 3x3 conv (encoder: after the skip projection, so out -> out;
    decoder: in -> out), embedding linear (scale only), 3x3 conv, [attention qkv + projection]. Output 3x3 conv and its
    gain; the uncertainty head's linear layer.
    """
    emb = 4 * n.model_channels
    widths = [n.model_channels * m for m in n.channel_mult]
    attn = lambda res: res in n.attn_resolutions

    def block(c_in, c_out, attention, *, encoder):
        conv0 = 9 * (c_out if encoder else c_in) * c_out
        return 1 + (c_in * c_out if c_in != c_out else 0) + conv0 + emb * c_out + 9 * c_out * c_out + (4 * c_out * c_out if attention else 0)

    count = n.model_channels * emb + n.label_dim * emb + 1 + 9 * (n.channels + 1) * widths[0]
    skips, c = [widths[0]], widths[0]
    for level, w in enumerate(widths):
        if level:
            count += block(c, c, False, encoder=True)
            skips.append(c)
        for _ in range(n.num_blocks):
            count += block(c, w, attn(n.resolution >> level), encoder=True)
            c = w
            skips.append(c)
    for level, w in reversed(list(enumerate(widths))):
        lowest = level == len(widths) - 1
        count += block(c, c, True, encoder=False) + block(c, c, False, encoder=False) if lowest else block(c, c, False, encoder=False)
        for _ in range(n.num_blocks + 1):
            count += block(c + skips.pop(), w, attn(n.resolution >> level), encoder=False)
            c = w
    assert not skips
    return count + 9 * widths[0] * n.channels + n.logvar_channels


@pytest.mark.parametrize("preset", ["tiny", "mnist"])
def test_presets_build(preset):
    """The network follows the config's layout: parameter count, attention only at the configured resolutions, head width."""
    net = build_denoiser(get_preset(preset))
    n = get_preset(preset).network
    assert sum(p.numel() for p in net.parameters()) == config_g_parameter_count(n)
    blocks = list(net.net.enc.items()) + list(net.net.dec.items())
    attention = {name: b.num_heads for name, b in blocks if getattr(b, "num_heads", 0)}
    assert {int(name.split("x")[0]) for name in attention} == set(n.attn_resolutions), attention
    assert all(b.num_heads * n.channels_per_head == b.out_channels for name, b in blocks if name in attention)
    x = torch.randn(2, n.channels, n.resolution, n.resolution)
    D, logvar = net(x, torch.tensor([0.1, 10.0]), return_logvar=True)
    assert D.shape == x.shape and logvar.shape == (2, 1, 1, 1)
    assert torch.isfinite(D).all() and torch.isfinite(logvar).all()
