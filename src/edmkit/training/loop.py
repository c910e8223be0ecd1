"""The training loop, built from small step functions.

Every random number of step ``k`` comes from generators seeded by ``(seed, k)`` and the data order is
a pure function of ``(seed, position)``, so a resumed run retraces an uninterrupted one bit for bit.

Several processes (``torchrun --nproc_per_node=N -m edmkit train``, see ``dist.py``): the global batch stays the unit
of the data stream and of the noise. Every rank draws the whole global batch's sigma, noise and label dropout from the
step's generator and trains on its rows (``Shard``), DDP averages the gradients, and the losses are scaled so the
gradient is the one-process batch mean: N processes give the one-process weights up to float rounding. The weights,
Adam and the EMAs are updated identically on every rank (the EMA is cheap, and any rank could save); rank 0 alone
writes files and logs.

The loop's parts live in modules of their own, and their names are re-exported here: ``step_inputs`` (the step's seeded
draws and ``Shard``), ``run_state`` (``TrainState``, the run folder, resume, stop requests) and ``monitor`` (stats records,
validation, in-training evaluation, snapshots and grids).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edmkit import checkpoint as ckpt
from edmkit import dist
from edmkit.config import ExperimentConfig
from edmkit.data.augment import AUGMENT_DIM
from edmkit.data.dataset import ImageDataset, dataset_of, load_dataset, sample_order
from edmkit.data.images import images_to_float
from edmkit.data.latents import LatentDataset
from edmkit.data.videos import joint_segments, random_frames
from edmkit.diffusion.loss import EDMLoss, SigmaLossHistory, make_loss
from edmkit.diffusion.precond import Denoiser
from edmkit.diffusion.schedules import learning_rate
from edmkit.presets import check_sr_config
from edmkit.training import ema_choice
from edmkit.training.ema import PowerFunctionEMA
from edmkit.training.monitor import (
    Evaluator,
    Monitor,
    check_snapshot_budget,
    flat_reason,
    make_evaluator,
    make_monitor,
    rewind_records,
    save_grid,
    save_snapshot,
    watched_score,
    write_evaluation,
    write_stats,
    write_stop,
    write_validation,
)
from edmkit.training.run_state import RunError, StopRequest, TrainState, open_run_folder, resume, save_training_state
from edmkit.training.step_inputs import Shard, make_shard, sigma_bin_probs, step_augment, step_noise, step_seed, step_sr_condition
from edmkit.training.validation import split_dataset

# make_batch, make_loss and make_monitor are called from this module through its own globals, so replacing
# ``edmkit.training.<name>`` (as tests do) changes what train() and training_loop() use.

POSTERIOR_CHUNK = 1 << 20  # step_seed chunk of the latent posterior samples: a stream of its own, apart from the step's noise
IMAGE_FRAMES_CHUNK = POSTERIOR_CHUNK + 1  # step_seed chunk of the appended images of joint image-video training
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> backbone autocast dtype (fp32: none)


def make_batch(data: ImageDataset | LatentDataset, cfg: ExperimentConfig, nimg: int, device: torch.device | str,
               *, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Images [B, C, H, W] in [-1, 1] (clips [B, C, T, H, W], plus ``train.image_frames`` independent images appended as frames
    T..T+K-1 (``data.videos.joint_segments``); or latents: a posterior sample each, drawn for the whole global batch from a
    generator seeded by (seed, nimg)), one-hot labels [B, L] (or None) and context tokens [B, L_ctx, D_ctx] (or None:
    a network without cross-attention) for stream position ``nimg`` (only the global-batch ``rows`` given, in their
    order: one process's shard)."""
    idx = sample_order(num_items=len(data), seed=cfg.train.seed, start=nimg, count=cfg.train.batch)
    if isinstance(data, LatentDataset):
        y = data.float_batch(idx, generator=torch.Generator().manual_seed(step_seed(cfg.train.seed, nimg, chunk=POSTERIOR_CHUNK)))
        y = y if rows is None else y[rows]
    else:
        y = data.float_batch(idx if rows is None else idx[rows])
    idx = idx if rows is None else idx[rows]
    if cfg.train.image_frames:  # joint image-video training: K random images (other clips' frames, or train.image_data) per clip
        g = torch.Generator().manual_seed(step_seed(cfg.train.seed, nimg, chunk=IMAGE_FRAMES_CHUNK))
        K, count = cfg.train.image_frames, cfg.train.batch * cfg.train.image_frames
        pool = data.joint_images
        images = random_frames(data.images, count, generator=g) if pool is None else pool[torch.randint(len(pool), (count,), generator=g)]
        images = images.unflatten(0, (cfg.train.batch, K)).transpose(1, 2)  # [B, C, K, H, W]
        y = torch.cat([y, images_to_float(images if rows is None else images[rows])], dim=2)  # [B, C, T + K, H, W]
    y = y.to(device)
    labels = None
    if cfg.network.label_dim:
        labels = F.one_hot(data.labels[idx], cfg.network.label_dim).to(device=device, dtype=torch.float32)
    context = data.context[idx].to(device) if cfg.network.context_dim else None
    return y, labels, context


