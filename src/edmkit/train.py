"""The training loop, built from small step functions.

Every random number of step ``k`` comes from generators seeded by ``(seed, k)`` and the data order is
a pure function of ``(seed, position)``, so a resumed run retraces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edmkit import checkpoint as ckpt
from edmkit.config import ExperimentConfig, config_diff, snapshot_disk_estimate
from edmkit.data import ImageDataset, images_to_float, load_dataset, sample_order, save_image_grid
from edmkit.ema import PowerFunctionEMA
from edmkit.generate import generate_images
from edmkit.loss import EDMLoss, make_loss
from edmkit.precond import Denoiser
from edmkit.schedules import learning_rate


# Fields that change only how long or how often things happen, not what the weights become: a resumed run may change them.
RESUMABLE_CHANGES = {"train.total_nimg", "train.status_nimg", "train.grid_nimg", "train.state_nimg", "train.grid_n", "train.sample_steps"}


class RunError(ValueError):
    """A run folder cannot be used as asked (config changed, unwritable, ...)."""


@dataclass
class TrainState:
    """Everything that changes during training; ``to_dict`` is loadable with ``weights_only=True``."""

    net: Denoiser
    optimizer: torch.optim.Optimizer
    ema: PowerFunctionEMA
    nimg: int = 0
    step: int = 0
    totals: dict[str, float] = field(default_factory=lambda: {"train_sec": 0.0})

    def to_dict(self, cfg: ExperimentConfig) -> dict[str, Any]:
        return {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "config": cfg.to_json(),
                "nimg": self.nimg, "step": self.step, "totals": dict(self.totals), "net": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict(), "torch_rng": torch.get_rng_state()}

    def load_dict(self, d: dict[str, Any]) -> None:
        self.net.load_state_dict(d["net"], strict=True)
        self.optimizer.load_state_dict(d["optimizer"])
        self.ema.load_state_dict(d["ema"])
        self.nimg, self.step, self.totals = int(d["nimg"]), int(d["step"]), dict(d["totals"])
        torch.set_rng_state(d["torch_rng"])


def step_generator(seed: int, step: int, device: torch.device | str) -> torch.Generator:
    """The generator for all noise of one training step: a pure function of (seed, step)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def make_batch(data: ImageDataset, cfg: ExperimentConfig, nimg: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images [B, C, H, W] in [-1, 1] and one-hot labels [B, L] (or None) for stream position ``nimg``."""
    idx = sample_order(num_items=len(data), seed=cfg.train.seed, start=nimg, count=cfg.train.batch)
    y = images_to_float(data.images[idx]).to(device)
    labels = None
    if cfg.network.label_dim:
        labels = F.one_hot(data.labels[idx], cfg.network.label_dim).to(device=device, dtype=torch.float32)
    return y, labels


def drop_labels(labels: torch.Tensor, *, p_uncond: float, generator: torch.Generator) -> torch.Tensor:
    """Label dropout for classifier-free guidance (Ho & Salimans 2022): zero each row with probability p_uncond.

    Args:
        labels: [B, L] one-hot labels.
        p_uncond: probability in [0, 1] that a row becomes all zeros (the unconditional label).
        generator: source of the B uniform draws (the step's generator, so resume stays bit-exact).

    Returns:
        [B, L] labels with the dropped rows zeroed.
    """
    keep = torch.rand(labels.shape[0], generator=generator, device=labels.device) >= p_uncond  # [B]; u in [0, 1)
    return labels * keep[:, None].to(labels.dtype)


def train_step(state: TrainState, loss_fn: EDMLoss, cfg: ExperimentConfig, y: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
    """One optimizer step: draw sigma and noise, loss, backward, Adam with the scheduled lr, EMA update."""
    g = step_generator(cfg.train.seed, state.step, y.device)
    torch.manual_seed(cfg.train.seed * 1_000_003 + state.step)  # dropout and any other global-RNG use
    sigma = loss_fn.sample_sigma(y.shape[0], generator=g, device=y.device)
    noise = torch.randn(y.shape, generator=g, device=y.device)
    if labels is not None and cfg.loss.p_uncond > 0:  # drawn after sigma and noise: runs without dropout are unchanged
        labels = drop_labels(labels, p_uncond=cfg.loss.p_uncond, generator=g)
    lr = learning_rate(state.nimg + y.shape[0], lr=cfg.optim.lr, ref_nimg=cfg.optim.lr_ref_nimg, warmup_nimg=cfg.optim.warmup_nimg)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    loss, mse = loss_fn(state.net, y, labels, sigma=sigma, noise=noise)
    state.optimizer.zero_grad(set_to_none=True)
    loss.mean().backward()
    state.optimizer.step()
    state.nimg += y.shape[0]
    state.step += 1
    state.ema.update(cur_nimg=state.nimg, batch_nimg=y.shape[0])
    return {"loss": loss.mean().item(), "mse": mse.mean().item(), "lr": lr}


def prepare_run_dir(run_dir: Path, cfg: ExperimentConfig, *, force: bool = False) -> None:
    """Create the run folder and its config.json; refuse a different config in an existing run unless ``force``."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to run folder {run_dir}: {e.strerror or e}") from None
    cfg_file = run_dir / "config.json"
    if cfg_file.is_file():
        old = ExperimentConfig.from_json(cfg_file.read_text())
        diff = [d for d in config_diff(old, cfg) if d.split(":")[0] not in RESUMABLE_CHANGES]
        if diff and not force:
            raise RunError(f"{run_dir} holds a run with another config ({'; '.join(diff)}); use another --run folder, or --force to continue with the new config")
    ckpt.write_json(cfg_file, cfg.to_dict())


def resume(state: TrainState, run_dir: Path, log: Callable[[str], None]) -> None:
    """Load the newest readable training state; a damaged newest file falls back to the previous one."""
    for path in reversed(ckpt.list_states(run_dir)):
        try:
            state.load_dict(ckpt.load_state(path))
        except ckpt.CheckpointError as e:
            warnings.warn(f"skipping damaged training state: {e}")
            continue
        log(f"resuming from {path.name} at {state.nimg} images")
        return


def save_snapshot(state: TrainState, cfg: ExperimentConfig, run_dir: Path) -> None:
    """Write one network file per tracked EMA profile plus the raw weights, at the current image count (in ``ema.snapshot_dtype``)."""
    dtype = getattr(torch, cfg.ema.snapshot_dtype)

    def stored(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}

    ckpt.save_network(ckpt.network_path(run_dir, state.nimg, 0.0), stored(state.net.state_dict()), cfg=cfg, nimg=state.nimg, ema_std=0.0)
    for i, std in enumerate(state.ema.stds):
        ckpt.save_network(ckpt.network_path(run_dir, state.nimg, std), stored(state.ema.averaged(i)), cfg=cfg, nimg=state.nimg, ema_std=std)


def save_training_state(state: TrainState, cfg: ExperimentConfig, run_dir: Path, *, keep: int = 2) -> None:
    """Write a new state, then delete all but the ``keep`` newest (never before the new one is complete)."""
    ckpt.save_state(ckpt.state_path(run_dir, state.nimg), state.to_dict(cfg))
    for old in ckpt.list_states(run_dir)[:-keep]:
        old.unlink(missing_ok=True)


def sampling_net(state: TrainState, cfg: ExperimentConfig) -> Denoiser:
    """The network grids are drawn with: the EMA named by ``ema.sample_std`` (0: raw weights), in eval mode."""
    if cfg.ema.sample_std == 0:
        return state.net
    net = ckpt.build_denoiser(cfg).to(next(state.net.parameters()).device)
    net.load_state_dict(state.ema.averaged(state.ema.stds.index(cfg.ema.sample_std)))
    return net


def save_grid(state: TrainState, cfg: ExperimentConfig, run_dir: Path) -> Path:
    """Sample ``grid_n`` images with fixed seeds and write ``grid-<nimg>.png``."""
    net = sampling_net(state, cfg)
    was_training = net.training
    net.eval()
    n = cfg.network
    x = generate_images(net, seeds=range(cfg.train.grid_n), resolution=n.resolution, channels=n.channels,
                        label_dim=n.label_dim, steps=cfg.train.sample_steps, device=next(net.parameters()).device)
    net.train(was_training)
    path = run_dir / f"grid-{state.nimg:012d}.png"
    save_image_grid(x, path)
    return path


def due(prev_nimg: int, nimg: int, every: int) -> bool:
    """True when a multiple of ``every`` lies in (prev_nimg, nimg]."""
    return nimg // every > prev_nimg // every


def load_training_data(cfg: ExperimentConfig) -> ImageDataset:
    n = cfg.network
    data = load_dataset(cfg.train.data, resolution=n.resolution, channels=n.channels)
    if n.label_dim and (data.labels is None or data.num_classes > n.label_dim):
        raise RunError(f"network has {n.label_dim} classes but the data has {data.num_classes or 'no'} labels")
    if cfg.loss.p_uncond > 0 and not n.label_dim:
        raise RunError(f"p_uncond = {cfg.loss.p_uncond} needs a class-conditional network (label_dim > 0)")
    return data


def train(cfg: ExperimentConfig, run_dir: str | Path, *, device: torch.device | str = "cpu", stop_nimg: int | None = None,
          force: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> TrainState:
    """Train (or resume) the run in ``run_dir`` up to ``cfg.train.total_nimg`` (or ``stop_nimg``, for tests)."""
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, cfg, force=force)
    data = load_training_data(cfg)
    torch.manual_seed(cfg.train.seed)
    net = ckpt.build_denoiser(cfg).to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    state = TrainState(net=net, optimizer=optimizer, ema=PowerFunctionEMA(net, stds=cfg.ema.stds))
    resume(state, run_dir, log)
    loss_fn = make_loss(cfg)  # the formulation's loss (EDM / DDPM / flow), uncertainty-weighted per config
    end_nimg = min(stop_nimg or cfg.train.total_nimg, cfg.train.total_nimg)
    n_params = sum(p.numel() for p in net.parameters())
    log(f"{n_params / 1e6:.2f}M parameters, {len(data)} images {data.resolution}x{data.resolution}x{data.channels} from {data.name}, run folder {run_dir}")
    n_files, n_bytes = snapshot_disk_estimate(n_params=sum(v.numel() for v in net.state_dict().values() if v.is_floating_point()), n_stds=len(cfg.ema.stds),
                                              snapshot_nimg=cfg.ema.snapshot_nimg, total_nimg=end_nimg, dtype=cfg.ema.snapshot_dtype)
    log(f"EMA snapshots: {n_files} files, ~{n_bytes / 1e6:.1f} MB ({cfg.ema.snapshot_dtype}, every {cfg.ema.snapshot_nimg} images)")

    bar = tqdm(total=end_nimg, initial=state.nimg, unit="img", unit_scale=True, disable=not progress, dynamic_ncols=True, desc="train")
    with StopRequest() as stop:
        try:
            training_loop(state, cfg, data, loss_fn, run_dir, end_nimg=end_nimg, device=device, bar=bar, stop=stop)
        finally:
            bar.close()
        if stop.signum is not None:  # SIGINT / SIGTERM: the step finished, its state is saved; re-running resumes
            save_training_state(state, cfg, run_dir)
            log(f"stopped by signal {stop.signum}: state saved at {state.nimg} images in {run_dir}")
            raise KeyboardInterrupt
    return state


class StopRequest:
    """Turn SIGINT/SIGTERM into a flag checked between steps, so a stop never lands inside a step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def training_loop(state: TrainState, cfg: ExperimentConfig, data: ImageDataset, loss_fn: EDMLoss, run_dir: Path, *,
                  end_nimg: int, device: torch.device | str, bar: tqdm, stop: StopRequest) -> None:
    """Steps until ``end_nimg``, with the periodic stats line, snapshots, grids and states."""
    window: list[dict[str, float]] = []
    tick = time.perf_counter()
    while state.nimg < end_nimg and stop.signum is None:
        prev = state.nimg
        y, labels = make_batch(data, cfg, state.nimg, device)
        window.append(train_step(state, loss_fn, cfg, y, labels))
        bar.update(state.nimg - prev)
        bar.set_postfix(loss=f"{window[-1]['mse']:.4f}", refresh=False)
        now = time.perf_counter()
        state.totals["train_sec"] += now - tick
        done = state.nimg >= end_nimg
        if due(prev, state.nimg, cfg.train.status_nimg) or done:
            write_stats(run_dir, state, window)
            window = []
        if due(prev, state.nimg, cfg.ema.snapshot_nimg) or done:
            save_snapshot(state, cfg, run_dir)
        if due(prev, state.nimg, cfg.train.grid_nimg) or done:
            save_grid(state, cfg, run_dir)
        if due(prev, state.nimg, cfg.train.state_nimg) or done:
            save_training_state(state, cfg, run_dir)
        tick = time.perf_counter()  # I/O above does not count as training time


def write_stats(run_dir: Path, state: TrainState, window: list[dict[str, float]]) -> None:
    """Append one JSON line: image count, mean loss / weighted MSE / lr over the window, throughput."""
    if not window:
        return
    rec = {"nimg": state.nimg, "step": state.step, "train_sec": round(state.totals["train_sec"], 3),
           **{k: sum(w[k] for w in window) / len(window) for k in window[0]}}
    rec["img_per_sec"] = state.nimg / max(state.totals["train_sec"], 1e-9)
    if not all(math.isfinite(v) for v in rec.values()):
        warnings.warn(f"non-finite training statistics at {state.nimg} images: {rec}")
    with open(run_dir / "stats.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
