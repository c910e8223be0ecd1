"""DiT (Peebles & Xie 2023): its pieces' invariants, the paper's DiT-S/2 size, guidance with the null label.

The contract shared with every backbone (shapes, D = c_skip x at init, labels / augment labels with zeros = None,
20 training steps, file round trip, every sampler) is in tests/test_backbones.py, which runs "dit" like the others.
"""

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from edmkit import checkpoint as ckpt
from edmkit.cli import main
from edmkit.diffusion.guidance import classifier_free
from edmkit.diffusion.samplers import SAMPLERS
from edmkit.diffusion.schedules import karras_sigmas
from edmkit.nn.build import build_network, network_cost
from edmkit.nn.dit import DiT, sincos_positions_2d, unpatchify
from edmkit.presets import get_preset


def test_sincos_positions_are_distinct_and_their_inner_products_depend_only_on_the_offset():
    h, w = 4, 5
    pos = sincos_positions_2d(h, w, dim=16)  # [T, D]
    assert pos.shape == (h * w, 16) and len(set(map(tuple, pos.tolist()))) == h * w
    gram = pos @ pos.T
    ij = [(i, j) for i in range(h) for j in range(w)]
    by_offset = {}
    for a, (ia, ja) in enumerate(ij):
        for b, (ib, jb) in enumerate(ij):
            by_offset.setdefault((ib - ia, jb - ja), []).append(gram[a, b])
    assert len(by_offset) == (2 * h - 1) * (2 * w - 1)
    for offset, values in by_offset.items():
        torch.testing.assert_close(torch.stack(values), values[0].expand(len(values)), msg=str(offset))


def test_the_patch_cut_and_unpatchify_invert_each_other():
    """A patch convolution that copies its p x p x C values into a token, then unpatchify, gives the image back."""
    C, p = 3, 4
    x = torch.randn(2, C, 8, 12)
    cut = torch.nn.Conv2d(C, C * p * p, p, stride=p, bias=False)
    with torch.no_grad():
        cut.weight.copy_(torch.eye(C * p * p).view(C * p * p, C, p, p))
    tokens = cut(x).flatten(2).transpose(1, 2)  # [N, T, C p^2], row-major as DiT.forward makes them
    assert tokens.shape == (2, 6, C * p * p)
    torch.testing.assert_close(tokens, F.pixel_unshuffle(x, p).flatten(2).transpose(1, 2))
    torch.testing.assert_close(unpatchify(tokens, patch=p, height=8, width=12), x)


def test_adaln_zero_blocks_start_as_the_identity_until_their_gates_open():
    torch.manual_seed(0)
    net = DiT(resolution=8, in_channels=1, out_channels=1, model_channels=16, depth=2, channels_per_head=8)
    x, c = torch.randn(2, 16, 16), torch.randn(2, 16)
    block = net.blocks[0]
    assert torch.equal(block(x, c), x)
    with torch.no_grad():
        block.ada.weight.normal_()
    assert not torch.allclose(block(x, c), x)


def test_a_resolution_the_patch_cannot_take_is_a_one_line_error_and_unet_fields_do_not_apply():
    cfg = get_preset("tiny-dit")
    with pytest.raises(ValueError, match=r"image size 30 cannot be cut into 4x4 patches: use a resolution divisible by 4") as e:
        cfg.override("network", resolution=30, patch_size=4)
    assert "\n" not in str(e.value)
    result = CliRunner().invoke(main, ["train", "--preset", "tiny-dit", "--resolution", "27", "--dry-run"])
    assert result.exit_code != 0 and "cannot be cut into 2x2 patches" in result.output
    with pytest.raises(ValueError, match="cannot take a 29x29 image"):
        build_network(cfg.network)(torch.zeros(1, 1, 29, 29), torch.zeros(1))
    cfg.override("network", channel_mult=(1, 2, 2, 2, 2, 2), attn_resolutions=(5,))  # U-Net levels and attention: ignored


def test_dit_s2_has_the_papers_size_and_cost():
    """DiT Table 4: DiT-S/2 33M parameters, 6.06 Gflops (multiply-adds) on a 32x32 input; ours has 3 channels in and
    out instead of 4 in, 8 out, and no 1000-class table (0.38M)."""
    params, gflops = network_cost(get_preset("dit-s2").network)
    assert abs(params / 1e6 - 33.0) < 0.7, params
    assert abs(gflops / 2 - 6.06) / 6.06 < 0.01, gflops


def test_classifier_free_guidance_with_the_null_label():
    torch.manual_seed(0)
    cfg = get_preset("tiny-dit").override("network", label_dim=3)
    net = ckpt.build_denoiser(cfg).eval()
    with torch.no_grad():  # open the zero-initialised layers so the labels reach the output
        for p in net.net.parameters():
            if not p.any():
                p.normal_(std=0.1)
    x, sigma, labels = torch.randn(2, 1, 28, 28), torch.tensor([0.5, 3.0]), torch.eye(3)[[0, 2]]
    with torch.no_grad():
        assert torch.equal(classifier_free(net, 1.0)(x, sigma, labels), net(x, sigma, labels))
        torch.testing.assert_close(classifier_free(net, 0.0)(x, sigma, labels), net(x, sigma, None))  # guide = null label
        assert not torch.allclose(classifier_free(net, 2.0)(x, sigma, labels), net(x, sigma, labels))
        assert torch.isfinite(SAMPLERS["heun"](classifier_free(net, 2.0), 80 * x, karras_sigmas(3), labels=labels)).all()
