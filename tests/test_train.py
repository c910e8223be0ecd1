"""Training: the loss falls on a tiny run, resume is bit-exact, run folders are protected."""

import json

import pytest
import torch

from edmkit import checkpoint as ckpt
from edmkit.config import get_preset
from edmkit.data import images_to_float, load_dataset
from edmkit.loss import EDMLoss
from edmkit.train import RunError, train


@pytest.fixture
def cfg():
    # tiny preset, no periodic grids (they are covered by the CLI test)
    c = get_preset("tiny")
    return c.override("train", grid_nimg=10**9, total_nimg=320)


def fixed_loss(net) -> float:
    """Weighted denoising error on fixed images, sigmas and noise (comparable before/after training)."""
    y = images_to_float(load_dataset("mnist5k").images[:64])
    g = torch.Generator().manual_seed(123)
    loss_fn = EDMLoss(uncertainty=False)
    sigma = loss_fn.sample_sigma(64, generator=g)
    noise = torch.randn(y.shape, generator=g)
    with torch.no_grad():
        return loss_fn(net.eval(), y, None, sigma=sigma, noise=noise)[0].mean().item()


def test_twenty_steps_lower_the_loss(tmp_path, cfg):
    before = fixed_loss(ckpt.build_denoiser(cfg))
    state = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert state.step == 20
    after = fixed_loss(state.net)
    assert after < 0.8 * before, (before, after)
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["nimg"] == 320 and {"loss", "mse", "lr", "img_per_sec"} <= set(stats[-1])


def test_resume_is_bit_exact(tmp_path, cfg):
    straight = train(cfg, tmp_path / "a", progress=False, log=lambda s: None)
    train(cfg, tmp_path / "b", stop_nimg=160, progress=False, log=lambda s: None)  # "killed" after 10 steps
    resumed = train(cfg, tmp_path / "b", progress=False, log=lambda s: None)
    assert resumed.nimg == straight.nimg == 320
    for k, v in straight.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
    for i in range(len(cfg.ema.stds)):
        for k, v in straight.ema.averaged(i).items():
            assert torch.equal(v, resumed.ema.averaged(i)[k]), k


def test_changed_config_is_refused(tmp_path, cfg):
    train(cfg, tmp_path / "run", stop_nimg=16, progress=False, log=lambda s: None)
    with pytest.raises(RunError, match="optim.lr"):
        train(cfg.override("optim", lr=0.5), tmp_path / "run", progress=False, log=lambda s: None)
    # a longer duration is not a different run
    state = train(cfg.override("train", total_nimg=32), tmp_path / "run", progress=False, log=lambda s: None)
    assert state.nimg == 32


def test_damaged_newest_state_falls_back(tmp_path, cfg):
    run = tmp_path / "run"
    cfg = cfg.override("train", state_nimg=64)
    train(cfg, run, stop_nimg=128, progress=False, log=lambda s: None)
    newest = ckpt.list_states(run)[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a crash during a copy
    with pytest.warns(UserWarning, match="damaged"):
        state = train(cfg, run, stop_nimg=128, progress=False, log=lambda s: None)
    assert state.nimg == 128  # resumed from 64 and retrained the lost steps


def test_sigterm_saves_a_loadable_state(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "edmkit", "train", "--preset", "tiny", "--run", str(run), "--duration", "100k", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run / "stats.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "state saved" in out, out
    states = ckpt.list_states(run)
    assert states and ckpt.load_state(states[-1])["nimg"] > 0


def test_snapshot_budget_refuses_before_training(tmp_path, cfg):
    tight = cfg.override("ema", snapshot_budget_mb=0.01)  # tiny preset: ~0.2 MB per snapshot file
    with pytest.raises(RunError, match="over the 0.01 MB budget"):
        train(tight, tmp_path / "run", progress=False, log=lambda s: None)
    assert not ckpt.list_states(tmp_path / "run")
    state = train(cfg.override("ema", snapshot_budget_mb=1000.0), tmp_path / "run2", stop_nimg=16, progress=False, log=lambda s: None)
    assert state.nimg == 16
