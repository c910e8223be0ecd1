"""Cross-attention conditioning on a context token sequence [N, L, D] (issue 27 item 3): every arch in CONTEXT_ARCHS
(edm2-unet, ddpmpp, ncsnpp, adm, dit, hdit).

Per backbone: the branch starts switched off, a context changes the output once opened, zeros == None exactly (the
null context, per row), a wrong shape is a one-line error, the checkpoint file round trip is bit-exact, CFG guides from
the null context; an arch outside CONTEXT_ARCHS refuses context_dim; a tiny npz dataset with a context trains;
``edmkit generate --context`` with CFG runs.
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edmkit import checkpoint as ckpt
from edmkit.cli import main
from edmkit import config
from edmkit.config import CONTEXT_ARCHS, NetworkConfig
from edmkit.nn.build import build_network
from edmkit.nn.mp import mp_sum
from test_backbones import opened
from test_backbones import tiny as backbones_tiny

L, D = 3, 8  # context tokens per image and their width


def tiny(arch: str, **network):
    """test_backbones' tiny preset of ``arch`` with a context of width D (``network`` overrides it)."""
    return backbones_tiny(arch, **{"context_dim": D, **network})


def test_mp_sum_with_a_learned_balance_is_the_identity_at_zero_and_preserves_magnitude():
    a, b = torch.randn(4096), torch.randn(4096)
    assert torch.equal(mp_sum(a, b, t=torch.tensor(0.0)), a)  # the gate at init: exactly the main path
    torch.testing.assert_close(mp_sum(a, b, t=torch.tensor(0.3)), mp_sum(a, b, t=0.3))
    assert abs(mp_sum(a, b, t=torch.tensor(0.3)).square().mean().sqrt() - 1) < 0.05


def test_feature_map_cross_attention_ignores_token_order_and_one_token_adds_its_value_everywhere():
    from edmkit.nn.xattn import FeatureMapCrossAttention

    torch.manual_seed(0)
    xattn = opened(FeatureMapCrossAttention(8, D, num_heads=2, norm=torch.nn.GroupNorm(2, 8)))
    x, tokens, keep = torch.randn(2, 8, 5, 3), torch.randn(2, 4, D), torch.tensor([True, True])
    y = xattn(x, (tokens, keep))
    torch.testing.assert_close(xattn(x, (tokens.flip(1), keep)), y)  # context tokens carry no position
    one = tokens[:, :1]  # softmax over one key is 1: every pixel receives proj(v(token))
    v = xattn.kv(one)[:, :, 8:]  # [N, 1, C] (keys, then values)
    torch.testing.assert_close(xattn(x, (one, keep)), x + xattn.proj(v)[:, 0, :, None, None])


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


def test_an_arch_without_cross_attention_refuses_context_dim(monkeypatch):
    monkeypatch.setattr(config, "CONTEXT_ARCHS", ("dit",))  # every arch has cross-attention today: pretend adm has none
    NetworkConfig(arch="adm")
    with pytest.raises(ValueError, match="supported by dit only, not adm"):
        NetworkConfig(arch="adm", context_dim=D)


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


def test_p_uncond_drops_the_same_rows_of_labels_and_context():
    from edmkit.diffusion.loss import make_loss
    from edmkit.training.step_inputs import Shard, step_noise

    cfg = tiny("dit", label_dim=3).override("loss", p_uncond=0.5)
    y, labels, ctx = torch.zeros(64, 1, 28, 28), torch.eye(3)[torch.arange(64) % 3], torch.randn(64, L, D)
    draw = step_noise(make_loss(cfg), cfg, 0, Shard(batch=64, size=64), y, labels, context=ctx)
    kept_labels, kept_ctx = draw.labels.any(1), draw.context.flatten(1).any(1)
    assert torch.equal(kept_labels, kept_ctx) and 0 < int(kept_ctx.sum()) < 64
    assert torch.equal(draw.context[kept_ctx], ctx[kept_ctx])
    alone = step_noise(make_loss(cfg), cfg, 0, Shard(batch=64, size=64), y, None, context=ctx)
    assert torch.equal(alone.context, draw.context)  # the same draw with or without labels


def test_a_folder_dataset_json_gives_each_image_its_context(tmp_path):
    import json

    from edmkit.data.dataset import load_dataset
    from test_data import _png, write_folder

    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    files = {f"{name}.png": _png(img) for name, img in zip("abc", images)}
    ctx = {f"{name}.png": np.random.default_rng(i).standard_normal((2, 4)).round(3).tolist() for i, name in enumerate("abc")}

    def load(context, folder):
        meta = {"labels": [[f"{n}.png", i] for i, n in enumerate("abc")], "context": context}
        return load_dataset(write_folder(tmp_path / folder, {**files, "dataset.json": json.dumps(meta).encode()}))

    data = load([[name, ctx[name]] for name in ("c.png", "a.png", "b.png")], "ok")  # any order: matched by path
    assert torch.equal(data.context, torch.tensor([ctx["a.png"], ctx["b.png"], ctx["c.png"]], dtype=torch.float32))
    assert torch.equal(data.labels, torch.arange(3))
    with pytest.raises(ValueError, match=r"dataset\.json: no context for 1 of 3 images, e\.g\. c\.png"):
        load([[name, ctx[name]] for name in ("a.png", "b.png")], "missing")
    with pytest.raises(ValueError, match=r"the context of b\.png has shape \(3, 4\).*a\.png, has \(2, 4\)"):
        load([["a.png", ctx["a.png"]], ["b.png", ctx["b.png"] + [[0.0] * 4]], ["c.png", ctx["c.png"]]], "longer")
    with pytest.raises(ValueError, match=r"the context of b\.png is not an \[L, D\] list of numbers"):
        load([["a.png", ctx["a.png"]], ["b.png", [[1.0, 2.0], [1.0]]], ["c.png", ctx["c.png"]]], "ragged")


