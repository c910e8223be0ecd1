"""Training diagnostics: held-out split, validation loss, memorization flag, gradient clipping, stats records, sinks."""

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edmkit.cli import main
from edmkit.data.dataset import load_dataset
from edmkit.data.images import images_to_float
from edmkit.diffusion.loss import DDPMLoss, EDMLoss, FlowLoss
from edmkit.presets import get_preset
from edmkit.training import loop as train_mod
from edmkit.training.ema import PowerFunctionEMA
from edmkit.training.logging_sinks import flatten_record, make_sinks
from edmkit.training.loop import clip_grad_norm, train, train_step
from edmkit.training.monitor import Monitor, append_record, write_validation
from edmkit.training.run_state import TrainState
from edmkit.training.validation import make_probe, memorization_signal, probe_loss, split_indices

README = Path(__file__).resolve().parents[1] / "README.md"
TRAIN_FIELDS = {"kind", "nimg", "step", "loss", "mse", "lr", "grad_norm", "grad_norm_max", "img_per_sec", "train_sec", "ema_std"}
VAL_FIELDS = {"kind", "nimg", "step", "loss", "train_loss", "sigma", "loss_per_sigma", "train_loss_per_sigma", "n_images", "memorization"}


@pytest.fixture
def cfg():
    # tiny preset, 1% held out (50 images), 4 validation sigmas, no grids; 20 steps of 16 images
    c = get_preset("tiny").override("train", grid_nimg=10**9, total_nimg=320, val_fraction=0.01, val_nimg=160, val_sigmas=4)
    return c


def quiet(msg: str) -> None:
    pass


def strict_json(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


# --- held-out split -----------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete():
    train_idx, val_idx = split_indices(1000, fraction=0.05, seed=3)
    again = split_indices(1000, fraction=0.05, seed=3)
    assert torch.equal(train_idx, again[0]) and torch.equal(val_idx, again[1])
    assert len(val_idx) == 50 and not set(train_idx.tolist()) & set(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(1000))
    assert not torch.equal(val_idx, split_indices(1000, fraction=0.05, seed=4)[1])
    assert len(split_indices(1000, fraction=0.0, seed=3)[1]) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, fraction=1.0, seed=0)


def test_validation_images_are_never_trained_on(tmp_path, cfg, monkeypatch):
    full = load_dataset("mnist5k", resolution=28, channels=1)
    train_idx, val_idx = split_indices(len(full), fraction=cfg.train.val_fraction, seed=cfg.train.seed)
    seen_data, batches, monitors = [], [], []
    make_batch, make_monitor = train_mod.make_batch, train_mod.make_monitor

    def recording_make_batch(data, *args, **kwargs):
        batch = make_batch(data, *args, **kwargs)
        seen_data.append(data)
        batches.append(batch[0])
        return batch

    def recording_make_monitor(*args, **kwargs):
        monitors.append(make_monitor(*args, **kwargs))
        return monitors[-1]

    monkeypatch.setattr(train_mod, "make_batch", recording_make_batch)
    monkeypatch.setattr(train_mod, "make_monitor", recording_make_monitor)
    train(cfg, tmp_path / "run", progress=False, log=quiet)

    # index sets: the loop draws only from the training indices
    assert all(d is seen_data[0] for d in seen_data) and len(seen_data[0]) == len(train_idx) == len(full) - 50
    assert torch.equal(seen_data[0].images, full.images[train_idx])
    # pixels: no batch image is one that exists only among the held-out images
    owners: dict[bytes, set[int]] = {}
    for i in range(len(full)):
        owners.setdefault(full.images[i].numpy().tobytes(), set()).add(i)
    val_set = set(val_idx.tolist())
    held_out_only = {key for key, idx in owners.items() if idx <= val_set}
    assert len(held_out_only) >= 45  # (exact duplicates across the split are allowed to exist)
    batch_keys = {((y + 1) * 127.5).round().to(torch.uint8).numpy().tobytes() for y in torch.cat(batches)}
    assert len(batch_keys) > 250 and not batch_keys & held_out_only
    # the validation probe holds exactly the held-out images; the training probe none of them
    validator = monitors[0].validator
    assert torch.equal(validator.val_probe.y, images_to_float(full.images[val_idx]))
    probe_keys = {((y + 1) * 127.5).round().to(torch.uint8).numpy().tobytes() for y in validator.train_probe.y}
    assert len(probe_keys) >= 45 and not probe_keys & held_out_only


