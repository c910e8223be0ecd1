"""HDiT (nn/hdit.py): RoPE's relative positions, translation equivariance, the attention kinds, geometry errors, sizes.

The contract tests every backbone shares (shapes at 1 / 3 channels and 28 / 32 px, D = c_skip x at init, labels and
augment labels, 20 training steps, the file round trip and every sampler, bf16, the dry run) run on ``tiny-hdit`` in
``test_backbones.py``.
"""

import pytest
import torch
from click.testing import CliRunner
from test_backbones import opened  # every zero-initialised parameter given random values

from edmkit.cli import main
from edmkit.config import NetworkConfig
from edmkit.nn.build import build_network, network_cost
from edmkit.nn.hdit import (
    SelfAttention,
    apply_rope,
    attention,
    axial_positions,
    merge_tokens,
    neighborhood_mask,
    rope_angles,
    rope_frequencies,
    split_tokens,
    window_groups,
)
from edmkit.presets import get_preset


def hdit(**kw) -> NetworkConfig:
    """A tiny HDiT config: two levels, 8-channel heads, 2-pixel patches, 32-wide mapping network."""
    return NetworkConfig(**dict(dict(arch="hdit", channel_mult=(1, 2), model_channels=16, channels_per_head=8, patch_size=2, mapping_channels=32), **kw))


def rope_logits(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """q.k after RoPE, [N, heads, h*w query, h*w key]."""
    theta = rope_angles(pos, freqs)
    return torch.einsum("nhqd,nhkd->nhqk", apply_rope(q, theta).flatten(2, 3), apply_rope(k, theta).flatten(2, 3))


def test_rope_logits_depend_on_relative_positions_only():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 2, 5, 6, 16, generator=g, dtype=torch.float64).unbind(0)  # [N=2, heads, h, w, d]
    pos, freqs = axial_positions(5, 6).double(), rope_frequencies(16, 2).double()
    logits = rope_logits(q, k, pos, freqs)
    torch.testing.assert_close(rope_logits(q, k, pos + torch.tensor([0.37, -1.3], dtype=torch.float64), freqs), logits)
    assert not torch.allclose(rope_logits(q, k, 2 * pos, freqs), logits, atol=1e-3)  # other relative positions: other logits
    torch.testing.assert_close(apply_rope(q, rope_angles(pos, freqs)).norm(dim=-1), q.norm(dim=-1))  # a rotation


def test_an_attention_block_sees_relative_positions_only():
    torch.manual_seed(0)
    block = opened(SelfAttention(16, 8, 4, kind="global", window=0, shift=0, dropout=0.0))
    x, emb, pos = torch.randn(2, 4, 6, 16), torch.randn(2, 4), axial_positions(4, 6)
    torch.testing.assert_close(block(x, pos + torch.tensor([0.5, -0.25]), emb), block(x, pos, emb))
    assert not torch.allclose(block(x, 3 * pos, emb), block(x, pos, emb), atol=1e-4)


