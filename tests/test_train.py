"""Training: the loss falls on a tiny run, resume is bit-exact, run folders are protected."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from edmkit import checkpoint as ckpt
from edmkit.config import ExperimentConfig
from edmkit.data.dataset import load_dataset
from edmkit.data.images import images_to_float
from edmkit.diffusion.loss import EDMLoss, make_loss
from edmkit.presets import get_preset
from edmkit.training.ema import PowerFunctionEMA
from edmkit.training.loop import train, train_step
from edmkit.training.monitor import save_snapshot
from edmkit.training.run_state import RunError, TrainState, prepare_run_dir, resume, save_training_state
from edmkit.training.step_inputs import Shard, step_noise
from edmkit.training.validation import evaluations_since_best


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
    """Twenty steps lower the lambda-weighted error on fixed images, sigmas and noise (not the logged, uncertainty-weighted
    loss, which may go negative), of the raw weights and of the sampling EMA (an EMA left at the initial weights stays
    at `before`). A smoke test of the loop: twenty steps end at 0.65-0.72 x `before` whether or not each step draws new
    sigma and noise, and whether or not the uncertainty term + u is in the loss, so those are pinned exactly by
    test_step_inputs.py and test_train_step_is_one_adam_step_on_the_eq21_gradient."""
    before = fixed_loss(ckpt.build_denoiser(cfg))
    state = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert state.step == 20
    after = fixed_loss(state.net)
    assert after < 0.8 * before, (before, after)
    ema = ckpt.build_denoiser(cfg)
    ema.load_state_dict(state.ema.averaged(cfg.ema.stds.index(cfg.ema.sample_std)))
    assert fixed_loss(ema) < 0.8 * before, (before, fixed_loss(ema))
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


# changes to what the weights become: the global batch (not batch_per_device, which only splits it), the seed, the
# images (data, classes, held-out split), augmentation, and any loss / optimizer / network / EMA setting
WEIGHT_CHANGES = [("train", dict(batch=32)), ("train", dict(seed=1)), ("train", dict(data="other.npz")), ("train", dict(classes=(1, 2))),
                  ("train", dict(val_fraction=0.1)), ("train", dict(augment_p=0.5)), ("optim", dict(warmup_nimg=0)),
                  ("optim", dict(grad_clip=1.0)), ("loss", dict(P_mean=-0.8)), ("network", dict(dropout=0.1)), ("ema", dict(stds=(0.05,)))]


@pytest.mark.parametrize("section, change", WEIGHT_CHANGES)
def test_run_folder_refuses_changes_to_what_is_trained(tmp_path, cfg, section, change):
    """Reusing a run folder with a change to what is trained is refused, naming the field (--force overrides); changes
    to how long, how often and how the work is split (RESUMABLE_CHANGES) are not."""
    prepare_run_dir(tmp_path, cfg)
    changed = cfg.override(section, **change)
    with pytest.raises(RunError, match=rf"{section}\.{next(iter(change))}:"):
        prepare_run_dir(tmp_path, changed)
    prepare_run_dir(tmp_path, changed, force=True)
    assert ExperimentConfig.from_json((tmp_path / "config.json").read_text()) == changed
    prepare_run_dir(tmp_path, changed.override("train", batch_per_device=8, total_nimg=10**6, state_nimg=64, keep_states=5))


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
    assert proc.returncode == 0 and "state saved" in out, out  # SIGTERM (preemption): a clean stop, exit 0 (issue 18)
    states = ckpt.list_states(run)
    assert states and ckpt.load_state(states[-1])["nimg"] > 0


def test_snapshot_budget_refuses_before_training(tmp_path, cfg):
    tight = cfg.override("ema", snapshot_budget_mb=0.01)  # tiny preset: ~0.2 MB per snapshot file
    with pytest.raises(RunError, match="over the 0.01 MB budget"):
        train(tight, tmp_path / "run", progress=False, log=lambda s: None)
    assert not ckpt.list_states(tmp_path / "run")
    state = train(cfg.override("ema", snapshot_budget_mb=1000.0), tmp_path / "run2", stop_nimg=16, progress=False, log=lambda s: None)
    assert state.nimg == 16


# --- one training step, exactly ------------------------------------------------------------------------------------


def fresh_state(cfg) -> TrainState:
    torch.manual_seed(cfg.train.seed)
    net = ckpt.build_denoiser(cfg).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    return TrainState(net=net, optimizer=optimizer, ema=PowerFunctionEMA(net, stds=cfg.ema.stds))


@pytest.mark.parametrize("nimg, lr", [(0, 0.01 * 8 / 64), (56, 0.01), (7992, 0.01 / 2)])  # tiny: warm-up 64 images, t_ref 2000
def test_train_step_is_one_adam_step_on_the_eq21_gradient(cfg, nimg, lr):
    """One step from a fresh Adam, checked against a hand-written EDM2 Eq. 21 loss on the step's sigma and noise:
    loss = lambda(sigma) ||D - y||^2 / e^u + u, lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (a loss written
    without the + u drives u up and the network's weight e^-u down: twenty steps do not show it, this does); the
    gradient left in .grad; the lr of the schedule at the image count after the step (EDM2 Eq. 67: warm-up, then
    1/sqrt decay); Adam's first update -lr g / (|g| + eps); and the EMA, whose first update of a run copies the
    post-step weights, not the pre-step ones."""
    cfg = cfg.override("train", batch=8)
    state = fresh_state(cfg)
    state.nimg, state.step = nimg, nimg // 8
    y = images_to_float(load_dataset("mnist5k").images[:8])
    ref = copy.deepcopy(state.net)  # the same forward (forced weight normalization included) by hand
    sigma, noise, *_ = step_noise(make_loss(cfg), cfg, state.step, Shard(batch=8, size=8), y, None)
    D, u = ref(y + sigma.view(-1, 1, 1, 1) * noise, sigma, return_logvar=True)
    sd2 = cfg.network.sigma_data**2
    weighted = ((sigma**2 + sd2) / (sigma**2 * sd2)).view(-1, 1, 1, 1) * (D - y) ** 2
    mse = weighted.mean(dim=(1, 2, 3))
    loss = (mse / u.flatten().exp() + u.flatten()).mean()
    loss.backward()

    stats = train_step(state, make_loss(cfg), cfg, y, None)
    assert stats["lr"] == pytest.approx(lr, rel=1e-12) and state.optimizer.param_groups[0]["lr"] == stats["lr"]
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5) and stats["mse"] == pytest.approx(mse.mean().item(), rel=1e-5)
    assert (state.nimg, state.step) == (nimg + 8, nimg // 8 + 1)
    eps = cfg.optim.eps
    for (name, p), q in zip(state.net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
        expected = q.detach() - lr * q.grad / (q.grad.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=lr * 1e-3, msg=name)
    assert state.net.state_dict()["logvar_linear.weight"].sub(ref.state_dict()["logvar_linear.weight"]).abs().max() > lr / 2  # u moved
    if nimg == 0:  # the EMA's first update (beta = (1 - batch / nimg)^(gamma + 1) = 0) is a copy of the post-step weights
        for i in range(len(cfg.ema.stds)):
            assert all(torch.equal(v, state.net.state_dict()[k]) for k, v in state.ema.averaged(i).items())


def test_dropout_masks_are_new_each_step_and_reproducible(cfg, monkeypatch):
    """Dropout draws from the global RNG seeded by (seed, step, micro-batch) before each forward: step 1 drops other
    units than step 0, and step 0 of a fresh run drops the same ones whatever ran before."""
    masks = []
    real_dropout = F.dropout

    def spy(x, *args, **kwargs):
        out = real_dropout(x, *args, **kwargs)
        masks.append(out.ne(0) | x.eq(0))
        return out

    monkeypatch.setattr(F, "dropout", spy)
    cfg = cfg.override("network", dropout=0.5).override("train", batch=4)
    y = images_to_float(load_dataset("mnist5k").images[:4])
    state = fresh_state(cfg)
    train_step(state, make_loss(cfg), cfg, y, None)
    first = list(masks)
    masks.clear()
    train_step(state, make_loss(cfg), cfg, y, None)
    second = list(masks)
    masks.clear()
    again = fresh_state(cfg)
    torch.rand(100)  # the global RNG moves on
    train_step(again, make_loss(cfg), cfg, y, None)
    assert first and len(first) == len(second) == len(masks)
    assert all(torch.equal(a, b) for a, b in zip(first, masks))
    assert not any(torch.equal(a, b) for a, b in zip(first, second))


# --- training states and snapshots ----------------------------------------------------------------------------------


def test_state_round_trip_restores_every_part(tmp_path, cfg):
    """to_dict -> file -> load_dict restores weights, Adam moments, EMAs, counters, totals, the global RNG and the fp16
    loss scale, into a fresh state: a part left out would make a resumed run drift from an uninterrupted one."""
    cfg = cfg.override("train", batch=4)
    a = fresh_state(cfg)
    a.scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10)
    y = images_to_float(load_dataset("mnist5k").images[:4])
    for _ in range(2):
        train_step(a, make_loss(cfg), cfg, y, None)
    a.totals["train_sec"] = 12.5
    a.scaler.update(new_scale=123.0)
    torch.manual_seed(77)
    rng = torch.get_rng_state()
    save_training_state(a, cfg, tmp_path)
    torch.manual_seed(0)
    b = fresh_state(cfg)
    b.scaler = torch.amp.GradScaler("cpu", enabled=True)
    resume(b, tmp_path, log=lambda s: None)
    assert (b.nimg, b.step, b.totals) == (8, 2, a.totals)
    assert torch.equal(torch.get_rng_state(), rng)
    assert b.scaler.get_scale() == 123.0
    assert all(torch.equal(v, b.net.state_dict()[k]) for k, v in a.net.state_dict().items())
    for i in range(len(cfg.ema.stds)):
        assert all(torch.equal(v, b.ema.averaged(i)[k]) for k, v in a.ema.averaged(i).items())
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert all(torch.equal(v, sb["state"][k][n]) for n, v in sa["state"][k].items())


def test_resume_takes_the_newest_state(tmp_path, cfg):
    """With several states in the run folder, resume loads the newest (an older one would silently redo finished steps)."""
    state = fresh_state(cfg)
    for nimg in (16, 32, 48):
        state.nimg, state.step = nimg, nimg // 16
        with torch.no_grad():
            state.net.logvar_linear.weight.fill_(nimg)
        save_training_state(state, cfg, tmp_path, keep=3)
    lines = []
    fresh = fresh_state(cfg)
    resume(fresh, tmp_path, log=lines.append)
    assert (fresh.nimg, fresh.step) == (48, 3) and bool((fresh.net.logvar_linear.weight == 48).all())
    assert lines == ["resuming from state-000000000048.pt at 48 images"]


def test_snapshots_hold_the_raw_weights_and_each_ema(tmp_path, cfg):
    """save_snapshot writes network-<nimg>-<std>.safetensors for the raw weights (std 0) and each tracked EMA, each
    holding its own weights (an index mix-up would give every profile the same network)."""
    cfg = cfg.override("train", batch=4)
    state = fresh_state(cfg)
    y = images_to_float(load_dataset("mnist5k").images[:4])
    for _ in range(3):
        train_step(state, make_loss(cfg), cfg, y, None)
    save_snapshot(state, cfg, tmp_path)
    expected = {0.0: state.net.state_dict(), **{std: state.ema.averaged(i) for i, std in enumerate(cfg.ema.stds)}}
    assert len(list(tmp_path.glob("network-*.safetensors"))) == len(expected) == 3
    for std, sd in expected.items():
        net, meta = ckpt.load_network(ckpt.network_path(tmp_path, 12, std))
        assert meta["ema_std"] == std and meta["nimg"] == 12
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in sd.items()), std
    assert not torch.equal(expected[0.05]["logvar_linear.weight"], expected[0.1]["logvar_linear.weight"])


# --- --stop-when-flat ----------------------------------------------------------------------------------------------


def test_evaluations_since_best_counts_ties_as_no_improvement():
    assert evaluations_since_best([]) == 0 and evaluations_since_best([3.0]) == 0
    assert evaluations_since_best([5.0, 3.0, 3.0, 4.0]) == 2  # the tie at index 2 is not a new best
    assert evaluations_since_best([5.0, 3.0, 2.9]) == 0
    assert evaluations_since_best([1.0, 3.0, 2.0], higher_is_better=True) == 1
    assert evaluations_since_best([1.0, 3.0, 2.0]) == 2


def test_stop_when_flat_stops_on_the_validation_loss_saves_and_counts_across_resume(tmp_path, cfg, monkeypatch):
    """Scripted validation losses 5, 4, 3, 3.5, 3.2 (every 2 steps) with patience 2 stop the run at the 5th evaluation
    (160 images), with its state saved and a "stop" record; a re-run resumes and stops at its first flat evaluation."""
    from edmkit.training import validation

    script = iter([5.0, 4.0, 3.0, 3.5, 3.2, 3.1])
    calls = []

    def scripted(net, loss_fn, probe, **kw):  # Validator.evaluate asks for the held-out loss, then the training loss
        calls.append(probe)
        return torch.full((len(probe.sigmas),), next(script) if len(calls) % 2 else 1.0, dtype=torch.float64)

    monkeypatch.setattr(validation, "probe_loss", scripted)
    c = cfg.override("train", total_nimg=640, val_fraction=0.1, val_nimg=32, stop_when_flat=2)
    logs = []
    state = train(c, tmp_path / "run", progress=False, log=logs.append)
    assert state.nimg == 160 and "validation loss has not improved for 2 evaluations (best 3 at 96 images" in state.stop_reason
    assert ckpt.list_states(tmp_path / "run")[-1] == ckpt.state_path(tmp_path / "run", 160)
    records = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "stop" and records[-1]["nimg"] == 160 and any("stopped at 160 images" in s for s in logs)
    state = train(c, tmp_path / "run", progress=False, log=logs.append)  # 3.1 at 192 images: still not below 3
    assert state.nimg == 192 and "for 3 evaluations" in state.stop_reason


def test_stop_when_flat_needs_something_to_watch():
    with pytest.raises(ValueError, match="stop-when-flat watches"):
        get_preset("tiny").override("train", stop_when_flat=3)


# --- importance-sampled sigma in training ----------------------------------------------------------------------------


def test_importance_sampled_sigma_resumes_bit_exact_and_accumulates_like_one_batch(tmp_path, cfg):
    """The loss history is part of the training state: a run resumed at 160 images (before most bins have a full history)
    retraces the uninterrupted one, whose history has by then moved the draws off the base density. Gradient accumulation
    writes every row's loss to the same place in the history as one whole batch."""
    c = cfg.override("loss", sigma_sampling="importance")
    straight = train(c, tmp_path / "a", progress=False, log=lambda s: None)
    p = straight.sigma_history.probs()
    assert straight.sigma_history.count.sum() == 320 and p.max() > 1.5 * p.min()
    train(c, tmp_path / "b", stop_nimg=160, progress=False, log=lambda s: None)
    resumed = train(c, tmp_path / "b", progress=False, log=lambda s: None)
    assert torch.equal(resumed.sigma_history.losses, straight.sigma_history.losses)
    for k, v in straight.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
    accumulated = train(c.override("train", batch_per_device=4, total_nimg=64), tmp_path / "c", progress=False, log=lambda s: None)
    whole = train(c.override("train", total_nimg=64), tmp_path / "d", progress=False, log=lambda s: None)
    assert torch.allclose(accumulated.sigma_history.losses, whole.sigma_history.losses, rtol=1e-4, atol=1e-6)
    assert torch.equal(accumulated.sigma_history.count, whole.sigma_history.count)


def test_adaptive_sigma_density_is_fitted_from_u_recorded_and_resumes_bit_exact(tmp_path, cfg):
    """--sigma-sampling adaptive: the bins' probabilities follow e^u(sigma) of the network (non-uniform from the start: u is
    a random function at init), are recorded in stats.jsonl, and depend only on the weights, so resume stays bit-exact."""
    c = cfg.override("loss", sigma_sampling="adaptive").override("train", total_nimg=64, status_nimg=16)
    straight = train(c, tmp_path / "a", progress=False, log=lambda s: None)
    train(c, tmp_path / "b", stop_nimg=32, progress=False, log=lambda s: None)
    resumed = train(c, tmp_path / "b", progress=False, log=lambda s: None)
    for k, v in straight.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
    records = [json.loads(line) for line in (tmp_path / "a" / "stats.jsonl").read_text().splitlines()]
    p = torch.tensor(records[-1]["sigma_bin_probs"])
    assert len(p) == 32 and p.sum().item() == pytest.approx(1, abs=1e-4) and p.max() > 1.2 * p.min()
    assert records[0]["sigma_bin_probs"] != records[-1]["sigma_bin_probs"]  # refitted as u trains
    with pytest.raises(ValueError, match="needs loss.uncertainty"):
        c.override("loss", uncertainty=False)
