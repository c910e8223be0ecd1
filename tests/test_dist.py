"""Scaling and surviving (issue 8): torchrun multi-process runs, gradient accumulation, mixed precision, faults."""

import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import edmkit.training.loop as training
from edmkit import checkpoint as ckpt
from edmkit.diffusion.loss import make_loss
from edmkit.presets import get_preset
from edmkit.training.ema import PowerFunctionEMA
from edmkit.training.loop import train, train_step
from edmkit.training.run_state import RunError, TrainState
from edmkit.training.step_inputs import Shard, make_shard

QUIET = dict(progress=False, log=lambda s: None)
TIMEOUT_SEC = 240


@pytest.fixture
def cfg():
    # tiny preset, 4 steps of 16 images, no periodic grids
    return get_preset("tiny").override("train", grid_nimg=10**9, total_nimg=64)


def newest_state(run) -> dict:
    return ckpt.load_state(ckpt.list_states(run)[-1])


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if os.path.isdir("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo: talk over loopback, whatever the host name resolves to
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edmkit_train(*args) -> list[str]:
    return [sys.executable, "-m", "edmkit", "train", "--preset", "tiny", "--quiet", *args]


def assert_close(a: dict, b: dict, *, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), (k, (a[k] - b[k]).abs().max().item())


def assert_same_stats(run_a, run_b) -> None:
    """Same number of stats records, with the same global-batch loss and gradient norm (Adam is blind to a wrong
    gradient scale, so the weights alone would not catch a wrong loss normalization)."""
    a, b = ([json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()] for run in (run_a, run_b))
    assert len(a) == len(b) and a
    for ra, rb in zip(a, b):
        for key in ("loss", "mse", "grad_norm", "grad_norm_max"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5), (key, ra[key], rb[key])


# --- sharding of the global batch ----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, size, world", [(16, 16, 1), (16, 4, 1), (16, 8, 2), (16, 2, 2), (12, 1, 3)])
def test_shards_partition_the_global_batch(batch, size, world):
    rows = [Shard(batch=batch, size=size, rank=r, world=world).rows() for r in range(world)]
    assert all(len(r) == batch // world for r in rows)
    assert torch.equal(torch.cat(rows).sort().values, torch.arange(batch))


def test_impossible_splits_are_refused(cfg):
    with pytest.raises(ValueError, match="split evenly over 3"):
        make_shard(cfg, rank=0, world=3)  # batch 16
    with pytest.raises(ValueError, match="batch_per_device"):
        make_shard(cfg.override("train", batch_per_device=8), rank=0, world=4)
    with pytest.raises(ValueError, match="multiple of batch_per_device"):
        cfg.override("train", batch_per_device=5)
    assert make_shard(cfg.override("train", batch_per_device=2), rank=1, world=2).rounds == 4


# --- multi-process runs and accumulation equal the one-process run ------------------------------------------------


def test_two_processes_equal_one(tmp_path, cfg):
    """torchrun, 2 gloo processes with 2 accumulation rounds of 4 each == 1 process with the whole batch of 16."""
    one = train(cfg, tmp_path / "one", **QUIET)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "edmkit", "train", "--preset", "tiny", "--quiet", "--duration", "64", "--batch-per-device", "4", "--run-dir", str(tmp_path / "two")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_SEC, env=subprocess_env())
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("done: 64 images") == 1, out.stdout  # rank 0 alone reports
    two = newest_state(tmp_path / "two")
    assert two["nimg"] == 64 and two["step"] == 4
    assert_close(one.net.state_dict(), two["net"], rtol=1e-5, atol=1e-5)
    for i, ema in enumerate(two["ema"]["emas"]):
        assert_close(one.ema.averaged(i), ema, rtol=1e-5, atol=1e-5)
    assert not torch.equal(two["net"]["logvar_linear.weight"], ckpt.build_denoiser(cfg).state_dict()["logvar_linear.weight"])  # it trained
    # rank-0-only files: one stats line per tick, network files with the unwrapped keys (no "module." prefix)
    assert_same_stats(tmp_path / "one", tmp_path / "two")
    net_file = sorted((tmp_path / "two").glob("network-*-0.000.safetensors"))[-1]
    loaded, _ = ckpt.load_network(net_file)  # strict load into a fresh network
    assert set(loaded.state_dict()) == set(one.net.state_dict())


def test_gradient_accumulation_equals_one_big_batch(tmp_path, cfg):
    whole = train(cfg, tmp_path / "whole", **QUIET)
    accumulated = train(cfg.override("train", batch_per_device=4), tmp_path / "acc", **QUIET)  # 4 rounds of 4
    assert_close(whole.net.state_dict(), accumulated.net.state_dict(), rtol=1e-5, atol=1e-5)
    assert_same_stats(tmp_path / "whole", tmp_path / "acc")
    assert not torch.equal(whole.net.state_dict()["logvar_linear.weight"], ckpt.build_denoiser(cfg).state_dict()["logvar_linear.weight"])
    # how the batch is split is no config change; what is computed (precision) is
    train(cfg.override("train", batch_per_device=8, total_nimg=80), tmp_path / "acc", **QUIET)
    with pytest.raises(RunError, match="precision"):
        train(cfg.override("train", precision="bf16", total_nimg=96), tmp_path / "acc", **QUIET)


# --- kill -9 and resume -------------------------------------------------------------------------------------------


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    args = ["--duration", "480"]  # 30 steps; states every 160 images
    env = subprocess_env()
    subprocess.run(edmkit_train(*args, "--run", str(tmp_path / "straight")), check=True, capture_output=True, timeout=TIMEOUT_SEC, env=env)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(edmkit_train(*args, "--run", str(killed)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + TIMEOUT_SEC
    while not ckpt.list_states(killed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert newest_state(killed)["nimg"] < 480
    subprocess.run(edmkit_train(*args, "--run", str(killed)), check=True, capture_output=True, timeout=TIMEOUT_SEC, env=env)
    a, b = newest_state(tmp_path / "straight"), newest_state(killed)
    assert a["nimg"] == b["nimg"] == 480
    for k, v in a["net"].items():
        assert torch.equal(v, b["net"][k]), k
    for ema_a, ema_b in zip(a["ema"]["emas"], b["ema"]["emas"], strict=True):
        assert all(torch.equal(v, ema_b[k]) for k, v in ema_a.items())
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(s_a["exp_avg_sq"], s_b["exp_avg_sq"])


# --- non-finite steps --------------------------------------------------------------------------------------------


class PoisonedLoss:
    """The real loss, but NaN on the given (0-based) calls."""

    def __init__(self, loss_fn, bad_calls) -> None:
        self.loss_fn, self.bad_calls, self.calls = loss_fn, bad_calls, 0

    def __getattr__(self, name):
        return getattr(self.loss_fn, name)

    def __call__(self, *args, **kwargs):
        loss, mse = self.loss_fn(*args, **kwargs)
        bad = self.calls in self.bad_calls
        self.calls += 1
        return (loss * math.nan, mse * math.nan) if bad else (loss, mse)


def test_a_nan_step_is_skipped_and_counted(tmp_path, cfg):
    net = ckpt.build_denoiser(cfg).train()
    state = TrainState(net=net, optimizer=torch.optim.Adam(net.parameters(), lr=1e-2), ema=PowerFunctionEMA(net, stds=cfg.ema.stds))
    loss_fn = PoisonedLoss(make_loss(cfg), bad_calls={1})
    y = torch.rand(16, 1, 28, 28) * 2 - 1
    train_step(state, loss_fn, cfg, y, None)
    adam = {k: v["exp_avg"].clone() for k, v in enumerate(state.optimizer.state.values())}
    ema = state.ema.averaged(0)
    stats = train_step(state, loss_fn, cfg, y, None)  # poisoned
    assert math.isnan(stats["loss"]) and state.totals["skipped_steps"] == 1 and state.nimg == 32
    assert all(torch.equal(adam[k], v["exp_avg"]) for k, v in enumerate(state.optimizer.state.values()))  # no Adam step
    assert all(torch.equal(ema[k], v) for k, v in state.ema.averaged(0).items())  # no EMA update
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())
    stats = train_step(state, loss_fn, cfg, y, None)
    assert math.isfinite(stats["loss"]) and state.totals["bad_streak"] == 0 and state.totals["skipped_steps"] == 1


def test_skipped_steps_reach_the_stats(tmp_path, cfg, monkeypatch):
    monkeypatch.setattr(training, "make_loss", lambda c: PoisonedLoss(make_loss(c), bad_calls={2}))
    state = train(cfg, tmp_path / "run", **QUIET)
    assert state.step == 4 and state.totals["skipped_steps"] == 1
    assert int(next(iter(state.optimizer.state.values()))["step"]) == 3  # Adam stepped 3 times in 4 steps
    rec = json.loads((tmp_path / "run" / "stats.jsonl").read_text().splitlines()[-1])
    assert rec["skipped_steps"] == 1 and math.isfinite(rec["loss"])  # the mean of the finite steps


def test_a_diverged_run_stops_with_a_clear_message(tmp_path, cfg, monkeypatch):
    monkeypatch.setattr(training, "make_loss", lambda c: PoisonedLoss(make_loss(c), bad_calls=range(10**6)))
    with pytest.raises(RunError, match="3 steps in a row had a non-finite loss"):
        train(cfg.override("train", max_bad_steps=3, state_nimg=16), tmp_path / "run", **QUIET)
    states = ckpt.list_states(tmp_path / "run")
    assert [ckpt.load_state(p)["nimg"] for p in states] == [16, 32]  # written before the stop; their weights are finite
    assert all(torch.isfinite(v).all() for v in newest_state(tmp_path / "run")["net"].values())


# --- mixed precision ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, cfg, precision):
    steps = 2 if precision == "bf16" else 3  # fp16 skips its first steps, until the loss scale (2^16 at first) stops overflowing
    cfg = cfg.override("train", total_nimg=16 * steps, precision=precision)
    state = train(cfg, tmp_path / "run", **QUIET)
    fresh = ckpt.build_denoiser(cfg).state_dict()
    sd = newest_state(tmp_path / "run")
    assert sd["nimg"] == 16 * steps and set(sd["net"]) == set(fresh)  # saved keys unchanged
    assert all(v.dtype == fresh[k].dtype and torch.isfinite(v).all() for k, v in sd["net"].items())  # fp32 master weights
    applied = int(next(iter(state.optimizer.state.values()))["step"])
    assert applied == steps - state.totals["skipped_steps"] and applied >= 1
    assert state.totals["skipped_steps"] == 0 or precision == "fp16"
    if precision == "fp16":
        assert 0 < sd["scaler"]["scale"] < 2**16  # lowered by the overflows, and part of the resumable state


def test_autocast_covers_the_backbone_only(cfg):
    net = ckpt.build_denoiser(cfg).train()
    training.autocast_backbone(net, dtype=torch.bfloat16, device_type="cpu")
    seen = {}
    net.net.register_forward_hook(lambda m, i, o: seen.update(backbone=o.dtype))
    D, logvar = net(torch.randn(2, 1, 28, 28), torch.tensor([0.5, 2.0]), return_logvar=True)
    assert seen["backbone"] == torch.bfloat16 and D.dtype == logvar.dtype == torch.float32


# --- states on disk -----------------------------------------------------------------------------------------------


def test_keep_states(tmp_path, cfg):
    train(cfg.override("train", state_nimg=16, keep_states=3), tmp_path / "run", **QUIET)
    assert [ckpt.load_state(p)["nimg"] for p in ckpt.list_states(tmp_path / "run")] == [32, 48, 64]


def test_a_full_disk_fails_the_write_not_the_run_folder(tmp_path, cfg, monkeypatch):
    real_save = torch.save
    calls = []

    def save_until_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    run = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        train(cfg.override("train", state_nimg=16), run, **QUIET)
    assert [p.name for p in ckpt.list_states(run)] == ["state-000000000016.pt"]
    assert ckpt.load_state(ckpt.list_states(run)[0])["nimg"] == 16
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no partial file left behind
