"""What a run reports while it trains: ``stats.jsonl`` records and dashboards, the validation loss, in-training FID / KID,
EMA snapshots and sample grids.

Records (``append_record``) are one strict-JSON line each in ``stats.jsonl``, of kind ``"train"`` (``write_stats``),
``"val"`` (``write_validation``), ``"metric"`` (``write_evaluation``) or ``"stop"`` (``write_stop``: why
``--stop-when-flat`` ended the run), and go to every dashboard sink as well. None of
this changes the weights: sampling runs in eval mode and the in-training evaluation restores the global RNG.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from edmkit import checkpoint as ckpt
from edmkit import dist
from edmkit.config import ExperimentConfig, snapshot_disk_estimate
from edmkit.data.dataset import ImageDataset
from edmkit.data.images import save_image_grid
from edmkit.data.videos import save_clip_grid_gif, save_clip_strip
from edmkit.diffusion.loss import EDMLoss
from edmkit.diffusion.precond import Denoiser
from edmkit.files import atomic_write
from edmkit.metrics import evaluate as metrics_eval
from edmkit.metrics import reference as metrics_ref
from edmkit.metrics.detectors import Detector
from edmkit.sampling.generate import generate_images
from edmkit.training.logging_sinks import Sink, make_sinks
from edmkit.training.run_state import RunError, TrainState
from edmkit.training.validation import Validator, evaluations_since_best, make_validator


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
    if state.sigma_probs is not None:  # importance / adaptive sigma: the density over the base density's equal-mass bins
        rec["sigma_bin_probs"] = [round(float(p), 6) for p in state.sigma_probs]
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


def read_records(path: Path, *, notice: Callable[[str], None] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every readable line of a ``stats.jsonl``; a line that is not a JSON object (a crash cut it
    short, or it is being written right now) is dropped with a notice, never an exception."""
    out, dropped = [], 0
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            out.append((line, rec))
        elif line.strip():
            dropped += 1
    if dropped and notice is not None:
        notice(f"{path}: dropped {dropped} unreadable line(s) (a write cut short by a crash, or one in progress)")
    return out


def rewind_records(run_dir: Path, *, up_to_nimg: int, log: Callable[[str], None]) -> None:
    """Make ``stats.jsonl`` match a resumed state: drop records from after ``up_to_nimg`` (written before a crash, to be
    written again) and unreadable lines; the file is replaced atomically, and left alone when nothing changes."""
    path = run_dir / "stats.jsonl"
    if not path.is_file():
        return
    records = read_records(path, notice=log)
    kept = [line for line, rec in records if not isinstance(rec.get("nimg"), (int, float)) or rec["nimg"] <= up_to_nimg]
    text = "".join(line + "\n" for line in kept)
    if text != path.read_text():
        if len(kept) < len(records):
            log(f"{path}: dropped {len(records) - len(kept)} record(s) after the resumed state at {up_to_nimg} images")
        atomic_write(path, lambda f: f.write(text.encode()))


def read_val_history(run_dir: Path, *, up_to_nimg: int) -> list[tuple[float, float]]:
    """(validation, training) losses of the ``"val"`` records at or before ``up_to_nimg``, oldest first (the last per image count)."""
    by_nimg = {}
    for _, rec in read_records(run_dir / "stats.jsonl"):
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
    metrics: tuple[str, ...]    # of config.EVAL_METRICS
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
    try:
        metrics_eval.check_metrics(detector, t.eval_metrics, n=t.eval_n)
    except ValueError as e:
        raise RunError(f"in-training evaluation: {e}") from None
    log(f"evaluation: {', '.join(t.eval_metrics)} of {t.eval_n} images (seeds 0-{t.eval_n - 1}, {t.sample_sampler} {t.eval_steps} steps, EMA "
        f"{cfg.ema.sample_std:g}) against {t.eval_ref} every {t.eval_nimg} images")
    for line in metrics_eval.evaluation_notices(ref, detector, n=t.eval_n, resolution=c.resolution, channels=c.channels):
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
                                                                                     label_dim=n.label_dim,
                                                                                     **dict(cfg.train.sampling(), steps=e.steps)))
        finally:
            net.train(was_training)
    scores = {k: v for k, v in result["repeats"][0].items() if k not in ("seeds", "n")}
    labels = metric_labels([k for k in scores if k not in ("kid_std", "is_std", "pr_n")], n=e.n)
    rec = {"kind": "metric", "nimg": state.nimg, "step": state.step, "n": e.n, **scores, "labels": labels,
           "label": f"small-n estimate (n={e.n})" if e.n < metrics_eval.PUBLISHED_N else f"n={e.n}",
           "ema_std": cfg.ema.sample_std, "sample_steps": e.steps, "eval_sec": round(time.perf_counter() - start, 3)}
    if dist.is_main():
        append_record(run_dir, rec, monitor.sinks)


# ---------------------------------------------------------------------------------------------
# Stopping when the watched score is flat (``train.stop_when_flat``).

# first in-training metric -> (its record key, higher is better)
WATCHED_SCORES: dict[str, tuple[str, bool]] = {"fid": ("fid", False), "kid": ("kid", False), "pr": ("recall", True), "is": ("is", True)}