# --- validation loss ---------------------------------------------------------------------------


def test_validation_loss_is_repeatable_and_touches_nothing(cfg):
    from edmkit import checkpoint as ckpt

    net = ckpt.build_denoiser(cfg).train()
    data = load_dataset("mnist5k").subset(range(12))
    loss_fn = EDMLoss(uncertainty=True)
    probe = make_probe(data, range(12), label_dim=0, sigmas=loss_fn.sigma_quantiles(3), noise_seed=5)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    a = probe_loss(net, loss_fn, probe, batch=5)
    b = probe_loss(net, loss_fn, probe, batch=5)
    assert torch.equal(a, b) and a.shape == (3,) and torch.all(a > 0)
    assert torch.equal(rng, torch.get_rng_state()), "validation consumed the global RNG"
    assert net.training and all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())
    other = make_probe(data, range(12), label_dim=0, sigmas=loss_fn.sigma_quantiles(3), noise_seed=6)
    assert not torch.equal(a, probe_loss(net, loss_fn, other, batch=5))  # the noise is what the seed fixes


def test_validation_does_not_change_training_and_resume_is_exact(tmp_path, cfg):
    cfg = cfg.override("train", total_nimg=192)
    frequent = train(cfg.override("train", val_nimg=64), tmp_path / "a", progress=False, log=quiet)
    rare = cfg.override("train", val_nimg=10**9)
    train(rare, tmp_path / "b", stop_nimg=96, progress=False, log=quiet)  # "killed" after 6 steps
    resumed = train(rare, tmp_path / "b", progress=False, log=quiet)
    for k, v in frequent.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
    vals = {p: [r for r in map(strict_json, (tmp_path / p / "stats.jsonl").read_text().splitlines()) if r["kind"] == "val"] for p in "ab"}
    assert [r["nimg"] for r in vals["a"]] == [64, 128, 192] and [r["nimg"] for r in vals["b"]] == [96, 192]
    assert vals["a"][-1]["loss_per_sigma"] == vals["b"][-1]["loss_per_sigma"]  # same weights, same number


def test_sigma_quantiles_follow_each_training_density():
    s = EDMLoss(P_mean=-1.2, P_std=1.2).sigma_quantiles(5)
    assert torch.all(s[1:] > s[:-1]) and s[2].item() == pytest.approx(torch.tensor(-1.2).exp().item(), rel=1e-6)
    d = DDPMLoss().sigma_quantiles(4)
    assert torch.all(d[1:] > d[:-1]) and d[0] > 0
    f = FlowLoss(uniform_t=True).sigma_quantiles(3)
    assert f[1].item() == pytest.approx(1.0)  # t = 1/2 <-> sigma = 1


def test_memorization_signal_and_warning(tmp_path):
    assert memorization_signal([1.0, 1.1, 1.2, 1.3], [1.0, 0.9, 0.8, 0.7], patience=3)
    assert not memorization_signal([1.0, 1.1, 1.2, 1.3], [1.0, 1.1, 1.2, 1.3], patience=3)  # both rise: no signal
    assert not memorization_signal([1.0, 1.1, 1.05, 1.3], [1.0, 0.9, 0.8, 0.7], patience=3)  # not a run of rises
    assert not memorization_signal([1.1, 1.2, 1.3], [0.9, 0.8, 0.7], patience=3)  # too few evaluations

    class Flagging:
        def evaluate(self, net):
            return {"loss": 0.5, "train_loss": 0.1, "sigma": [1.0], "loss_per_sigma": [0.5], "train_loss_per_sigma": [0.1],
                    "n_images": 1, "memorization": True}

    lines: list[str] = []
    state = types.SimpleNamespace(nimg=64, step=4, net=None)
    write_validation(state, get_preset("tiny"), tmp_path, Monitor(validator=Flagging(), log=lines.append))
    assert len(lines) == 1 and "memorization" in lines[0]
    assert strict_json((tmp_path / "stats.jsonl").read_text())["memorization"] is True


# --- gradient clipping -------------------------------------------------------------------------


