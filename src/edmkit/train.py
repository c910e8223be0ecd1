"""The training loop, built from small step functions.

Every random number of step ``k`` comes from generators seeded by ``(seed, k)`` and the data order is
a pure function of ``(seed, position)``, so a resumed run retraces an uninterrupted one bit for bit.

Several processes (``torchrun --nproc_per_node=N -m edmkit train``, see ``dist.py``): the global batch stays the unit
of the data stream and of the noise. Every rank draws the whole global batch's sigma, noise and label dropout from the
step's generator and trains on its rows (``Shard``), DDP averages the gradients, and the losses are scaled so the
gradient is the one-process batch mean: N processes give the one-process weights up to float rounding. The weights,
Adam and the EMAs are updated identically on every rank (the EMA is cheap, and any rank could save); rank 0 alone
writes files and logs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edmkit import checkpoint as ckpt
from edmkit.augment import AUGMENT_DIM, apply_augment, augment_params
from edmkit.cascade import check_sr_config, training_condition
from edmkit import dist
from edmkit.config import ExperimentConfig, config_diff, snapshot_disk_estimate
from edmkit.data import ImageDataset, images_to_float, load_dataset, sample_order, save_image_grid
from edmkit.ema import PowerFunctionEMA
from edmkit.generate import generate_images
from edmkit.logging_sinks import Sink, make_sinks
from edmkit.loss import EDMLoss, make_loss
from edmkit.metrics import evaluate as metrics_eval, reference as metrics_ref
from edmkit.metrics.detectors import Detector, conversion_notice
from edmkit.precond import Denoiser
from edmkit.schedules import learning_rate
from edmkit.validation import Validator, make_validator, split_dataset


# Fields that change only how long or how often things happen, not what the weights become: a resumed run may change them.
RESUMABLE_CHANGES = {"train.total_nimg", "train.status_nimg", "train.grid_nimg", "train.state_nimg", "train.grid_n", "train.sample_steps",
                     "train.val_nimg", "train.val_sigmas", "train.val_patience"}
# ... and how the work is split or run, not what it computes (a run may resume on another number of processes).
RESUMABLE_CHANGES |= {"train.batch_per_device", "train.compile", "train.max_bad_steps", "train.keep_states"}
RESUMABLE_CHANGES |= {"train.sr_aug_sample"}  # cascade SR: the conditioning noise at sampling only
RESUMABLE_CHANGES |= {"ema.snapshot_nimg", "ema.snapshot_dtype", "ema.snapshot_budget_mb"}  # what is saved, not what is trained
RESUMABLE_CHANGES |= {f"train.eval_{k}" for k in ("nimg", "ref", "n", "steps", "detector", "metrics")}  # what is measured, not trained
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> backbone autocast dtype (fp32: none)


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
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))  # fp16 loss scaling
    train_net: torch.nn.Module | None = None  # what forward/backward run through (DDP / autocast / compiled); None: ``net``

    def to_dict(self, cfg: ExperimentConfig) -> dict[str, Any]:
        return {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "config": cfg.to_json(),
                "nimg": self.nimg, "step": self.step, "totals": dict(self.totals), "net": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict(), "torch_rng": torch.get_rng_state(),
                "scaler": self.scaler.state_dict()}

    def load_dict(self, d: dict[str, Any]) -> None:
        self.net.load_state_dict(d["net"], strict=True)
        self.optimizer.load_state_dict(d["optimizer"])
        self.ema.load_state_dict(d["ema"])
        self.nimg, self.step, self.totals = int(d["nimg"]), int(d["step"]), dict(d["totals"])
        torch.set_rng_state(d["torch_rng"])
        if d.get("scaler"):  # empty when saved without fp16 loss scaling
            self.scaler.load_state_dict(d["scaler"])


def step_seed(seed: int, step: int, chunk: int = 0) -> int:
    """Seed of training step ``step`` (and of micro-batch ``chunk`` of its global batch, for the global RNG)."""
    return (seed * 1_000_003 + step + (chunk << 40)) % 2**63


def step_generator(seed: int, step: int, device: torch.device | str) -> torch.Generator:
    """The generator for all noise of one training step: a pure function of (seed, step)."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step))