def train_step(state: TrainState, loss_fn: EDMLoss, cfg: ExperimentConfig, y: torch.Tensor, labels: torch.Tensor | None,
               *, shard: Shard | None = None, context: torch.Tensor | None = None) -> dict[str, float]:
    """One optimizer step on this rank's rows ``y`` of the global batch (``shard``; default: ``y`` is the whole batch):
    noise, loss and backward over the accumulation rounds, Adam with the scheduled lr, EMA update. A step whose loss or
    gradient is not finite is skipped (no Adam or EMA update) and counted in ``totals["skipped_steps"]``. ``context``
    [n, L, D]: cross-attention tokens of the rows (``p_uncond`` drops them to the null context with the labels)."""
    shard = shard or Shard(batch=y.shape[0], size=y.shape[0])
    state.sigma_probs = sigma_bin_probs(cfg, loss_fn, state.net, state.sigma_history)
    draw = step_noise(loss_fn, cfg, state.step, shard, y, labels, bin_probs=state.sigma_probs, context=context)
    sigma, noise, labels, context = draw.sigma, draw.noise, draw.labels, draw.context
    y, augment_labels = step_augment(cfg, state.step, shard, y)
    cond, augment_labels = step_sr_condition(cfg, state.step, shard, y, augment_labels)
    lr = learning_rate(state.nimg + shard.batch, lr=cfg.optim.lr, ref_nimg=cfg.optim.lr_ref_nimg, warmup_nimg=cfg.optim.warmup_nimg)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    losses = None if state.sigma_history is None else torch.zeros(shard.batch, device=y.device)  # importance: the history's new losses
    segments = joint_segments(cfg.network.frames, cfg.train.image_frames).to(y.device) if cfg.train.image_frames else None
    sums = accumulate_gradients(state, loss_fn, cfg, shard, y, labels, sigma=sigma, noise=noise, augment_labels=augment_labels, cond=cond,
                                context=context, weight=draw.weight, losses=losses, segments=segments)  # [2]: loss, mse summed over the batch
    if state.sigma_history is not None:
        state.sigma_history.update(draw.bins, losses)
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
                         augment_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                         context: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                         losses: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches, leaving in ``.grad`` the gradient of the global batch's mean loss.

    Each micro-batch's loss is summed and scaled by world / batch: DDP averages over the world, so the gradients add up
    to exactly the one-process mean. DDP's all-reduce runs only with the last micro-batch (``dist.ddp_sync``).
    Binned sigma (importance / adaptive): each sample's loss (and logged MSE) is multiplied by its ``weight`` [n]; with
    ``losses`` [batch] (importance) the unweighted per-sample losses of the whole global batch are written there
    (all-reduced: the same on every rank, for the loss history). ``segments`` [T + K]: joint image-video training's ids.

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
            extra = {k: v[part] for k, v in (("augment_labels", augment_labels), ("cond", cond), ("context", context)) if v is not None}
            if segments is not None:
                extra["segments"] = segments  # [T + K], the same for every clip (joint image-video training)
            net = functools.partial(model, **extra) if extra else model
            loss, mse = loss_fn(net, y[part], None if labels is None else labels[part], sigma=sigma[part], noise=noise[part])
            if weight is not None:
                if losses is not None:
                    losses[shard.rows()[part].to(losses.device)] = loss.detach()
                loss, mse = loss * weight[part], mse * weight[part]
            state.scaler.scale(loss.sum() * (shard.world / shard.batch)).backward()
        sums += torch.stack([loss.detach().sum(), mse.sum()])
    if losses is not None:
        dist.all_reduce_sum(losses)
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


