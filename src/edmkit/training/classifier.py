"""A noise-aware classifier p(y | x, σ) for classifier guidance and rejection sampling.

The network is :mod:`edmkit.diffusion.classifier`. Symbols: x = y_img + σ n a noisy image (EDM σ-space, data in [-1, 1]); y a class in [0, K); c_in, c_noise
the formulation's preconditioning (``edmkit.diffusion.precond.FORMULATIONS``), so the network sees unit-variance input
and the same noise embedding as the denoiser.

Network: the U-Net's encoder (``edmkit.nn.unet.encoder_blocks``, EDM2 config G: magnitude-preserving,
forced weight normalization) conditioned on c_noise through the same Fourier embedding, then global average
pooling, pixel normalization and an MP linear head -> K logits. Trained with cross-entropy on x + σ n, σ drawn
from the diffusion loss's density (``make_loss(cfg).sample_sigma``), as "trained with noisy data and the class
labels" in Dhariwal & Nichol 2021 (ADM, Sec. 4). Training reuses diffusion training's pieces (``edmkit.training``):
Adam with the inverse-sqrt lr schedule (EDM2 Eq. 67), a power-function EMA (EDM2 Sec. 3) whose weights are the
saved classifier, per-step seeded noise, and resumable states (``<out stem>-state/`` beside the file).

Files: the usual network safetensors (``checkpoint.save_network``) with metadata ``kind = "classifier"``; the
config's ``network.label_dim`` is the class count K. ``checkpoint.load_network`` refuses them;
``checkpoint.load_classifier`` reads them.

Rejection sampling with this classifier is :mod:`edmkit.sampling.rejection`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edmkit.checkpoint import save_network
from edmkit.config import ExperimentConfig
from edmkit.data.dataset import ImageDataset, dataset_of
from edmkit.data.images import images_to_float
from edmkit.diffusion.classifier import CLEAN_SIGMA, build_classifier
from edmkit.diffusion.loss import make_loss
from edmkit.diffusion.schedules import learning_rate
from edmkit.files import writer_lock
from edmkit.training.ema import PowerFunctionEMA
from edmkit.training.loop import due
from edmkit.training.run_state import RunError, StopRequest, TrainState, prepare_run_dir, resume, save_training_state
from edmkit.training.step_inputs import step_generator


@torch.no_grad()
def accuracy_at(classifier: Callable, images: torch.Tensor, labels: torch.Tensor, *, sigma: float,
                generator: torch.Generator, batch: int = 256) -> float:
    """Fraction of `images` [N, C, H, W] in [-1, 1] with noise σ·n classified as `labels` [N]."""
    correct = 0
    for i in range(0, len(images), batch):
        y = images[i:i + batch]
        x = y + sigma * torch.randn(y.shape, generator=generator).to(y.device)
        correct += int((classifier(x, torch.full([len(y)], sigma, device=y.device)).argmax(1) == labels[i:i + batch]).sum())
    return correct / max(len(images), 1)


def labelled_data(cfg: ExperimentConfig, data: ImageDataset | None = None) -> ImageDataset:
    """The config's dataset (or `data`), which must carry at least 2 classes of labels."""
    n = cfg.network
    data = dataset_of(cfg) if data is None else data
    if data.labels is None or data.num_classes < 2:
        raise ValueError(f"{data.name}: a classifier needs labelled data with at least 2 classes")
    if tuple(data.images.shape[1:]) != (n.channels, n.resolution, n.resolution):
        raise ValueError(f"{data.name}: images {tuple(data.images.shape[1:])} do not match the config ({n.channels}, {n.resolution}, {n.resolution})")
    return data


