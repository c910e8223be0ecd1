"""A run's folder and resumable state: the config check on reuse, training-state files, resume, stop requests.

A run folder holds ``config.json``; reusing it with another config is refused (``RunError``) unless the change is one
of ``RESUMABLE_CHANGES`` (how long, how often, how the work is split: not what the weights become) or ``--force``.
``TrainState`` is everything that changes during training; its ``to_dict`` holds only tensors and plain containers,
so states load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from edmkit import checkpoint as ckpt
from edmkit import dist
from edmkit.config import ExperimentConfig, config_diff
from edmkit.diffusion.loss import SigmaLossHistory
from edmkit.diffusion.precond import Denoiser
from edmkit.files import write_json, writer_lock
from edmkit.training.ema import PowerFunctionEMA

# Fields that change only how long or how often things happen, not what the weights become: a resumed run may change them.
RESUMABLE_CHANGES = {"train.total_nimg", "train.status_nimg", "train.grid_nimg", "train.state_nimg", "train.grid_n", "train.sample_steps",
                     "train.val_nimg", "train.val_sigmas", "train.val_patience"}
# ... and how the work is split or run, not what it computes (a run may resume on another number of processes).
RESUMABLE_CHANGES |= {"train.batch_per_device", "train.compile", "train.max_bad_steps", "train.keep_states"}
RESUMABLE_CHANGES |= {"train.stop_when_flat"}  # when to stop, not what a step computes
RESUMABLE_CHANGES |= {"train.sr_aug_sample"}  # cascade SR: the conditioning noise at sampling only
RESUMABLE_CHANGES |= {"ema.snapshot_nimg", "ema.snapshot_dtype", "ema.snapshot_budget_mb"}  # what is saved, not what is trained
RESUMABLE_CHANGES |= {"train.sample_sampler", "train.sample_schedule", "train.sample_eta", "train.sample_churn", "train.sample_churn_sigmas", "train.sample_s_noise"}  # how samples are drawn
RESUMABLE_CHANGES |= {"ema.choose", "ema.choose_stds", "ema.choose_n"}  # which EMA generate samples, chosen after training
RESUMABLE_CHANGES |= {f"train.eval_{k}" for k in ("nimg", "ref", "n", "steps", "detector", "metrics")}  # what is measured, not trained


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
    stop_signal: int | None = None  # set when SIGTERM stopped the run early (its state saved); not part of the saved state
    stop_reason: str | None = None  # set when --stop-when-flat ended the run (its state saved); not part of the saved state
    sigma_history: SigmaLossHistory | None = None  # loss history of importance-sampled sigma (loss.sigma_sampling), else None
    sigma_probs: torch.Tensor | None = None  # [K] sigma-bin probabilities of the last step (importance / adaptive); recorded, not saved

    def to_dict(self, cfg: ExperimentConfig) -> dict[str, Any]:
        return {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "config": cfg.to_json(),
                "nimg": self.nimg, "step": self.step, "totals": dict(self.totals), "net": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict(), "torch_rng": torch.get_rng_state(),
                "scaler": self.scaler.state_dict(), **({"sigma_history": self.sigma_history.state_dict()} if self.sigma_history is not None else {})}

    def load_dict(self, d: dict[str, Any]) -> None:
        self.net.load_state_dict(d["net"], strict=True)
        self.optimizer.load_state_dict(d["optimizer"])
        self.ema.load_state_dict(d["ema"])
        self.nimg, self.step, self.totals = int(d["nimg"]), int(d["step"]), dict(d["totals"])
        torch.set_rng_state(d["torch_rng"])
        if d.get("scaler"):  # empty when saved without fp16 loss scaling
            self.scaler.load_state_dict(d["scaler"])
        if self.sigma_history is not None and "sigma_history" in d:  # absent: a run switched to importance sampling starts afresh
            self.sigma_history.load_state_dict(d["sigma_history"])


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
        try:
            old = ExperimentConfig.from_json(cfg_file.read_text())
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:  # not JSON, or not an edmkit config
            if not force:
                raise RunError(f"{cfg_file}: not an edmkit config ({str(e).splitlines()[0]}); remove it, use another --run folder, "
                               "or pass --force to replace it") from None
            old = cfg
        diff = [d for d in config_diff(old, cfg) if d.split(":")[0] not in RESUMABLE_CHANGES]
        if diff and not force:
            raise RunError(f"{run_dir} holds a run with another config ({'; '.join(diff)}); use another --run folder, or --force to continue with the new config")
    write_json(cfg_file, cfg.to_dict())


def resume(state: TrainState, run_dir: Path, log: Callable[[str], None]) -> None:
    """Load the newest readable training state; a damaged newest file falls back to the previous one.

    Raises:
        RunError: state files are there but none can be read (foreign or damaged): nothing is started over them.
    """
    paths = ckpt.list_states(run_dir)
    for path in reversed(paths):
        try:
            state.load_dict(ckpt.load_state(path))
        except ckpt.CheckpointError as e:
            warnings.warn(f"skipping damaged training state: {e}")
            continue
        log(f"resuming from {path.name} at {state.nimg} images")
        return
    if paths:
        raise RunError(f"{run_dir}: no readable training state among {', '.join(p.name for p in paths)}; move them away to start afresh, "
                       "or use another --run folder")


@contextlib.contextmanager
def open_run_folder(run_dir: Path, cfg: ExperimentConfig, *, force: bool = False) -> Iterator[None]:
    """Hold the run folder for the whole run: rank 0 takes its writer lock (one writer per folder; the OS frees it
    when the process dies) and prepares it (``prepare_run_dir``). A refusal is raised on every rank as ``RunError``."""
    with contextlib.ExitStack() as held:
        error = None
        if dist.is_main():
            try:
                held.enter_context(writer_lock(run_dir, what="run folder"))
                prepare_run_dir(run_dir, cfg, force=force)
            except (RunError, OSError) as e:
                error = str(e)
        error = dist.broadcast_from_main(error)  # no rank is left waiting for one that gave up
        if error is not None:
            raise RunError(error)
        yield


def save_training_state(state: TrainState, cfg: ExperimentConfig, run_dir: Path, *, keep: int | None = None) -> None:
    """Write a new state, then delete all but the ``keep`` (default ``train.keep_states``) newest, never before the new one
    is complete: a failed write (full disk) raises and leaves the older states and no partial file."""
    keep = cfg.train.keep_states if keep is None else keep
    ckpt.save_state(ckpt.state_path(run_dir, state.nimg), state.to_dict(cfg))
    for old in ckpt.list_states(run_dir)[:-keep]:
        old.unlink(missing_ok=True)


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

    def signal_on_any_rank(self) -> int:
        """The stop signal, the same on every rank (a collective): SIGTERM if any rank got it, else SIGINT."""
        return dist.max_over_ranks(self.signum or 0)  # SIGTERM (15) > SIGINT (2)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