def due(prev_nimg: int, nimg: int, every: int) -> bool:
    """True when a multiple of ``every`` lies in (prev_nimg, nimg]."""
    return nimg // every > prev_nimg // every


def flat_due(cfg: ExperimentConfig, prev_nimg: int, nimg: int) -> bool:
    """Whether ``--stop-when-flat`` looks at the records after this step: on, and the watched evaluation just ran."""
    if not cfg.train.stop_when_flat:
        return False
    every = cfg.train.eval_nimg if watched_score(cfg)[0] == "metric" else cfg.train.val_nimg
    return due(prev_nimg, nimg, every)


def load_training_data(cfg: ExperimentConfig) -> ImageDataset:
    n = cfg.network
    data = dataset_of(cfg)
    if n.label_dim and (data.labels is None or data.num_classes > n.label_dim):
        raise RunError(f"network has {n.label_dim} classes but the data has {data.num_classes or 'no'} labels")
    if cfg.loss.p_uncond > 0 and not n.label_dim and not n.context_dim:
        raise RunError(f"p_uncond = {cfg.loss.p_uncond} needs a conditional network (label_dim or context_dim > 0)")
    if n.context_dim and (getattr(data, "context", None) is None or data.context.shape[2] != n.context_dim):
        have = "no" if getattr(data, "context", None) is None else f"width-{data.context.shape[2]}"
        raise RunError(f"network attends to width-{n.context_dim} context tokens, but the data has {have} context (an npz 'context' [N, L, D] or dataset.json \"context\" entries)")
    if cfg.train.augment_p > 0 and cfg.train.task != "sr" and n.augment_dim != AUGMENT_DIM:  # sr: check_sr_config
        raise RunError(f"augment_p = {cfg.train.augment_p} needs augment conditioning: network.augment_dim = {AUGMENT_DIM} (got {n.augment_dim})")
    if n.frames != getattr(data, "frames", 0):
        have = f"clips of {data.frames} frames" if getattr(data, "frames", 0) else "images"
        raise RunError(f"the network takes {f'clips of {n.frames} frames' if n.frames else 'images'}, the data are {have}")
    if cfg.train.image_frames and not n.frames:
        raise RunError("--image-frames appends images to clips: it needs a video network (--arch video-unet, a movingmnist preset)")
    if cfg.train.image_data:
        pool = load_dataset(cfg.train.image_data, resolution=n.resolution, channels=n.channels)
        if pool.images.ndim != 4:
            raise RunError(f"--image-data {cfg.train.image_data}: give images (a folder, zip, npz or mnist5k), not clips")
        data = dataclasses.replace(data, joint_images=pool.images)
    if n.frames and cfg.train.eval_nimg:
        raise RunError("in-training FID / KID scores images; video networks take clips (turn off --eval-every)")
    try:
        check_sr_config(cfg)
    except ValueError as e:
        raise RunError(str(e)) from None
    return data


def train(cfg: ExperimentConfig, run_dir: str | Path, *, device: torch.device | str = "cpu", stop_nimg: int | None = None,
          force: bool = False, progress: bool = True, log: Callable[[str], None] = print, loggers: Sequence[str] = ()) -> TrainState:
    """Train (or resume) the run in ``run_dir`` up to ``cfg.train.total_nimg`` (or ``stop_nimg``, for tests).

    One process at a time writes a run folder (its writer lock, held by rank 0 until the end). ``loggers``: optional
    dashboards fed with the stats records, ``"tensorboard"`` and/or ``"wandb"``.
    """
    run_dir = Path(run_dir)
    device = dist.init(device)  # under torchrun: join the process group (gloo / nccl); a no-op in one process
    log = log if dist.is_main() else lambda s: None
    evaluator = make_evaluator(cfg, device=device, log=log)  # before the run folder is touched: a bad file leaves it as it was
    ema_choice.score_kind(cfg)  # likewise: an EMA choice by FID without a reference
    with open_run_folder(run_dir, cfg, force=force):
        return run_in_folder(cfg, run_dir, device=device, end_nimg=min(stop_nimg or cfg.train.total_nimg, cfg.train.total_nimg),
                             progress=progress, log=log, loggers=loggers, evaluator=evaluator)