def classifier_state_dir(out_path: str | os.PathLike) -> Path:
    """Folder of a classifier file's resumable training states: ``<stem>-state/`` beside ``<stem>.safetensors``."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}-state")


def classifier_ema_std(cfg: ExperimentConfig) -> float:
    """σ_rel of the power-function EMA whose weights are the classifier file: ``ema.sample_std`` (0: the first of ``ema.stds``)."""
    return cfg.ema.sample_std or cfg.ema.stds[0]


def classifier_step(state: TrainState, cfg: ExperimentConfig, data: ImageDataset, train_idx: torch.Tensor, loss_fn: Any, *,
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """One Adam step of cross-entropy on x = y + σ n, σ from the diffusion loss density; lr by EDM2 Eq. 67; EMA update.

    Every random number (images, σ, n) comes from the step's generator (``train.step_generator``): a pure function of
    (seed, step), so a resumed run retraces an uninterrupted one bit for bit.

    Args:
        state: classifier (``state.net``), Adam, EMA and counters; advanced in place.
        train_idx: int64 [M] indices of the training images in `data`.

    Returns:
        ``{"loss": cross-entropy of the batch, "lr": the step's learning rate}``.
    """
    batch, o = cfg.train.batch, cfg.optim
    g = step_generator(cfg.train.seed, state.step, "cpu")
    idx = train_idx[torch.randint(len(train_idx), [batch], generator=g)]
    y = images_to_float(data.images[idx]).to(device)  # [B, C, H, W]
    labels = data.labels[idx].to(device)  # [B]
    sigma = loss_fn.sample_sigma(batch, generator=g).to(device)  # [B]
    x = y + sigma.reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=g).to(device)
    lr = learning_rate(state.nimg + batch, lr=o.lr, ref_nimg=o.lr_ref_nimg, warmup_nimg=o.warmup_nimg)  # as train.train_step
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    loss = F.cross_entropy(state.net(x, sigma), labels)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.nimg += batch
    state.step += 1
    state.ema.update(cur_nimg=state.nimg, batch_nimg=batch)
    return {"loss": loss.item(), "lr": lr}


def split_held_out(n: int, *, eval_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices [M], [E] of a seeded permutation of n images; E = min(eval_images, n // 5)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_eval = min(eval_images, n // 5)
    return perm[n_eval:], perm[:n_eval]


def train_classifier(cfg: ExperimentConfig, out_path: str | os.PathLike, *, nimg: int, data: ImageDataset | None = None,
                     device: torch.device | str = "cpu", lr: float | None = None, eval_images: int = 512, num_bins: int = 5,
                     force: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) a noise-aware classifier on x + σ n (σ from the diffusion loss density); save its EMA to `out_path`.

    As diffusion training (``edmkit.training``): Adam (``cfg.optim``: betas, eps, ``lr`` or `lr`) with the inverse-sqrt
    schedule and warm-up (EDM2 Eq. 67), a power-function EMA (EDM2 Sec. 3) of σ_rel :func:`classifier_ema_std`, and
    resumable states (``train.save_training_state`` / ``train.resume``) every ``train.state_nimg`` images, at the end
    and on SIGINT / SIGTERM, in :func:`classifier_state_dir` beside the output. Re-running with the same `out_path`
    continues from the newest state (a longer `nimg` trains on); another config is refused unless `force`.
    The file at `out_path` holds the EMA weights (metadata ``ema_std``); the raw weights are in the states.
    ``cfg.network`` gives the architecture (label_dim set to the data's class count), ``cfg.train`` data, batch and
    seed. The first `eval_images` of a seeded permutation are held out for the report, which scores the EMA.

    Returns:
        ``{"clean": accuracy at σ = 0.002, "bins": [(σ, accuracy), ...], "num_classes": K, "nimg": images trained,
        "lr": the last step's learning rate, "ema_std": σ_rel, "state_dir": str}``.

    Raises:
        KeyboardInterrupt: after SIGINT / SIGTERM, once the state is saved.
    """
    if nimg < 1:
        raise ValueError(f"nimg must be >= 1, got {nimg}")
    data = labelled_data(cfg, data)
    end_nimg = -(-nimg // cfg.train.batch) * cfg.train.batch  # whole batches
    cfg = cfg.override("network", label_dim=data.num_classes).override("train", total_nimg=end_nimg)
    cfg = cfg if lr is None else cfg.override("optim", lr=lr)
    state_dir = classifier_state_dir(out_path)
    with writer_lock(state_dir, what="classifier state folder"):  # one writer at a time
        try:
            prepare_run_dir(state_dir, cfg, force=force)
        except RunError as e:
            raise RunError(f"cannot continue training {out_path}: {e}") from None
        torch.manual_seed(cfg.train.seed)  # weight init
        clf = build_classifier(cfg).to(device).train()
        o, std = cfg.optim, classifier_ema_std(cfg)
        opt = torch.optim.Adam(clf.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        state = TrainState(net=clf, optimizer=opt, ema=PowerFunctionEMA(clf, stds=(std,)))
        resume(state, state_dir, log)
        loss_fn = make_loss(cfg)
        train_idx, eval_idx = split_held_out(len(data.labels), eval_images=eval_images, seed=cfg.train.seed)
        bar = tqdm(total=end_nimg, initial=min(state.nimg, end_nimg), disable=not progress, desc="train-classifier", unit="img")
        with StopRequest() as stop:  # SIGINT / SIGTERM: finish the step, save, then stop
            try:
                while state.nimg < end_nimg and not stop.requested():
                    prev = state.nimg
                    stats = classifier_step(state, cfg, data, train_idx, loss_fn, device=device)
                    bar.update(state.nimg - prev)
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}", refresh=False)
                    if due(prev, state.nimg, cfg.train.state_nimg) or state.nimg >= end_nimg:
                        save_training_state(state, cfg, state_dir)
            finally:
                bar.close()
            if stop.requested():
                save_training_state(state, cfg, state_dir)
                log(f"stopped by signal {stop.signum}: state saved at {state.nimg} images in {state_dir}; re-run to continue")
                raise KeyboardInterrupt
        ema = build_classifier(cfg).to(device)
        ema.load_state_dict(state.ema.averaged(0), strict=True)
        ema.eval()
        save_network(out_path, ema.state_dict(), cfg=cfg, nimg=state.nimg, ema_std=std, kind="classifier")
        report = classifier_report(ema, data, eval_idx, loss_fn, num_bins=num_bins, seed=cfg.train.seed, device=device)
        log(format_report(report))
        last_lr = learning_rate(state.nimg, lr=o.lr, ref_nimg=o.lr_ref_nimg, warmup_nimg=o.warmup_nimg)
        return {**report, "nimg": state.nimg, "lr": last_lr, "ema_std": std, "state_dir": str(state_dir)}


def classifier_report(clf: Callable, data: ImageDataset, idx: torch.Tensor, loss_fn: Any, *, num_bins: int, seed: int,
                      device: torch.device | str = "cpu") -> dict[str, Any]:
    """Held-out accuracy clean (σ = 0.002) and at the centres of `num_bins` equal-mass bins of the training σ density."""
    g = torch.Generator().manual_seed(seed + 1)
    y, labels = images_to_float(data.images[idx]).to(device), data.labels[idx].to(device)
    bins = loss_fn.sigma_quantiles(num_bins).tolist()  # centres of equal-mass bins of the training sigma density
    return {"num_classes": data.num_classes, "clean": accuracy_at(clf, y, labels, sigma=CLEAN_SIGMA, generator=g),
            "bins": [(s, accuracy_at(clf, y, labels, sigma=s, generator=g)) for s in bins]}


def format_report(report: dict[str, Any]) -> str:
    """One line per σ of a :func:`classifier_report`."""
    lines = [f"held-out accuracy ({report['num_classes']} classes, chance {1 / report['num_classes']:.3f}):",
             f"  clean (sigma {CLEAN_SIGMA:g}): {report['clean']:.3f}"]
    lines += [f"  sigma {s:8.3f}: {a:.3f}" for s, a in report["bins"]]
    return "\n".join(lines)
