"""The EDM2 U-Net: shapes for 1 and 3 channels, labels, gradients, and magnitude behaviour at init."""

import pytest
import torch

from edmkit.config import NetworkConfig, get_preset
from edmkit.checkpoint import build_denoiser
from edmkit.nn.unet import UNet


def tiny_unet(channels=1, label_dim=0, resolution=16):
    return UNet(resolution=resolution, channels=channels, label_dim=label_dim, model_channels=8,
                channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), channels_per_head=8)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("label_dim", [0, 10])
def test_forward_backward_shapes(channels, label_dim):
    net = tiny_unet(channels, label_dim)
    x = torch.randn(3, channels, 16, 16)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 9]), 10).float() if label_dim else None
    y = net(x, torch.randn(3), labels)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


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


def test_activations_stay_near_unit_magnitude_at_init():
    net = UNet(resolution=16, channels=1, model_channels=32, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(8,), channels_per_head=32)
    rms = {}
    for name, block in list(net.enc.items()) + list(net.dec.items()):
        block.register_forward_hook(lambda m, i, o, name=name: rms.__setitem__(name, o.pow(2).mean().sqrt().item()))
    net(torch.randn(16, 1, 16, 16), torch.randn(16))
    # encoder conv sees 2 unit-ish channels incl. the ones channel; everything stays O(1), nothing explodes/vanishes
    assert all(0.3 < v < 3.0 for v in rms.values()), rms


def test_bad_resolution_rejected():
    with pytest.raises(ValueError, match="divisible"):
        NetworkConfig(resolution=30, channel_mult=(1, 2, 2))


@pytest.mark.parametrize("preset", ["tiny", "mnist"])
def test_presets_build(preset):
    net = build_denoiser(get_preset(preset))
    n = get_preset(preset).network
    x = torch.randn(2, n.channels, n.resolution, n.resolution)
    D, logvar = net(x, torch.tensor([0.1, 10.0]), return_logvar=True)
    assert D.shape == x.shape and logvar.shape == (2, 1, 1, 1)