def test_clip_grad_norm_bounds_the_global_norm():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    (net(torch.randn(16, 4)) * 100).square().mean().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    norm = torch.cat([g.flatten() for g in grads]).norm().item()
    assert clip_grad_norm(net, max_norm=0.0) == pytest.approx(norm, rel=1e-5)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))  # 0 = off: untouched
    assert norm > 1.0 and clip_grad_norm(net, max_norm=1.0) == pytest.approx(norm, rel=1e-5)  # returns the norm before clipping
    clipped = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert clipped.norm().item() <= 1.0 + 1e-5 and clipped.norm().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(clipped, torch.cat([g.flatten() for g in grads]) / norm, atol=1e-6)  # direction kept


class ToyDenoiser(torch.nn.Module):
    """D(x) = w * x: enough to exercise a training step."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((1, 1, 4, 4), 3.0))

    def forward(self, x, sigma, labels=None):
        return self.w * x


def test_train_step_with_clipping_moves_weights_at_most_lr_times_clip():
    cfg = get_preset("tiny").override("optim", grad_clip=0.01, warmup_nimg=0, lr=0.5)
    net = ToyDenoiser()
    state = TrainState(net=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0), ema=PowerFunctionEMA(net, stds=(0.1,)))
    before = net.w.detach().clone()
    stats = train_step(state, EDMLoss(uncertainty=False), cfg, torch.rand(8, 1, 4, 4) * 2 - 1, None)
    step = (net.w.detach() - before).norm().item()
    assert stats["grad_norm"] > 0.01, "the toy gradient must be large enough for clipping to act"
    assert 0 < step <= stats["lr"] * 0.01 * (1 + 1e-4)


# --- stats records and sinks -------------------------------------------------------------------


def test_stats_records_are_json_lines_with_documented_fields(tmp_path, cfg):
    train(cfg.override("train", total_nimg=160), tmp_path / "run", progress=False, log=quiet)
    records = [strict_json(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds.count("train") == 3 and kinds.count("val") == 1 and kinds[-1] == "train"
    for r in records:
        assert (TRAIN_FIELDS if r["kind"] == "train" else VAL_FIELDS) <= set(r), r
    val = records[kinds.index("val")]
    assert len(val["sigma"]) == len(val["loss_per_sigma"]) == len(val["train_loss_per_sigma"]) == 4 and val["n_images"] == 50
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `stats.jsonl`"))
    documented = set(re.findall(r"`([a-z_]+)`", row))
    assert TRAIN_FIELDS | VAL_FIELDS <= documented, (TRAIN_FIELDS | VAL_FIELDS) - documented
    # a non-finite value is written as null, so every line stays strict JSON
    append_record(tmp_path, {"kind": "train", "nimg": 1, "loss": float("nan"), "ema_std": [float("inf")]})
    assert strict_json((tmp_path / "stats.jsonl").read_text().splitlines()[-1]) == {"kind": "train", "nimg": 1, "loss": None, "ema_std": [None]}


def test_sinks_receive_the_stats_records(tmp_path, cfg, monkeypatch):
    logged: list[dict] = []
    fake = types.ModuleType("wandb")
    run = types.SimpleNamespace(log=logged.append, define_metric=lambda *a, **k: None, finish=lambda: logged.append("finished"))
    fake.init = lambda **kw: run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train(cfg.override("train", val_fraction=0.0, total_nimg=128), tmp_path / "run", progress=False, log=quiet, loggers=["wandb"])
    records = [strict_json(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert logged[-1] == "finished" and len(logged) == len(records) + 1
    assert logged[0] == {"nimg": records[0]["nimg"], **flatten_record(records[0])} and "train/grad_norm" in logged[0]
    flat = flatten_record({"kind": "val", "nimg": 5, "loss": 1.0, "sigma": [0.5, 2.0], "loss_per_sigma": [3.0, 4.0], "memorization": False})
    assert flat == {"val/loss": 1.0, "val/loss_per_sigma/sigma=0.5": 3.0, "val/loss_per_sigma/sigma=2": 4.0, "val/memorization": 0.0}


@pytest.mark.parametrize("name, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_missing_logger_is_a_clear_error(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when the package is not installed
    with pytest.raises(ValueError, match=rf"pip install {name}"):
        make_sinks([name], run_dir=tmp_path, config={})
    res = CliRunner().invoke(main, ["train", "--preset", "tiny", "--run", str(tmp_path / "run"), "--duration", "16", "--quiet", "--log", name])
    assert res.exit_code != 0 and res.exception is not None and isinstance(res.exception, SystemExit)
    assert f"pip install {name}" in res.output and "Traceback" not in res.output