def run_in_folder(cfg: ExperimentConfig, run_dir: Path, *, device: torch.device, end_nimg: int, progress: bool, log: Callable[[str], None],
                  loggers: Sequence[str], evaluator: Evaluator | None) -> TrainState:
    """Build, resume and train; the caller holds the run folder (``open_run_folder``)."""
    shard = make_shard(cfg, rank=dist.rank(), world=dist.world_size())
    data, val_data = split_dataset(load_training_data(cfg), fraction=cfg.train.val_fraction, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    net = ckpt.build_denoiser(cfg).to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    check_snapshot_budget(cfg, net, end_nimg=end_nimg, log=log)  # before anything is opened or resumed
    state = TrainState(net=net, optimizer=optimizer, ema=PowerFunctionEMA(net, stds=cfg.ema.stds),
                       scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16"),
                       sigma_history=SigmaLossHistory() if cfg.loss.sigma_sampling == "importance" else None)
    resume(state, run_dir, log)
    if dist.is_main():
        rewind_records(run_dir, up_to_nimg=state.nimg, log=log)  # stats.jsonl as of the resumed state: no records from after it
    state.train_net = wrap_for_training(net, cfg, device)
    loss_fn = make_loss(cfg)  # the formulation's loss (EDM / DDPM / flow), uncertainty-weighted per config
    monitor = make_monitor(cfg, run_dir, state, data, val_data, loss_fn, loggers=loggers, device=device, log=log) if dist.is_main() else Monitor()
    monitor.evaluator = evaluator  # on every rank: each samples its slice of the evaluation seeds
    n_params = sum(p.numel() for p in net.parameters())
    log(f"{n_params / 1e6:.2f}M parameters, {len(data)} {f'clips of {data.frames} frames' if getattr(data, 'frames', 0) else 'images'} {data.resolution}x{data.resolution}x{data.channels} from {data.name}, run folder {run_dir}")
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
            signum = stop.signal_on_any_rank()
            if dist.is_main():
                save_training_state(state, cfg, run_dir)
            log(f"stopped by signal {signum}: state saved at {state.nimg} images in {run_dir}; re-run the same command to resume")
            dist.barrier()  # no rank exits (and makes torchrun stop the others) before the state is written
            if signum != signal.SIGTERM:
                raise KeyboardInterrupt  # Ctrl-C: the command exits 130
            state.stop_signal = signum  # SIGTERM (preemption, a scheduler, kill): a clean return on every rank, exit 0
            return state
    if dist.is_main() and (state.nimg >= cfg.train.total_nimg or state.stop_reason):  # finished: pick the EMA generate samples
        ema_choice.choose_ema(cfg, run_dir, device=device, log=log, progress=progress)
    dist.barrier()
    return state


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
        y, labels, context = make_batch(data, cfg, state.nimg, device, rows=shard.rows())
        window.append(train_step(state, loss_fn, cfg, y, labels, shard=shard, context=context))
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
        if not done and flat_due(cfg, prev, state.nimg):  # rank 0 reads the records; every rank takes its answer
            state.stop_reason = dist.broadcast_from_main(flat_reason(run_dir, cfg, up_to_nimg=state.nimg) if main else None)
            done = state.stop_reason is not None  # the end-of-run saves below, then the loop ends
        if due(prev, state.nimg, cfg.train.status_nimg) or done:
            if main:
                write_stats(run_dir, state, window, sinks=monitor.sinks)
            window = []
        if main and (due(prev, state.nimg, cfg.ema.snapshot_nimg) or done):
            save_snapshot(state, cfg, run_dir)
        if main and (due(prev, state.nimg, cfg.train.grid_nimg) or done):
            save_grid(state, cfg, run_dir, context=data.context if cfg.network.context_dim else None)
        if main and (due(prev, state.nimg, cfg.train.state_nimg) or done):
            save_training_state(state, cfg, run_dir)
        if state.stop_reason is not None:
            if main:
                write_stop(run_dir, state, state.stop_reason, monitor)
            break
        tick = time.perf_counter()  # I/O above does not count as training time