def test_shifting_the_image_by_whole_patches_shifts_the_output():
    """What holds exactly: one global-attention layer on content surrounded by zeros is translation-equivariant for
    shifts by whole patches that keep the content inside. Zero patches give tokens with q = k = v = 0 (bias-free layers,
    RMSNorm of zero is zero), so they add the same constant to every softmax denominator wherever the content sits, and
    the content's logits depend only on relative positions (RoPE); the background's outputs are all equal (uniform
    attention over the same values). A deeper stack is equivariant only up to boundary effects: after the first layer
    the background tokens carry content, and RoPE sees them at other offsets once the content moves."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 1, 16, 16)
    x[..., 4:10, 3:9] = torch.randn(6, 6, generator=g)
    shifted = torch.roll(x, (2, 4), dims=(-2, -1))  # by (1, 2) patches of 2 pixels; the content stays inside

    def error(depth: int) -> float:
        torch.manual_seed(0)
        net = opened(build_network(hdit(resolution=16, channel_mult=(1,), depths=(depth,)))).eval()
        with torch.no_grad():
            return (net(shifted, torch.zeros(1)) - torch.roll(net(x, torch.zeros(1)), (2, 4), dims=(-2, -1))).abs().max().item()

    assert error(1) < 1e-5
    assert error(2) > 1e-3  # positions matter (without RoPE, every depth would be exactly equivariant on a zero background)


def test_shifted_windows_equal_global_attention_masked_to_the_window_groups():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 8, 8, 4, generator=g).unbind(0)
    for shift in (0, 2):
        groups = window_groups(8, 8, window=4, shift=shift).flatten()
        mask = groups[:, None] == groups[None, :]  # [64, 64]
        reference = torch.nn.functional.scaled_dot_product_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), attn_mask=mask, scale=1.0)
        torch.testing.assert_close(attention(q, k, v, kind="window", window=4, shift=shift), reference.view(q.shape))
    assert window_groups(8, 8, window=4, shift=0).unique().numel() == 4  # 2x2 windows
    assert window_groups(8, 8, window=4, shift=2).unique().numel() == 9  # shifted: 3x3 pieces, none across the wrap


def test_neighborhood_mask_is_a_kernel_window_moved_inside_the_grid():
    mask = neighborhood_mask(7, 9, kernel=3).view(7, 9, 7, 9)
    assert (mask.sum(dim=(-2, -1)) == 9).all()  # every query sees kernel^2 keys
    assert mask[3, 4, 2:5, 3:6].all()  # interior: centred on the query
    assert mask[0, 0, :3, :3].all() and mask[6, 8, 4:, 6:].all()  # corners: the window moves inside
    assert neighborhood_mask(5, 5, kernel=5).all()  # kernel = grid: global attention


def test_tokens_merge_and_split_back():
    x = torch.randn(2, 8, 12, 3)
    assert merge_tokens(x, 4).shape == (2, 2, 3, 48)
    assert torch.equal(split_tokens(merge_tokens(x, 4), 4), x)
    assert torch.equal(merge_tokens(x, 2)[0, 0, 0], x[0, :2, :2].flatten())  # one token = one 2x2 patch


@pytest.mark.parametrize("kinds", [("window", "neighborhood"), ("neighborhood", "global")])
def test_window_and_neighborhood_levels_build_and_run(kinds):
    net = opened(build_network(hdit(channel_mult=(1, 2), attn_kinds=kinds, window_size=7, depths=(2, 1))))
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    net(x, torch.zeros(2)).square().mean().backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("kw, message", [
    (dict(resolution=30, channel_mult=(1, 2)), "image size 30 cannot be taken by HDiT with patch size 2 and 2 levels: it must be divisible by 4"),
    (dict(channel_mult=(1, 2), attn_kinds=("window", "global"), window_size=4), "window_size 4 must divide 14"),
    (dict(channel_mult=(1, 2), attn_kinds=("global",)), "one attention per level"),
    (dict(channels_per_head=12, model_channels=24), "multiple of 8"),
])
def test_geometry_mistakes_are_one_line_errors(kw, message):
    with pytest.raises(ValueError, match=message) as e:
        hdit(**kw)
    assert "\n" not in str(e.value)


def test_the_cli_refuses_a_resolution_the_patches_cannot_take():
    result = CliRunner().invoke(main, ["train", "--preset", "tiny-hdit", "--resolution", "30", "--dry-run"])
    assert result.exit_code != 0 and result.output.strip().splitlines() == [
        "Error: image size 30 cannot be taken by HDiT with patch size 2 and 2 levels: it must be divisible by 4 "
        "(change the resolution, patch_size or the levels in channel_mult)"]


def test_u_net_attention_resolutions_do_not_constrain_hdit():
    assert hdit(resolution=32, attn_resolutions=(5,)).resolution == 32
    with pytest.raises(ValueError, match="attention at 5x5"):
        NetworkConfig(arch="adm", resolution=32, attn_resolutions=(5,))


# k-diffusion's ImageTransformerDenoiserModelV2 for configs/config_{mnist,cifar10}_transformer.json (10 classes), counted
# layer by layer from its constructor: mnist 9,187,104, cifar10 20,981,553. Its augment embedding is Fourier features of 9
# values + a 256x256 linear map; here a 7x256 map of edmkit's augment labels, so 63,744 fewer.
@pytest.mark.parametrize("preset, k_diffusion", [("hdit-mnist", 9_187_104), ("hdit-cifar10", 20_981_553)])
def test_presets_have_the_k_diffusion_configs_sizes(preset, k_diffusion):
    params, _ = network_cost(get_preset(preset).override("network", label_dim=10).network)
    assert params == k_diffusion - 256 * 256 + 7 * 256