def watched_score(cfg: ExperimentConfig) -> tuple[str, str, bool]:
    """(record kind, key, higher is better) that ``--stop-when-flat`` watches: the first in-training metric, else the validation loss."""
    if cfg.train.eval_nimg:
        return ("metric", *WATCHED_SCORES[cfg.train.eval_metrics[0]])
    return ("val", "loss", False)


def flat_reason(run_dir: Path, cfg: ExperimentConfig, *, up_to_nimg: int) -> str | None:
    """Why the run should stop (None: not yet): the watched score of the ``stats.jsonl`` records up to ``up_to_nimg`` has not
    improved for ``train.stop_when_flat`` evaluations. Read from the file, so a resumed run counts the evaluations before it."""
    kind, key, higher = watched_score(cfg)
    worst = -math.inf if higher else math.inf  # a non-finite score (written as null) is no improvement
    rows = [(rec["nimg"], rec.get(key)) for _, rec in read_records(run_dir / "stats.jsonl") if rec.get("kind") == kind and rec["nimg"] <= up_to_nimg]
    values = [v if isinstance(v, (int, float)) and math.isfinite(v) else worst for _, v in rows]
    since = evaluations_since_best(values, higher_is_better=higher)
    if since < cfg.train.stop_when_flat:
        return None
    best = len(values) - 1 - since
    name = f"in-training {key}" if kind == "metric" else "validation loss"
    return (f"the {name} has not improved for {since} evaluations (best {values[best]:.6g} at {rows[best][0]} images, "
            f"now {values[-1]:.6g}; --stop-when-flat {cfg.train.stop_when_flat})")


def write_stop(run_dir: Path, state: TrainState, reason: str, monitor: Monitor) -> None:
    """A ``"stop"`` record saying why the run ended before ``total_nimg``, and the same as a log line."""
    append_record(run_dir, {"kind": "stop", "nimg": state.nimg, "step": state.step, "reason": reason}, monitor.sinks)
    monitor.log(f"stopped at {state.nimg} images: {reason}. State, snapshots and grid saved in {run_dir}; "
                "re-running the same command (with a longer --stop-when-flat or without it) trains on")


# ---------------------------------------------------------------------------------------------
# Snapshots and sample grids.

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


def save_snapshot(state: TrainState, cfg: ExperimentConfig, run_dir: Path) -> None:
    """Write one network file per tracked EMA profile plus the raw weights, at the current image count (in ``ema.snapshot_dtype``)."""
    dtype = getattr(torch, cfg.ema.snapshot_dtype)

    def stored(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}

    ckpt.save_network(ckpt.network_path(run_dir, state.nimg, 0.0), stored(state.net.state_dict()), cfg=cfg, nimg=state.nimg, ema_std=0.0)
    for i, std in enumerate(state.ema.stds):
        ckpt.save_network(ckpt.network_path(run_dir, state.nimg, std), stored(state.ema.averaged(i)), cfg=cfg, nimg=state.nimg, ema_std=std)


def sampling_net(state: TrainState, cfg: ExperimentConfig) -> Denoiser:
    """The network grids are drawn with: the EMA named by ``ema.sample_std`` (0: raw weights), in eval mode."""
    if cfg.ema.sample_std == 0:
        return state.net
    net = ckpt.build_denoiser(cfg).to(next(state.net.parameters()).device)
    net.load_state_dict(state.ema.averaged(state.ema.stds.index(cfg.ema.sample_std)))
    return net


def save_grid(state: TrainState, cfg: ExperimentConfig, run_dir: Path, *, context: torch.Tensor | None = None) -> Path:
    """Sample ``grid_n`` images with fixed seeds and write ``grid-<nimg>.png``; clips: a row of frames per clip there and
    the clips playing in ``grid-<nimg>.gif``.

    A context run passes the dataset's context [N, L, D]: image i of the grid is conditioned on its row i (the first
    ``grid_n`` rows, repeated when N is smaller), so the grid shows conditioned samples, the same at every image count.
    """
    net = sampling_net(state, cfg)
    was_training = net.training
    net.eval()
    n = cfg.network
    if context is not None:
        context = context[torch.arange(cfg.train.grid_n) % len(context)]  # [grid_n, L, D]
    x = generate_images(net, seeds=range(cfg.train.grid_n), resolution=n.resolution, channels=n.channels,
                        label_dim=n.label_dim, device=next(net.parameters()).device, context=context,
                        frames=n.frames, **cfg.train.sampling())
    net.train(was_training)
    path = run_dir / f"grid-{state.nimg:012d}.png"
    if n.frames:
        save_clip_strip(x, path)
        save_clip_grid_gif(x, path.with_suffix(".gif"))
        return path
    save_image_grid(decoder_of(cfg.train.encoder)(x), path)
    return path


@functools.lru_cache(maxsize=2)
def decoder_of(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents -> images for a run's encoder (``train.encoder``; "" = pixels: the identity), loaded once per run."""
    from edmkit.latent.encoder import encoder_from_spec

    return encoder_from_spec(json.loads(spec) if spec else None).decode
