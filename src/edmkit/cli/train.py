"""``edmkit train`` and ``edmkit train-classifier``, with the helpers that turn flags into an ``ExperimentConfig``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import click

from edmkit import dist
from edmkit.cli._common import NIMG, check_output_target, main, parse_int_list, pick_device, user_errors
from edmkit.config import DEFAULT_PRESET, FORMULATIONS, LADDER, PRECISIONS, PRESETS, ExperimentConfig, get_preset, resolve_formulation, resolve_ladder


@main.command()
@click.option("--preset", default=DEFAULT_PRESET, show_default=True, help=f"Named configuration: {', '.join(PRESETS)}.")
@click.option("--config", "ladder", default=None, help=f"EDM2 config-ladder rung ({', '.join(LADDER)}; default: the preset's, G). Also sets its loss weighting and lr schedule (A: no uncertainty; A-D: constant lr; A-C: lr 1e-3); --lr still wins.")
@click.option("--formulation", default=None, help=f"Diffusion formulation: {', '.join(FORMULATIONS)} (default: the preset's, edm). flow also sets logit-normal(0, 1) t.")
@click.option("--run", "--run-dir", "run_dir", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<preset>[-<config>][-<formulation>]). Re-running the same command resumes from its newest state. Under torchrun spell it --run-dir (torchrun's parser takes --run for its --run-path).")
@click.option("--data", default=None, help='Dataset: "mnist5k" (embedded, no download) or a path (folder, zip, npz, MNIST idx, CIFAR tarball).')
@click.option("--classes", default=None, help="Train on these classes only, e.g. 1 or 3,5 (relabelled 0..k-1 in this order).")
@click.option("--center-crop", is_flag=True, default=None, help="Crop non-square images to a centred square before resizing.")
@click.option("--resolution", type=int, default=None, help="Train at this square image size (data are resized to it).")
@click.option("--batch", type=int, default=None, help="Global batch size.")
@click.option("--duration", "total_nimg", type=NIMG, default=None, help="Training length in images, e.g. 80k, 2Mi.")
@click.option("--lr", type=float, default=None, help="Reference learning rate (Adam).")
@click.option("--seed", type=int, default=None, help="Seed for initialization, data order and noise.")
@click.option("--cond/--uncond", default=None, help="Class-conditional on the dataset's labels (default: the preset's).")
@click.option("--p-uncond", type=float, default=None, help="Label dropout probability for classifier-free guidance (with --cond), e.g. 0.1.")
@click.option("--stratified/--no-stratified", default=None, help="Low-discrepancy noise levels: spread each batch's sigma (or t) evenly over the training density (one random offset, n equal-mass strata) instead of independent draws. Same expected loss, lower-variance loss and gradient (default: the preset's, off).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--force", is_flag=True, help="Continue a run folder even though its config differs.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit without training.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--val-fraction", type=float, default=None, help="Hold out this fraction of the images (never trained on) for a validation loss, e.g. 0.02 (default 0: none).")
@click.option("--val-every", "val_nimg", type=NIMG, default=None, help="Validation loss every this many images, e.g. 16k (with --val-fraction).")
@click.option("--grad-clip", type=float, default=None, help="Clip the global L2 gradient norm to this value (default 0: off, as in EDM).")
@click.option("--log", "loggers", multiple=True, type=click.Choice(["tensorboard", "wandb"]), help="Also send the stats records to TensorBoard or Weights & Biases (package must be installed); repeatable.")
@click.option("--batch-per-device", type=int, default=None, help="Images per process per forward/backward; below batch / processes, gradients are accumulated (default: batch / processes).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None, help="Backbone arithmetic (autocast): fp32 (default), bf16, fp16 (with loss scaling). Norms, preconditioning and the loss stay fp32.")
@click.option("--compile/--no-compile", "compile_net", default=None, help="torch.compile the backbone (slow first steps; off by default).")
@click.option("--keep-states", type=int, default=None, help="Resumable training states kept in the run folder (default 2).")
@click.option("--max-bad-steps", type=int, default=None, help="Stop after this many steps in a row with a non-finite loss or gradient (default 20; each is skipped).")
@click.option("--snapshot-every", "snapshot_nimg", type=NIMG, default=None, help="Save EMA snapshots (for post-hoc EMA) every this many images.")
@click.option("--snapshot-dtype", type=click.Choice(["float32", "float16"]), default=None, help="Storage type of EMA snapshots (float16 halves the disk).")
@click.option("--snapshot-budget", "snapshot_budget_mb", type=float, default=None, help="Refuse to start when the snapshots would exceed this many MB.")
@click.option("--augment", "augment_p", type=float, default=None, help="Non-leaky augmentation (EDM App. C): probability of each transform (flip, translation, scaling, rotation), e.g. 0.12; adds augment-label conditioning to the network.")
@click.option("--task", type=click.Choice(["generate", "sr"]), default=None, help="generate (default) or sr: a cascade super-resolution stage conditioned on the low-res image (noise-conditioning augmentation).")
@click.option("--sr-scale", type=int, default=None, help="sr: low-res factor (must divide the image size; default 2).")
@click.option("--sr-aug-max", type=float, default=None, help="sr: conditioning noise sigma_aug ~ U[0, this] in training (default 0.5).")
@click.option("--eval-every", "eval_nimg", type=NIMG, default=None, help="In-training FID/KID of the sampling EMA every this many images and at the end, e.g. 50k (needs --eval-ref). Small n: labelled as such, not comparable with published 50k scores.")
@click.option("--eval-ref", default=None, help="Reference statistics for --eval-every (from `edmkit metrics ref`); checked before training starts.")
@click.option("--eval-n", type=int, default=None, help="Images per in-training evaluation, seeds 0..n-1 (default 1000).")
@click.option("--eval-steps", type=int, default=None, help="Heun steps of the evaluation images (default 18).")
@click.option("--eval-detector", default=None, help="Detector of the evaluation: inception, dinov2 or a TorchScript file (default: the reference's).")
@click.option("--eval-metrics", default=None, help="Scores of each evaluation, comma-separated: fid, kid, pr (default fid,kid).")
@user_errors
def train(preset, ladder, formulation, run_dir, data, classes, center_crop, resolution, batch, total_nimg, lr, seed, cond, p_uncond, stratified, device, force, dry_run, quiet,
          val_fraction, val_nimg, grad_clip, loggers, batch_per_device, precision, compile_net, keep_states, max_bad_steps,
          snapshot_nimg, snapshot_dtype, snapshot_budget_mb, augment_p, task, sr_scale, sr_aug_max, eval_nimg, eval_ref, eval_n, eval_steps,
          eval_detector, eval_metrics) -> None:
    """Train a diffusion model; writes config.json, stats.jsonl, sample grids, network snapshots and resumable states.

    \b
    Several processes (CPU: gloo, GPUs: nccl), same results as one process for the same --batch:
      torchrun --nproc_per_node=4 -m edmkit train --preset cifar10 --batch 512 --run-dir runs/c10
    """
    cfg = resolve_train_config(get_preset(preset), ladder=ladder, formulation=formulation, data=data, resolution=resolution, batch=batch,
                               classes=parse_int_list(classes, name="--classes"), center_crop=center_crop,
                               total_nimg=total_nimg, lr=lr, seed=seed, cond=cond, p_uncond=p_uncond, stratified=stratified)
    cfg = resolve_diagnostics(cfg, val_fraction=val_fraction, val_nimg=val_nimg, grad_clip=grad_clip)
    execution = dict(batch_per_device=batch_per_device, precision=precision, compile=compile_net, keep_states=keep_states, max_bad_steps=max_bad_steps)
    if any(v is not None for v in execution.values()):
        cfg = cfg.override("train", **{k: v for k, v in execution.items() if v is not None})
    snapshots = dict(snapshot_nimg=snapshot_nimg, snapshot_dtype=snapshot_dtype, snapshot_budget_mb=snapshot_budget_mb)
    if any(v is not None for v in snapshots.values()):
        cfg = cfg.override("ema", **{k: v for k, v in snapshots.items() if v is not None})
    if augment_p is not None:
        cfg = resolve_augment(cfg, augment_p)
    cfg = resolve_task(cfg, task=task, sr_scale=sr_scale, sr_aug_max=sr_aug_max)
    cfg = resolve_eval(cfg, eval_nimg=eval_nimg, eval_ref=eval_ref, eval_n=eval_n, eval_steps=eval_steps, eval_detector=eval_detector,
                       eval_metrics=eval_metrics)
    if dry_run:
        click.echo(cfg.to_json())
        return
    from edmkit.train import train as run_training  # heavy imports only when training

    run_dir = Path(run_dir or Path("runs") / "-".join([preset] + [v for v in (ladder, formulation) if v]))
    # DDP on CPU: 1x1-conv weight gradients come with other (equivalent) strides for their size-1 dims; harmless
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    try:
        state = run_training(cfg, run_dir, device=pick_device(device), force=force, progress=not quiet, log=click.echo, loggers=loggers)
    finally:
        dist.shutdown()  # leave torchrun's process group (a no-op in one process)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 reports
        return
    click.echo(f"done: {state.nimg} images in {state.totals['train_sec'] / 60:.1f} min of training; samples: "
               f"edmkit generate --checkpoint {run_dir} --n 64 --out grid.png")


def resolve_task(cfg: ExperimentConfig, *, task=None, sr_scale=None, sr_aug_max=None) -> ExperimentConfig:
    """``--task sr --sr-scale S --sr-aug-max A``: the cascade SR stage and the network inputs it needs (after ``--augment``)."""
    if task is None and (sr_scale is not None or sr_aug_max is not None):
        raise ValueError("--sr-scale / --sr-aug-max are for --task sr")
    if task != "sr":
        return cfg if task is None else cfg.override("train", task=task)
    from edmkit.cascade import resolve_sr

    if sr_aug_max is not None:
        cfg = cfg.override("train", sr_aug_max=sr_aug_max, sr_aug_sample=min(cfg.train.sr_aug_sample, sr_aug_max))
    return resolve_sr(cfg, scale=cfg.train.sr_scale if sr_scale is None else sr_scale)


def resolve_augment(cfg: ExperimentConfig, p: float) -> ExperimentConfig:
    """``--augment P``: augmentation probability P and, for P > 0, the augment-label conditioning it needs (EDM App. C)."""
    from edmkit.augment import AUGMENT_DIM

    cfg = cfg.override("train", augment_p=p)
    return cfg.override("network", augment_dim=AUGMENT_DIM) if p > 0 else cfg


def resolve_eval(cfg: ExperimentConfig, *, eval_nimg=None, eval_ref=None, eval_n=None, eval_steps=None, eval_detector=None,
                 eval_metrics=None) -> ExperimentConfig:
    """Apply the in-training evaluation flags (``None`` = keep the preset's value); ``--eval-metrics`` parsed as by ``metrics gen``."""
    if eval_metrics is not None:
        from edmkit.metrics.evaluate import parse_metrics

        eval_metrics = parse_metrics(eval_metrics)
    kw = dict(eval_nimg=eval_nimg, eval_ref=eval_ref, eval_n=eval_n, eval_steps=eval_steps, eval_detector=eval_detector, eval_metrics=eval_metrics)
    kw = {k: v for k, v in kw.items() if v is not None}
    cfg = cfg.override("train", **kw) if kw else cfg
    if set(kw) - {"eval_nimg"} and not cfg.train.eval_nimg:
        raise ValueError("--eval-ref / --eval-n / --eval-steps / --eval-detector / --eval-metrics take effect with --eval-every K")
    return cfg


def resolve_diagnostics(cfg: ExperimentConfig, *, val_fraction=None, val_nimg=None, grad_clip=None) -> ExperimentConfig:
    """Apply the held-out split, validation interval and gradient clipping flags (``None`` = keep the preset's value)."""
    train_kw = {k: v for k, v in dict(val_fraction=val_fraction, val_nimg=val_nimg).items() if v is not None}
    if train_kw:
        cfg = cfg.override("train", **train_kw)
    if grad_clip is not None:
        cfg = cfg.override("optim", grad_clip=grad_clip)
    return cfg


def resolve_train_config(cfg: ExperimentConfig, *, ladder=None, formulation=None, data=None, resolution=None, batch=None, total_nimg=None, lr=None,
                         seed=None, cond=None, p_uncond=None, classes=None, center_crop=None, stratified=None) -> ExperimentConfig:
    """Apply command-line overrides (``None`` = keep the preset's value).

    The rung and formulation go first, so the values they derive (uncertainty weighting, lr, lr decay, t density)
    yield to any explicit flag applied after them.
    """
    if ladder is not None:
        cfg = resolve_ladder(cfg, ladder)
    if formulation is not None:
        cfg = resolve_formulation(cfg, formulation)
    if resolution is not None:
        cfg = cfg.override("network", resolution=resolution)
    train_kw = {k: v for k, v in dict(data=data, batch=batch, total_nimg=total_nimg, seed=seed, center_crop=center_crop,
                                      classes=tuple(classes) if classes is not None else None).items() if v is not None}
    if train_kw:
        cfg = cfg.override("train", **train_kw)
    if lr is not None:
        cfg = cfg.override("optim", lr=lr)
    if cond is not None:
        label_dim = 0
        if cond:
            from edmkit.train import dataset_of

            label_dim = dataset_of(cfg).num_classes
            if not label_dim:
                raise ValueError(f"--cond needs labels, but {cfg.train.data} has none")
        cfg = cfg.override("network", label_dim=label_dim)
    if p_uncond is not None:
        if p_uncond > 0 and not cfg.network.label_dim:
            raise ValueError("--p-uncond drops class labels: it needs a class-conditional model (--cond)")
        cfg = cfg.override("loss", p_uncond=p_uncond)
    if stratified is not None:
        cfg = cfg.override("loss", stratified=stratified)
    return cfg


@main.command("train-classifier")
@click.option("--data", default=None, help='Labelled dataset: "mnist5k" (embedded) or a path (default: the preset\'s).')
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Classifier file to write, e.g. clf.safetensors.")
@click.option("--duration", "nimg", type=NIMG, default="20k", show_default=True, help="Training length in images, e.g. 20k.")
@click.option("--preset", default=DEFAULT_PRESET, show_default=True, help=f"Network size and sigma density of the preset: {', '.join(PRESETS)}.")
@click.option("--classes", default=None, help="Train on these classes only, e.g. 3,5 (relabelled 0..k-1), as the diffusion model was.")
@click.option("--batch", type=int, default=None, help="Batch size (default: the preset's).")
@click.option("--lr", type=float, default=None, help="Reference Adam learning rate (default: the preset's; inverse-sqrt decay and warm-up as the preset's diffusion training).")
@click.option("--seed", type=int, default=None, help="Seed for initialization, data order and noise.")
@click.option("--force", is_flag=True, help="Continue the training state beside --out even though the config differs.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def train_classifier_cmd(data, out, nimg, preset, classes, batch, lr, seed, force, device, quiet) -> None:
    """Train a noise-aware classifier p(class | x, sigma) for classifier guidance and rejection sampling.

    --out gets the power-function EMA of the weights (the preset's sampling EMA); resumable states (raw weights,
    Adam, EMA) go to the folder <out stem>-state beside it. Re-running the same command continues from the newest
    state (Ctrl-C saves one first); a longer --duration trains on.

    \b
    Example:
      edmkit train-classifier --data mnist5k --out clf.safetensors --duration 20k --preset mnist
      edmkit generate --checkpoint runs/mnist --classifier clf.safetensors --class 3 --classifier-scale 1 --out grid.png
    """
    from edmkit.classifier import train_classifier

    check_output_target(Path(out))
    changes = {k: v for k, v in dict(data=data, batch=batch, seed=seed, classes=tuple(parse_int_list(classes, name="--classes") or ()) if classes else None).items()
               if v is not None}
    cfg = get_preset(preset)
    cfg = cfg.override("train", **changes) if changes else cfg
    result = train_classifier(cfg, out, nimg=nimg, lr=lr, force=force, device=pick_device(device), progress=not quiet, log=click.echo)
    click.echo(f"wrote {out} (EMA sigma_rel {result['ema_std']:g} after {result['nimg']} images; training state in {result['state_dir']})")