@dataclass(frozen=True)
class Shard:
    """This process's rows of the global batch, and how they are split into accumulation rounds.

    The global batch of ``batch`` images is cut into ``rounds * world`` micro-batches of ``size`` rows; in round r,
    rank k trains on rows [(r * world + k) * size, ... + size). Every rank draws the noise of the whole global batch
    from the step's generator and keeps its rows, so what is trained on does not depend on the number of processes.
    """

    batch: int     # global batch (images per optimizer step)
    size: int      # micro-batch: images per process per forward/backward
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or self.batch % (self.size * self.world):
            raise ValueError(f"the batch of {self.batch} images cannot be split into micro-batches of {self.size} on {self.world} "
                             f"process(es): it must be a multiple of batch_per_device x processes")

    @property
    def rounds(self) -> int:
        """Micro-batches per process per step (gradient accumulation)."""
        return self.batch // (self.size * self.world)

    def rows(self) -> torch.Tensor:
        """Global-batch rows this rank trains on, round after round: int64 [rounds * size]."""
        return torch.cat([torch.arange(self.size) + (r * self.world + self.rank) * self.size for r in range(self.rounds)])


def make_shard(cfg: ExperimentConfig, *, rank: int, world: int) -> Shard:
    """The Shard of ``rank`` of ``world``: micro-batches of ``train.batch_per_device`` (0: batch / world, no accumulation)."""
    t = cfg.train
    if not t.batch_per_device and t.batch % world:
        raise ValueError(f"--batch {t.batch} cannot be split evenly over {world} processes; use a multiple of {world}")
    return Shard(batch=t.batch, size=t.batch_per_device or t.batch // world, rank=rank, world=world)


def make_batch(data: ImageDataset, cfg: ExperimentConfig, nimg: int, device: torch.device | str,
               *, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images [B, C, H, W] in [-1, 1] and one-hot labels [B, L] (or None) for stream position ``nimg``
    (only the global-batch ``rows`` given, in their order: one process's shard)."""
    idx = sample_order(num_items=len(data), seed=cfg.train.seed, start=nimg, count=cfg.train.batch)
    idx = idx if rows is None else idx[rows]
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
    return labels * label_keep_mask(labels.shape[0], p_uncond=p_uncond, generator=generator, device=labels.device)[:, None].to(labels.dtype)


def label_keep_mask(n: int, *, p_uncond: float, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n] bool: which label rows survive label dropout (u >= p_uncond, u ~ U[0, 1))."""
    return torch.rand(n, generator=generator, device=device) >= p_uncond


def step_noise(loss_fn: EDMLoss, cfg: ExperimentConfig, step: int, shard: Shard, y: torch.Tensor,
               labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sigma [n], unit noise [n, C, H, W] and dropped-out labels [n, L] for this rank's rows ``y`` [n, C, H, W].

    Drawn for the whole global batch from the step's generator, then this rank's rows are kept: the same numbers
    whatever the number of processes or accumulation rounds.
    """
    g = step_generator(cfg.train.seed, step, y.device)
    rows = shard.rows().to(y.device)
    sigma = loss_fn.sample_sigma(shard.batch, generator=g, device=y.device)[rows]
    noise = torch.randn((shard.batch, *y.shape[1:]), generator=g, device=y.device)[rows]
    if labels is not None and cfg.loss.p_uncond > 0:  # drawn after sigma and noise: runs without dropout are unchanged
        keep = label_keep_mask(shard.batch, p_uncond=cfg.loss.p_uncond, generator=g, device=y.device)[rows]
        labels = labels * keep[:, None].to(labels.dtype)
    return sigma, noise, labels


AUGMENT_CHUNK = 2**22 - 1  # step_seed chunk of the augmentation generator: far above any micro-batch index


def step_augment(cfg: ExperimentConfig, step: int, shard: Shard, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Non-leaky augmentation of this rank's rows ``y`` [n, C, H, W] (EDM App. C): (augmented y, augment labels [n, A]).

    The parameters are drawn for the whole global batch from their own generator of (seed, step), so the sigma, noise
    and label-dropout draws are the same with or without augmentation and resume stays exact. p = 0: (y, None).
    """
    if cfg.train.augment_p <= 0:
        return y, None
    g = torch.Generator(device=y.device).manual_seed(step_seed(cfg.train.seed, step, AUGMENT_CHUNK))
    params = augment_params(shard.batch, p=cfg.train.augment_p, generator=g, device=y.device, resolution=y.shape[-1])
    params = params[shard.rows().to(y.device)]
    return apply_augment(y, params), params


SR_CHUNK = AUGMENT_CHUNK - 1  # step_seed chunk of the cascade SR generator (noise-conditioning augmentation)


def step_sr_condition(cfg: ExperimentConfig, step: int, shard: Shard, y: torch.Tensor,
                      augment_labels: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Cascade SR (``train.task == "sr"``): the noise-augmented low-res conditioning image [n, C, H, W] of this rank's rows
    ``y`` and the augment labels with the sigma_aug column appended (``cascade.training_condition``), from their own generator
    of (seed, step) so the other draws are unchanged and resume stays exact. Task generate: (None, augment_labels)."""
    if cfg.train.task != "sr":
        return None, augment_labels
    g = torch.Generator(device=y.device).manual_seed(step_seed(cfg.train.seed, step, SR_CHUNK))
    return training_condition(y, scale=cfg.train.sr_scale, sigma_max=cfg.train.sr_aug_max, generator=g, batch=shard.batch,
                              rows=shard.rows().to(y.device), augment_labels=augment_labels)


def train_step(state: TrainState, loss_fn: EDMLoss, cfg: ExperimentConfig, y: torch.Tensor, labels: torch.Tensor | None,
               *, shard: Shard | None = None) -> dict[str, float]:
    """One optimizer step on this rank's rows ``y`` of the global batch (``shard``; default: ``y`` is the whole batch):
    noise, loss and backward over the accumulation rounds, Adam with the scheduled lr, EMA update. A step whose loss or
    gradient is not finite is skipped (no Adam or EMA update) and counted in ``totals["skipped_steps"]``."""
    shard = shard or Shard(batch=y.shape[0], size=y.shape[0])
    sigma, noise, labels = step_noise(loss_fn, cfg, state.step, shard, y, labels)
    y, augment_labels = step_augment(cfg, state.step, shard, y)
    cond, augment_labels = step_sr_condition(cfg, state.step, shard, y, augment_labels)
    lr = learning_rate(state.nimg + shard.batch, lr=cfg.optim.lr, ref_nimg=cfg.optim.lr_ref_nimg, warmup_nimg=cfg.optim.warmup_nimg)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    sums = accumulate_gradients(state, loss_fn, cfg, shard, y, labels, sigma=sigma, noise=noise, augment_labels=augment_labels, cond=cond)  # [2]: loss, mse summed over the batch
    state.scaler.unscale_(state.optimizer)  # fp16: the true gradients, before the norm, clipping and the finiteness check
    grad_norm = clip_grad_norm(state.net, max_norm=cfg.optim.grad_clip)
    applied = apply_update(state, finite=math.isfinite(grad_norm) and bool(sums.isfinite().all()))
    state.nimg += shard.batch
    state.step += 1
    if applied:
        state.ema.update(cur_nimg=state.nimg, batch_nimg=shard.batch)
    loss, mse = (sums / shard.batch).tolist()
    return {"loss": loss, "mse": mse, "lr": lr, "grad_norm": grad_norm}


def accumulate_gradients(state: TrainState, loss_fn: EDMLoss, cfg: ExperimentConfig, shard: Shard, y: torch.Tensor,
                         labels: torch.Tensor | None, *, sigma: torch.Tensor, noise: torch.Tensor,
                         augment_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches, leaving in ``.grad`` the gradient of the global batch's mean loss.

    Each micro-batch's loss is summed and scaled by world / batch: DDP averages over the world, so the gradients add up
    to exactly the one-process mean. DDP's all-reduce runs only with the last micro-batch (``dist.ddp_sync``).

    Returns:
        [2] float32: (loss, weighted MSE) summed over the whole global batch (all ranks).
    """
    model = state.train_net or state.net
    sums = torch.zeros(2, device=y.device)
    state.optimizer.zero_grad(set_to_none=True)
    for r in range(shard.rounds):
        part = slice(r * shard.size, (r + 1) * shard.size)
        torch.manual_seed(step_seed(cfg.train.seed, state.step, r * shard.world + shard.rank))  # dropout: per micro-batch
        with dist.ddp_sync(model, sync=r == shard.rounds - 1):
            extra = {k: v[part] for k, v in (("augment_labels", augment_labels), ("cond", cond)) if v is not None}
            net = functools.partial(model, **extra) if extra else model
            loss, mse = loss_fn(net, y[part], None if labels is None else labels[part], sigma=sigma[part], noise=noise[part])
            state.scaler.scale(loss.sum() * (shard.world / shard.batch)).backward()
        sums += torch.stack([loss.detach().sum(), mse.sum()])
    return dist.all_reduce_sum(sums)


def apply_update(state: TrainState, *, finite: bool) -> bool:
    """Adam step (through the fp16 loss scaler) if ``finite``, else skip it; counts skips. Returns whether it was applied."""
    if finite:
        state.scaler.step(state.optimizer)
    state.scaler.update()  # fp16: a skipped step lowers the loss scale
    state.totals["skipped_steps"] = state.totals.get("skipped_steps", 0) + (not finite)
    state.totals["bad_streak"] = 0 if finite else state.totals.get("bad_streak", 0) + 1
    return finite


def clip_grad_norm(net: torch.nn.Module, *, max_norm: float) -> float:
    """Global L2 norm ||g|| of all gradients, before clipping; with ``max_norm`` > 0, scale them by min(1, max_norm / ||g||).

    Clipping is off by default (``max_norm = 0``), as in EDM, where it did not help; DDPM-style recipes use it.
    """
    params = [p for p in net.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total.item()


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


def save_training_state(state: TrainState, cfg: ExperimentConfig, run_dir: Path, *, keep: int | None = None) -> None:
    """Write a new state, then delete all but the ``keep`` (default ``train.keep_states``) newest, never before the new one
    is complete: a failed write (full disk) raises and leaves the older states and no partial file."""
    keep = cfg.train.keep_states if keep is None else keep
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


def dataset_of(cfg: ExperimentConfig, source: str | None = None) -> ImageDataset:
    """The images a config trains on (or ``source`` prepared the same way): resolution, channels, classes, crop."""
    n, t = cfg.network, cfg.train
    return load_dataset(source or t.data, resolution=n.resolution, channels=n.channels, classes=t.classes or None, center_crop=t.center_crop)


def load_training_data(cfg: ExperimentConfig) -> ImageDataset:
    n = cfg.network
    data = dataset_of(cfg)
    if n.label_dim and (data.labels is None or data.num_classes > n.label_dim):
        raise RunError(f"network has {n.label_dim} classes but the data has {data.num_classes or 'no'} labels")
    if cfg.loss.p_uncond > 0 and not n.label_dim:
        raise RunError(f"p_uncond = {cfg.loss.p_uncond} needs a class-conditional network (label_dim > 0)")
    if cfg.train.augment_p > 0 and cfg.train.task != "sr" and n.augment_dim != AUGMENT_DIM:  # sr: check_sr_config
        raise RunError(f"augment_p = {cfg.train.augment_p} needs augment conditioning: network.augment_dim = {AUGMENT_DIM} (got {n.augment_dim})")
    try:
        check_sr_config(cfg)
    except ValueError as e:
        raise RunError(str(e)) from None
    return data


def train(cfg: ExperimentConfig, run_dir: str | Path, *, device: torch.device | str = "cpu", stop_nimg: int | None = None,
          force: bool = False, progress: bool = True, log: Callable[[str], None] = print, loggers: Sequence[str] = ()) -> TrainState:
    """Train (or resume) the run in ``run_dir`` up to ``cfg.train.total_nimg`` (or ``stop_nimg``, for tests).

    ``loggers``: optional dashboards fed with the stats records, ``"tensorboard"`` and/or ``"wandb"``.
    """
    run_dir = Path(run_dir)
    device = dist.init(device)  # under torchrun: join the process group (gloo / nccl); a no-op in one process
    log = log if dist.is_main() else lambda s: None
    shard = make_shard(cfg, rank=dist.rank(), world=dist.world_size())
    evaluator = make_evaluator(cfg, device=device, log=log)  # before the run folder is touched: a bad file leaves it as it was
    prepare_run_dir_on_main(run_dir, cfg, force=force)
    data, val_data = split_dataset(load_training_data(cfg), fraction=cfg.train.val_fraction, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    net = ckpt.build_denoiser(cfg).to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    end_nimg = min(stop_nimg or cfg.train.total_nimg, cfg.train.total_nimg)
    check_snapshot_budget(cfg, net, end_nimg=end_nimg, log=log)  # before anything is opened or resumed
    state = TrainState(net=net, optimizer=optimizer, ema=PowerFunctionEMA(net, stds=cfg.ema.stds),
                       scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16"))
    resume(state, run_dir, log)
    state.train_net = wrap_for_training(net, cfg, device)
    loss_fn = make_loss(cfg)  # the formulation's loss (EDM / DDPM / flow), uncertainty-weighted per config
    monitor = make_monitor(cfg, run_dir, state, data, val_data, loss_fn, loggers=loggers, device=device, log=log) if dist.is_main() else Monitor()
    monitor.evaluator = evaluator  # on every rank: each samples its slice of the evaluation seeds
    n_params = sum(p.numel() for p in net.parameters())
    log(f"{n_params / 1e6:.2f}M parameters, {len(data)} images {data.resolution}x{data.resolution}x{data.channels} from {data.name}, run folder {run_dir}")
    if shard.world > 1 or shard.rounds > 1 or cfg.train.precision != "fp32":
        log(f"{shard.world} process(es) on {device.type}, {shard.rounds} micro-batch(es) of {shard.size} per process per step of "
            f"{shard.batch} images, backbone in {cfg.train.precision}")

    bar = tqdm(total=end_nimg, initial=state.nimg, unit="img", unit_scale=True, disable=not progress or not dist.is_main(), dynamic_ncols=True, desc="train")
    with StopRequest() as stop:
        try:
            training_loop(state, cfg, data, loss_fn, run_dir, end_nimg=end_nimg, device=device, bar=bar, stop=stop, monitor=monitor, shard=shard)
        finally:
            bar.close()
            monitor.close()
        if stop.requested():  # SIGINT / SIGTERM (on any rank): the step finished, its state is saved; re-running resumes
            if dist.is_main():
                save_training_state(state, cfg, run_dir)
            log(f"stopped by signal {stop.signum}: state saved at {state.nimg} images in {run_dir}")
            dist.barrier()  # no rank exits (and makes torchrun stop the others) before the state is written
            raise KeyboardInterrupt
    dist.barrier()
    return state


def check_snapshot_budget(cfg: ExperimentConfig, net: Denoiser, *, end_nimg: int, log: Callable[[str], None]) -> None:
    """Log the expected EMA-snapshot disk use; RunError when it exceeds ``ema.snapshot_budget_mb`` (0 = no limit)."""
    n_params = sum(v.numel() for v in net.state_dict().values() if v.is_floating_point())
    n_files, n_bytes = snapshot_disk_estimate(n_params=n_params, n_stds=len(cfg.ema.stds), snapshot_nimg=cfg.ema.snapshot_nimg,
                                              total_nimg=end_nimg, dtype=cfg.ema.snapshot_dtype)
    log(f"EMA snapshots: {n_files} files, ~{n_bytes / 1e6:.1f} MB ({cfg.ema.snapshot_dtype}, every {cfg.ema.snapshot_nimg} images)")
    budget_mb = cfg.ema.snapshot_budget_mb
    if budget_mb and n_bytes / 1e6 > budget_mb:
        raise RunError(f"EMA snapshots would take ~{n_bytes / 1e6:.0f} MB, over the {budget_mb:g} MB budget: snapshot less often "
                       f"(ema.snapshot_nimg, now {cfg.ema.snapshot_nimg}), store float16, or raise the budget")


def prepare_run_dir_on_main(run_dir: Path, cfg: ExperimentConfig, *, force: bool = False) -> None:
    """``prepare_run_dir`` on rank 0 only; its RunError is raised on every rank (none is left waiting)."""
    error = None
    if dist.is_main():
        try:
            prepare_run_dir(run_dir, cfg, force=force)
        except RunError as e:
            error = str(e)
    error = dist.broadcast_from_main(error)
    if error is not None:
        raise RunError(error)


def wrap_for_training(net: Denoiser, cfg: ExperimentConfig, device: torch.device) -> torch.nn.Module:
    """The module forward and backward run through: ``net`` with its backbone under autocast (``train.precision``) and
    optionally compiled, in DDP when several processes run. ``net`` itself stays the module that is saved and averaged:
    its state-dict keys never gain ``module.`` or ``_orig_mod.`` prefixes (compile works in place, autocast wraps a method).
    """
    if cfg.train.precision != "fp32":
        autocast_backbone(net, dtype=AUTOCAST_DTYPES[cfg.train.precision], device_type=device.type)
    if cfg.train.compile:
        net.net.compile()  # nn.Module.compile: in place, same parameters and keys
    # without the uncertainty head u(sigma) (EDM2 Eq. 21) its parameters get no gradient, which DDP must be told
    return dist.wrap_ddp(net, device, find_unused_parameters=not cfg.loss.uncertainty)


def autocast_backbone(net: Denoiser, *, dtype: torch.dtype, device_type: str) -> None:
    """Run the backbone F of ``net`` under autocast to ``dtype``; preconditioning, the uncertainty head and the loss stay
    float32 (``Denoiser.forward`` upcasts F's output; MP norms compute in float32).

    Side effect, on purpose: the backbone instance's ``forward`` is replaced by an autocast-wrapped one (no wrapper
    module, so saved keys are unchanged). Sampling with this same module also runs F in ``dtype``.
    """
    net.net.forward = torch.autocast(device_type=device_type, dtype=dtype)(net.net.forward)


def check_bad_streak(state: TrainState, cfg: ExperimentConfig, run_dir: Path) -> None:
    """Stop (RunError) after ``train.max_bad_steps`` skipped steps in a row; skipped steps change no weights, so the
    newest state in the run folder is a good one to resume from (with a lower lr or another precision)."""
    streak = int(state.totals.get("bad_streak", 0))
    if streak >= cfg.train.max_bad_steps:
        raise RunError(f"training diverged: {streak} steps in a row had a non-finite loss or gradient (last at {state.nimg} images; "
                       f"each was skipped). The newest state in {run_dir} is the last good one: resume from it with a lower --lr "
                       f"(or --precision fp32 after bf16/fp16) and --force")


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

    def requested(self) -> bool:
        """Whether a stop was asked on any rank: a collective, so every rank takes the same branch."""
        return dist.any_rank(self.signum is not None)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def training_loop(state: TrainState, cfg: ExperimentConfig, data: ImageDataset, loss_fn: EDMLoss, run_dir: Path, *,
                  end_nimg: int, device: torch.device | str, bar: tqdm, stop: StopRequest, monitor: Monitor | None = None,
                  shard: Shard | None = None) -> None:
    """Steps until ``end_nimg``, with the periodic stats line, validation loss, snapshots, grids and states (rank 0 writes them)."""
    monitor = Monitor() if monitor is None else monitor
    shard = shard or make_shard(cfg, rank=dist.rank(), world=dist.world_size())
    main = dist.is_main()
    window: list[dict[str, float]] = []
    tick = time.perf_counter()
    while state.nimg < end_nimg and not stop.requested():
        prev = state.nimg
        y, labels = make_batch(data, cfg, state.nimg, device, rows=shard.rows())
        window.append(train_step(state, loss_fn, cfg, y, labels, shard=shard))
        check_bad_streak(state, cfg, run_dir)
        bar.update(state.nimg - prev)
        bar.set_postfix(loss=f"{window[-1]['mse']:.4f}", refresh=False)
        now = time.perf_counter()
        state.totals["train_sec"] += now - tick
        done = state.nimg >= end_nimg
        if main and monitor.validator is not None and (due(prev, state.nimg, cfg.train.val_nimg) or done):
            write_validation(state, cfg, run_dir, monitor)
        if monitor.evaluator is not None and (due(prev, state.nimg, cfg.train.eval_nimg) or done):  # a collective: all ranks
            write_evaluation(state, cfg, run_dir, monitor)
        if due(prev, state.nimg, cfg.train.status_nimg) or done:
            if main:
                write_stats(run_dir, state, window, sinks=monitor.sinks)
            window = []
        if main and (due(prev, state.nimg, cfg.ema.snapshot_nimg) or done):
            save_snapshot(state, cfg, run_dir)
        if main and (due(prev, state.nimg, cfg.train.grid_nimg) or done):
            save_grid(state, cfg, run_dir)
        if main and (due(prev, state.nimg, cfg.train.state_nimg) or done):
            save_training_state(state, cfg, run_dir)
        tick = time.perf_counter()  # I/O above does not count as training time


def write_stats(run_dir: Path, state: TrainState, window: list[dict[str, float]], *, sinks: Sequence[Sink] = ()) -> None:
    """Append one ``"train"`` record: image count, means over the window (loss, weighted MSE, lr, gradient norm), throughput, EMA profile."""
    if not window:
        return
    def finite(k: str) -> list[float]:  # skipped steps (non-finite loss or gradient) are counted, not averaged
        return [w[k] for w in window if math.isfinite(w[k])]

    rec = {"kind": "train", "nimg": state.nimg, "step": state.step, "train_sec": round(state.totals["train_sec"], 3),
           **{k: sum(finite(k)) / len(finite(k)) if finite(k) else math.nan for k in window[0]}}
    rec["img_per_sec"] = state.nimg / max(state.totals["train_sec"], 1e-9)
    rec["skipped_steps"] = int(state.totals.get("skipped_steps", 0))  # since the start of the run
    if "grad_norm" in rec:
        rec["grad_norm_max"] = max(finite("grad_norm"), default=math.nan)
    if not all(math.isfinite(v) for v in rec.values() if isinstance(v, float)):
        warnings.warn(f"non-finite training statistics at {state.nimg} images: {rec}")
    rec["ema_std"] = list(state.ema.stds)  # the tracked power-function EMA profiles (sigma_rel)
    append_record(run_dir, rec, sinks)


def append_record(run_dir: Path, rec: dict[str, Any], sinks: Sequence[Sink] = ()) -> None:
    """One line of ``stats.jsonl`` (strict JSON: a non-finite number is written as null), and the same record to every sink."""
    def strict(v: Any) -> Any:
        if isinstance(v, list):
            return [strict(x) for x in v]
        return None if isinstance(v, float) and not math.isfinite(v) else v

    with open(run_dir / "stats.jsonl", "a") as f:
        f.write(json.dumps({k: strict(v) for k, v in rec.items()}, allow_nan=False) + "\n")
    for sink in sinks:
        sink.write(rec)


@dataclass
class Monitor:
    """Where records go besides ``stats.jsonl`` (optional dashboards), and the periodic validation loss (None: no held-out split)."""

    sinks: list[Sink] = field(default_factory=list)
    validator: Validator | None = None
    log: Callable[[str], None] = print
    evaluator: Evaluator | None = None  # in-training FID / KID (``train.eval_nimg``), None: off

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def make_monitor(cfg: ExperimentConfig, run_dir: Path, state: TrainState, train_data: ImageDataset, val_data: ImageDataset | None,
                 loss_fn: EDMLoss, *, loggers: Sequence[str], device: torch.device | str, log: Callable[[str], None]) -> Monitor:
    """Open the dashboards asked for and, with a held-out split, the validator (its history read back from ``stats.jsonl``)."""
    sinks = make_sinks(loggers, run_dir=run_dir, config=cfg.to_dict())
    validator = None
    if val_data is not None:
        history = read_val_history(run_dir, up_to_nimg=state.nimg)
        validator = make_validator(cfg, train_data, val_data, loss_fn, device=device, history=history)
        log(f"validation: {len(val_data)} held-out images (never trained on), loss every {cfg.train.val_nimg} images at {cfg.train.val_sigmas} noise levels")
    return Monitor(sinks, validator, log)


def read_val_history(run_dir: Path, *, up_to_nimg: int) -> list[tuple[float, float]]:
    """(validation, training) losses of the ``"val"`` records at or before ``up_to_nimg``, oldest first (the last per image count)."""
    path, by_nimg = run_dir / "stats.jsonl", {}
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if rec.get("kind") == "val" and rec["nimg"] <= up_to_nimg and rec["loss"] is not None and rec["train_loss"] is not None:
            by_nimg[rec["nimg"]] = (rec["loss"], rec["train_loss"])
    return [by_nimg[k] for k in sorted(by_nimg)]


def write_validation(state: TrainState, cfg: ExperimentConfig, run_dir: Path, monitor: Monitor) -> None:
    """Validation loss of the raw training weights as a ``"val"`` record; a log line when it signals memorization."""
    rec = {"kind": "val", "nimg": state.nimg, "step": state.step, **monitor.validator.evaluate(state.net)}
    if rec["memorization"]:
        monitor.log(f"warning: at {state.nimg} images the validation loss has risen {cfg.train.val_patience} times in a row while the "
                    f"training loss fell (now {rec['loss']:.4f} held-out vs {rec['train_loss']:.4f} on training images): possible memorization")
    append_record(run_dir, rec, monitor.sinks)


# ---------------------------------------------------------------------------------------------
# In-training evaluation: small-n FID / KID of the sampling EMA through edmkit.metrics (its one implementation).

KID_PR_MIN_FEATURES = 4  # KID and precision / recall need more raw features than the k = 3 of evaluate_generator's pr_k


@dataclass(frozen=True, eq=False)
class Evaluator:
    """The reference and detector of the in-training evaluation, loaded and checked once before training starts."""

    ref: metrics_ref.Reference
    detector: Detector
    metrics: tuple[str, ...]    # of metrics.evaluate.METRICS
    n: int                      # images per evaluation, seeds 0..n-1
    steps: int                  # sampler steps (Heun, Karras sigmas: edmkit generate's defaults)
    batch: int                  # images per sampling / detector batch (does not change the scores)


def make_evaluator(cfg: ExperimentConfig, *, device: torch.device | str, log: Callable[[str], None]) -> Evaluator | None:
    """The evaluator of ``train.eval_*`` (None when ``eval_nimg`` is 0); RunError with one line for a missing or corrupt
    reference, a missing detector or one whose sha256 differs from the reference's. Shape mismatches are logged, as by
    ``edmkit metrics gen`` (the detector's input conversion handles them)."""
    t, c = cfg.train, cfg.network
    if not t.eval_nimg:
        return None
    if t.task != "generate":
        raise RunError("in-training evaluation samples p(y) from noise alone; it is not available for --task sr")
    try:
        ref = metrics_ref.load_reference(t.eval_ref)
        detector = metrics_ref.reference_detector(ref, t.eval_detector or None, device=device, ref_path=t.eval_ref, log=log)
    except ValueError as e:  # DetectorError is a ValueError
        raise RunError(f"in-training evaluation: {e}") from None
    if t.eval_n < dist.world_size():
        raise RunError(f"eval_n = {t.eval_n} images cannot be split over {dist.world_size()} processes: raise --eval-n")
    if {"kid", "pr"} & set(t.eval_metrics) and min(t.eval_n, len(ref.features)) < KID_PR_MIN_FEATURES:
        raise RunError(f"in-training KID / precision-recall need at least {KID_PR_MIN_FEATURES} images and reference features, got eval_n = "
                       f"{t.eval_n} and {len(ref.features)} in {t.eval_ref}: raise --eval-n or use --eval-metrics fid")
    log(f"evaluation: {', '.join(t.eval_metrics)} of {t.eval_n} images (seeds 0-{t.eval_n - 1}, Heun {t.eval_steps} steps, EMA "
        f"{cfg.ema.sample_std:g}) against {t.eval_ref} every {t.eval_nimg} images")
    for line in (conversion_notice(detector.spec, channels=c.channels, resolution=c.resolution),
                 metrics_ref.shape_notice(ref, resolution=c.resolution, channels=c.channels), metrics_eval.sample_size_notice(t.eval_n)):
        if line:
            log(line)
    return Evaluator(ref, detector, tuple(t.eval_metrics), t.eval_n, t.eval_steps, batch=max(t.batch_per_device or t.batch, 64))


def metric_labels(scores: Sequence[str], *, n: int) -> dict[str, str]:
    """Plot labels of scores computed from ``n`` images, telling a small-n estimate from a published-size one."""
    if n >= metrics_eval.PUBLISHED_N:
        return {k: f"{k} (n={n})" for k in scores}
    bias = {"fid": f", biased upward vs {metrics_eval.PUBLISHED_N // 1000}k"}
    return {k: f"{k} (n={n}, small-n estimate{bias.get(k, '')})" for k in scores}


def preserved_rng(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Context restoring the global torch RNG (CPU, and ``device``'s when CUDA) on exit: side work (building a network,
    sampling) then leaves dropout's stream, and so the weights, as they would be without it."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


def write_evaluation(state: TrainState, cfg: ExperimentConfig, run_dir: Path, monitor: Monitor) -> None:
    """Small-n scores of the sampling EMA (the network ``edmkit generate`` takes from the run folder) as a ``"metric"`` record.

    Every rank samples its slice of the seeds 0..n-1 (``evaluate_generator``; rank 0 writes). The global RNG is restored after,
    and eval mode leaves the weights alone, so a run gives the same weights with and without evaluation.
    """
    e = monitor.evaluator
    device = next(state.net.parameters()).device
    start = time.perf_counter()
    with preserved_rng(device):
        net = sampling_net(state, cfg)
        was_training = net.training
        net.eval()
        try:
            n = cfg.network
            result = metrics_eval.evaluate_generator(net, ref=e.ref, detector=e.detector, seeds=list(range(e.n)), metrics=e.metrics, batch=e.batch,
                                                     device=device, generate_kw=dict(resolution=n.resolution, channels=n.channels,
                                                                                     label_dim=n.label_dim, steps=e.steps))
        finally:
            net.train(was_training)
    scores = {k: v for k, v in result["repeats"][0].items() if k not in ("seeds", "n")}
    labels = metric_labels([k for k in scores if k not in ("kid_std", "pr_n")], n=e.n)
    rec = {"kind": "metric", "nimg": state.nimg, "step": state.step, "n": e.n, **scores, "labels": labels,
           "label": f"small-n estimate (n={e.n})" if e.n < metrics_eval.PUBLISHED_N else f"n={e.n}",
           "ema_std": cfg.ema.sample_std, "sample_steps": e.steps, "eval_sec": round(time.perf_counter() - start, 3)}
    if dist.is_main():
        append_record(run_dir, rec, monitor.sinks)