def test_a_context_run_draws_its_grid_conditioned_on_the_first_contexts(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from edmkit.training.monitor import save_grid

    cfg = tiny("dit").override("ema", sample_std=0).override("train", grid_n=4, sample_steps=2)
    torch.manual_seed(0)
    state = SimpleNamespace(net=opened(ckpt.build_denoiser(cfg)), nimg=0)
    ctx = torch.randn(6, L, D)

    def grid(context, name):
        (tmp_path / name).mkdir()
        return np.asarray(Image.open(save_grid(state, cfg, tmp_path / name, context=context)))

    conditioned = grid(ctx, "ctx")
    assert np.array_equal(conditioned, grid(ctx[:4], "first"))  # rows 0-3 of the dataset's context, one per image
    assert not np.array_equal(conditioned, grid(None, "none"))
    assert np.array_equal(grid(ctx[:1], "one"), grid(ctx[:1].expand(4, L, D), "repeated"))  # fewer rows than grid_n repeat


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_an_npz_context_trains_and_generate_context_with_cfg_runs(tmp_path):
    from edmkit.data.dataset import load_dataset

    data = load_dataset("mnist5k").subset(range(32))
    ctx = np.random.default_rng(0).standard_normal((32, 2, 4)).astype(np.float32)
    np.savez(tmp_path / "pairs.npz", images=data.images.numpy(), context=ctx)
    assert torch.equal(load_dataset(tmp_path / "pairs.npz").subset([3, 1]).context, torch.from_numpy(ctx[[3, 1]]))
    run_dir = tmp_path / "run"
    res = run("train", "--preset", "tiny", "--data", tmp_path / "pairs.npz", "--context", "--p-uncond", "0.2", "--run", run_dir,
              "--duration", "32", "--val-fraction", "0.25", "--quiet")
    assert res.exit_code == 0, res.output
    net_file = sorted(run_dir.glob("*.safetensors"))[-1]
    net, meta = ckpt.load_network(net_file)
    assert meta["config"].network.context_dim == 4 and meta["config"].loss.p_uncond == 0.2
    x, sigma = torch.randn(2, 1, 28, 28), torch.tensor([1.0, 1.0])
    assert not torch.equal(net(x, sigma, context=torch.from_numpy(ctx[:2])), net(x, sigma))  # the context was trained on
    np.save(tmp_path / "one.npy", ctx[0])
    np.savez(tmp_path / "each.npz", context=ctx[:4])
    for file, guidance in (("one.npy", "2"), ("each.npz", "1.5"), ("one.npy", "1")):
        res = run("generate", "--checkpoint", net_file, "--n", "4", "--steps", "2", "--batch", "3", "--context", tmp_path / file,
                  "--guidance", guidance, "--out", tmp_path / "g.npz")
        assert res.exit_code == 0, res.output
    a = np.load(tmp_path / "g.npz")["images"]
    res = run("generate", "--checkpoint", net_file, "--n", "4", "--steps", "2", "--out", tmp_path / "u.npz")
    assert not np.array_equal(a, np.load(tmp_path / "u.npz")["images"])  # the context changed the images
    np.save(tmp_path / "bad.npy", ctx[:3, :, :3])
    res = run("generate", "--checkpoint", net_file, "--n", "4", "--context", tmp_path / "bad.npy", "--out", tmp_path / "g.png")
    assert res.exit_code != 0 and "is neither [L, 4] nor [4 images, L, 4]" in res.output and "Traceback" not in res.output
    res = run("train", "--preset", "tiny", "--context", "--dry-run")
    assert res.exit_code != 0 and "--context needs per-image context tokens" in res.output


@pytest.mark.parametrize("arch", CONTEXT_ARCHS)
def test_cfg_guides_from_the_null_context(arch):
    from edmkit.diffusion.guidance import classifier_free

    torch.manual_seed(0)
    net = ckpt.build_denoiser(tiny(arch))
    opened(net.net).eval()
    x, sigma, ctx = torch.randn(2, 1, 28, 28), torch.tensor([0.7, 3.0]), torch.randn(2, L, D)
    cond, uncond = net(x, sigma, context=ctx), net(x, sigma)
    torch.testing.assert_close(classifier_free(net, 2.5, context=ctx)(x, sigma, None), uncond + 2.5 * (cond - uncond))
    with pytest.raises(ValueError, match="needs labels or a context"):
        classifier_free(net, 2.5)(x, sigma, None)
