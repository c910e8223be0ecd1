"""The ``edmkit`` command line: train, generate, phema.

Library code raises ValueError / OSError; this module alone turns them into one-line errors with a
non-zero exit code and sets ``torch.backends`` flags.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import click
import torch

from edmkit import dist
from edmkit.config import DEFAULT_PRESET, FORMULATIONS, LADDER, PRECISIONS, PRESETS, ExperimentConfig, get_preset, parse_nimg, resolve_formulation, resolve_ladder


def user_errors(fn):
    """Report user mistakes (ValueError, OSError) as ``error: ...`` with exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but CUDA is not available")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return torch.device(name)


class NimgType(click.ParamType):
    name = "nimg"

    def convert(self, value, param, ctx):
        try:
            return parse_nimg(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


NIMG = NimgType()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edmkit")
def main() -> None:
    """edmkit: train, sample and evaluate EDM / EDM2 pixel-space diffusion models.

    \b
    Quick start (embedded MNIST digits, CPU, about 15 minutes):
      edmkit train                       # writes runs/mnist/
      edmkit generate --checkpoint runs/mnist --n 64 --out grid.png
    """


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
def train(preset, ladder, formulation, run_dir, data, classes, center_crop, resolution, batch, total_nimg, lr, seed, cond, p_uncond, device, force, dry_run, quiet,
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
                               total_nimg=total_nimg, lr=lr, seed=seed, cond=cond, p_uncond=p_uncond)
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
                         seed=None, cond=None, p_uncond=None, classes=None, center_crop=None) -> ExperimentConfig:
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
    return cfg


@main.command()
@click.option("--checkpoint", required=True, help="A network .safetensors file or a run folder (its newest network with the run's sampling EMA).")
@click.option("--out", required=True, type=click.Path(), help="grid.png (one grid), images.npz (uint8 array) or a folder (one PNG per seed).")
@click.option("--n", "n", type=int, default=None, help="Number of images (seeds 0..n-1). Default 64.")
@click.option("--seeds", default=None, help="Explicit seeds, e.g. 0-63 or 1,5,9 (instead of --n).")
@click.option("--steps", type=int, default=18, show_default=True, help="Sampler steps (Heun: 2*steps-1 network evaluations).")
@click.option("--sampler", default="heun", show_default=True, help="heun, euler, ddim, ddpm, dpmpp-2m.")
@click.option("--schedule", default="karras", show_default=True, help="Noise levels: karras (EDM rho=7), loglinear, vp (DDPM timesteps).")
@click.option("--churn", "S_churn", type=float, default=None, help="Heun: stochasticity S_churn (EDM Alg. 2), e.g. 40.")
@click.option("--s-tmin", "S_tmin", type=float, default=None, help="Heun: churn only for sigma >= S_tmin.")
@click.option("--s-tmax", "S_tmax", type=float, default=None, help="Heun: churn only for sigma <= S_tmax.")
@click.option("--s-noise", "S_noise", type=float, default=None, help="Heun: scale of the churn noise S_noise, e.g. 1.003.")
@click.option("--eta", type=float, default=None, help="DDIM: stochasticity eta (0 deterministic, 1 = DDPM).")
@click.option("--class", "class_idx", type=int, default=None, help="Class label for conditional models (default: drawn per seed).")
@click.option("--guidance", type=float, default=None, help="Guidance weight w (1 = none): CFG with the model's unconditional branch, or autoguidance with --guide-checkpoint.")
@click.option("--guide-checkpoint", default=None, help="Autoguidance: a weaker network file or run folder of the same images and classes.")
@click.option("--guide-ema", type=float, default=None, help="With a guide run folder: EMA sigma_rel of its network (0 = raw weights).")
@click.option("--interval", default=None, help="Guidance interval: guide only for sigma in (LO, HI], e.g. 0.3,5.")
@click.option("--oscillate", default=None, help="Oscillating guidance HIGH,LOW: alternate the two weights per step (instead of --guidance).")
@click.option("--oscillate-warmup", type=int, default=0, show_default=True, help="Steps at the HIGH weight before oscillating.")
@click.option("--threshold", type=float, default=None, help="Dynamic thresholding percentile of the denoised image, e.g. 0.995.")
@click.option("--gif", type=click.Path(dir_okay=False), default=None, help="Also write the reverse process (noisy state | denoised) of the first seeds as an animated GIF.")
@click.option("--gif-n", type=int, default=4, show_default=True, help="Number of seeds shown in the --gif.")
@click.option("--ema", "ema_std", type=float, default=None, help="With a run folder: EMA sigma_rel of the network to use (0 = raw weights).")
@click.option("--classifier", "classifier_path", default=None, type=click.Path(dir_okay=False), help="Noise-aware classifier file (from edmkit train-classifier) for --classifier-scale / --reject-threshold.")
@click.option("--classifier-scale", type=float, default=0.0, show_default=True, help="Classifier guidance scale s: D + s*sigma^2*grad log p(class | x, sigma) (needs --classifier; --class for unconditional models).")
@click.option("--reject-threshold", type=float, default=None, help="Rejection sampling: keep only images the classifier assigns to --class with confidence >= this, in (0, 1].")
@click.option("--max-tries", type=int, default=None, help="With --reject-threshold: at most this many candidates (default 10 x the images asked for).")
@click.option("--batch", type=int, default=64, show_default=True, help="Images per batch (does not change the images).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@user_errors
def generate(checkpoint, out, n, seeds, steps, sampler, schedule, S_churn, S_tmin, S_tmax, S_noise, eta, class_idx, guidance,
             guide_checkpoint, guide_ema, interval, oscillate, oscillate_warmup, threshold, gif, gif_n, ema_std,
             classifier_path, classifier_scale, reject_threshold, max_tries, batch, device) -> None:
    """Sample images; image k depends only on its seed, whatever the batch size.

    \b
    Examples:
      edmkit generate --checkpoint runs/mnist --out grid.png --sampler heun --steps 18 --churn 10
      edmkit generate --checkpoint runs/cond --out grid.png --class 3 --guidance 2 --interval 0.3,5
      edmkit generate --checkpoint runs/big --guide-checkpoint runs/small --guidance 1.5 --out grid.png --gif reverse.gif
      edmkit generate --checkpoint runs/mnist --classifier clf.safetensors --class 7 --classifier-scale 2 --reject-threshold 0.9 --out grid.png
    """
    from edmkit.checkpoint import find_network, load_network
    from edmkit.generate import generate_images, load_guide, parse_pair, parse_seeds
    from edmkit.report import ReverseProcessRecorder

    if n is not None and seeds is not None:
        raise ValueError("give --n or --seeds, not both")
    seed_list = parse_seeds(seeds) if seeds else list(range(64 if n is None else n))
    if n is not None and n < 1:
        raise ValueError("--n must be >= 1")
    if gif_n < 1:
        raise ValueError("--gif-n must be >= 1")
    guidance_kw = dict(guidance=1.0 if guidance is None else guidance, oscillate_warmup=oscillate_warmup, threshold=threshold,
                       interval=parse_pair(interval, name="--interval") if interval else None,
                       oscillate=parse_pair(oscillate, name="--oscillate") if oscillate else None)
    if guidance is not None and oscillate:
        raise ValueError("give --guidance or --oscillate, not both")
    sampler_kw = {k: v for k, v in dict(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise, eta=eta).items() if v is not None}
    for target in [Path(out)] + ([Path(gif)] if gif else []):
        check_output_target(target)
    dev = pick_device(device)
    path = find_network(checkpoint, ema_std=ema_std)
    net, meta = load_network(path, device=dev)
    cfg = meta["config"]
    c = cfg.network
    click.echo(f"{path.name}: {meta['nimg']} images, EMA {meta['ema_std']:g}, {c.resolution}x{c.resolution}x{c.channels}")
    guide = load_guide(guide_checkpoint, like=c, ema_std=guide_ema, device=dev) if guide_checkpoint else None
    if guide is None and (guidance not in (None, 1) or oscillate) and c.label_dim and cfg.loss.p_uncond == 0:
        click.echo("warning: this model was trained without label dropout (p_uncond = 0): its unconditional branch is untrained", err=True)
    clf = load_generate_classifier(classifier_path, c, class_idx=class_idx, scale=classifier_scale, reject_threshold=reject_threshold,
                                   gif=gif, device=dev)
    if clf is not None:
        guidance_kw.update(classifier_generate_kw(clf, c, class_idx=class_idx, scale=classifier_scale))
        class_idx = guidance_kw.pop("class_idx")
    recorder = ReverseProcessRecorder(num=min(gif_n, len(seed_list)), sigma_data=c.sigma_data) if gif else None
    sample = functools.partial(generate_images, net, resolution=c.resolution, channels=c.channels, label_dim=c.label_dim,
                               class_idx=class_idx, sampler=sampler, steps=steps, schedule=schedule, guide=guide, batch=batch,
                               device=dev, **guidance_kw, **sampler_kw)
    if reject_threshold is not None:
        seed_list, x = rejection_generate(sample, clf, seed_list=seed_list, class_idx=guidance_kw["classifier_class"],
                                          threshold=reject_threshold, batch=batch, max_tries=max_tries)
    else:
        x = sample(seeds=seed_list, progress=True, callback=recorder)
    write_images(x, Path(out), seeds=seed_list)
    click.echo(f"wrote {len(seed_list)} images to {out}")
    if recorder is not None:
        recorder.save(gif)
        click.echo(f"wrote the reverse process of {recorder.num} images ({len(recorder.steps)} steps) to {gif}")


def load_generate_classifier(path, model, *, class_idx, scale, reject_threshold, gif, device):
    """The classifier of ``generate`` (or None), checked against the model and the classifier options."""
    from edmkit.classifier import check_classifier, check_threshold, load_classifier

    if scale < 0:
        raise ValueError(f"--classifier-scale must be >= 0, got {scale}")
    if reject_threshold is not None:
        check_threshold(reject_threshold)
        if class_idx is None:
            raise ValueError("--reject-threshold needs --class (the class to keep)")
        if gif:
            raise ValueError("--gif is not available with --reject-threshold")
    if path is None:
        if scale > 0 or reject_threshold is not None:
            raise ValueError("--classifier-scale and --reject-threshold need --classifier")
        return None
    if scale > 0 and class_idx is None and not model.label_dim:
        raise ValueError("classifier guidance of an unconditional model needs --class")
    clf, meta = load_classifier(path, device=device)
    check_classifier(model, meta["config"].network, class_idx=class_idx)
    return clf


def classifier_generate_kw(clf, model, *, class_idx, scale) -> dict:
    """``generate_images`` options for a classifier (None: just ``class_idx``): the class is the classifier's, and an
    unconditional model takes none itself."""
    if clf is None:
        return {} if class_idx is None else dict(class_idx=class_idx)
    return dict(classifier=clf, classifier_scale=scale, classifier_class=class_idx, class_idx=class_idx if model.label_dim else None)


def rejection_generate(sample, clf, *, seed_list, class_idx, threshold, batch, max_tries):
    """Rejection sampling for ``generate``: consecutive seeds from the first asked for, until len(seed_list) are accepted."""
    from edmkit.classifier import candidate_seeds, rejection_sample

    n = len(seed_list)
    candidates = candidate_seeds(seed_list, max_tries=max_tries)
    max_tries = len(candidates)
    result = rejection_sample(lambda s: sample(seeds=s), clf, n=n, class_idx=class_idx, threshold=threshold,
                              seeds=candidates, batch=batch, max_tries=max_tries)
    click.echo(f"rejection sampling: accepted {result.accepted} of {result.tried} candidates (rate {result.rate:.1%})")
    if not result.seeds:
        raise ValueError(f"no image of class {class_idx} reached confidence {threshold} in {result.tried} candidates; "
                         "lower --reject-threshold or raise --max-tries")
    if len(result.seeds) < n:
        click.echo(f"warning: only {len(result.seeds)} of {n} images accepted within --max-tries {max_tries}; "
                   "lower --reject-threshold or raise --max-tries", err=True)
    return result.seeds, result.images


def check_output_target(out: Path) -> None:
    """Fail before sampling if the output cannot be written."""
    parent = out if not out.suffix else out.parent
    parent = parent if parent != Path("") else Path(".")
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"cannot write output {out}: {existing} is not a writable folder")


def write_images(x: torch.Tensor, out: Path, *, seeds: list[int]) -> None:
    from edmkit.data import float_to_images, save_image_grid, save_images

    if out.suffix.lower() == ".png":
        save_image_grid(x, out)
    elif out.suffix.lower() == ".npz":
        import numpy as np

        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, images=float_to_images(x).numpy(), seeds=np.asarray(seeds))
    elif out.suffix:
        raise ValueError(f"unknown output type {out.suffix!r}: use .png, .npz or a folder name")
    else:
        save_images(x, out)


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Training run folder holding the EMA snapshot files.")
@click.option("--sigma-rel", "sigma_rel", default=None, help="Comma-separated EMA lengths sigma_rel, e.g. 0.02,0.05,0.08 (with --sweep default: 0.01 to 0.25).")
@click.option("--at-nimg", type=NIMG, default=None, help="Reconstruct the EMA as it was after this many images (default: the last snapshot).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder for the network files (and the sweep table and plot).")
@click.option("--sweep", "do_sweep", is_flag=True, help="Score every sigma_rel (denoising loss on fixed images and noise; lower is better), write sweep.csv/.json/.png and the best network.")
@click.option("--score-images", type=int, default=128, show_default=True, help="With --sweep: images in the denoising score.")
@click.option("--score-sigmas", type=int, default=8, show_default=True, help="With --sweep: noise levels per image in the denoising score.")
@click.option("--data", default=None, help="With --sweep: dataset for the score (default: the run's).")
@click.option("--device", default="auto", show_default=True, help="With --sweep: where networks are scored (cpu, cuda, cuda:N or auto).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def phema(run_dir, sigma_rel, at_nimg, out_dir, do_sweep, score_images, score_sigmas, data, device, quiet) -> None:
    """Post-hoc EMA (EDM2 Sec. 3): choose the EMA length after training.

    \b
    Examples:
      edmkit phema --run runs/mnist --sigma-rel 0.02,0.05,0.08 --out runs/mnist/phema
      edmkit phema --run runs/mnist --sweep --out runs/mnist/sweep
      edmkit generate --checkpoint runs/mnist/phema/network-000000080000-0.080.safetensors --out grid.png
    """
    import warnings

    from edmkit import phema as ph

    sigma_rels = parse_float_list(sigma_rel, name="--sigma-rel") if sigma_rel else None
    if sigma_rels is None and not do_sweep:
        raise ValueError("give --sigma-rel (e.g. 0.02,0.05,0.08) or --sweep")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ph.PosthocEMAWarning)  # the same messages are printed from info below
        if not do_sweep:
            for path, info in ph.save_reconstructions(run_dir, sigma_rels=sigma_rels, at_nimg=at_nimg, out_dir=out_dir, progress=not quiet):
                echo_reconstruction(info)
                click.echo(f"  -> {path}")
            return
        snaps = ph.collect_snapshots(run_dir)
        dev = pick_device(device)
        score = ph.denoising_score(snaps[-1].config, n_images=score_images, n_sigmas=score_sigmas, data=data, device=dev)
        result = ph.sweep(run_dir, out_dir=out_dir, sigma_rels=sigma_rels or ph.DEFAULT_SWEEP, score_fn=score, at_nimg=at_nimg,
                          device=dev, progress=not quiet)
    for row in result["rows"]:
        click.echo(f"sigma_rel {row['sigma_rel']:<6g} {result['score_name']} {row['score']:.5f}   cond(A) {row['cond']:.2e}  gain {row['gain']:.2f}  fit error {row['fit_error']:.2%}")
        if row["warnings"]:
            click.echo(f"  warning: {row['warnings']}")
    click.echo(f"table {result['table']}, plot {result['plot']}")
    if result["best"] is None:
        raise ValueError("no sigma_rel gave a finite score")
    click.echo(f"best: sigma_rel {result['best']['sigma_rel']:g} ({result['score_name']} {result['best']['score']:.5f}) -> {result['network']}")


def echo_reconstruction(info: dict) -> None:
    click.echo(f"sigma_rel {info['sigma_rel']:g} at {info['nimg']} images: {info['used']} snapshots, cond(A) {info['cond']:.2e}, "
               f"gain {info['gain']:.2f}, fit error {info['fit_error']:.2%}")
    for msg in info["warnings"]:
        click.echo(f"  warning: {msg}")


def parse_float_list(text: str, *, name: str) -> list[float]:
    """``"0.02,0.05"`` -> [0.02, 0.05]; a malformed entry raises ValueError naming the option."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"cannot parse {name} {text!r}: use comma-separated numbers, e.g. 0.02,0.05,0.08") from None


# ---------------------------------------------------------------------------------------------
# edmkit metrics: FID / KID / precision-recall, memorization (logic in edmkit.metrics).


def metrics_options(fn):
    """Options shared by the metrics commands."""
    for option in reversed([
        click.option("--detector", default=None, help="Feature network: inception (the standard FID network; default), dinov2, or a TorchScript file path. Looked up in $EDMKIT_CACHE or ~/.cache/edmkit."),
        click.option("--detector-sha256", default=None, help="Expected sha256 of the detector file (a mismatch is an error)."),
        click.option("--batch", type=int, default=64, show_default=True, help="Images per batch (does not change the results)."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--quiet", is_flag=True, help="No progress bar.")]):
        fn = option(fn)
    return fn


def score_options(fn):
    """--repeats, --metrics, --out of the scoring commands."""
    for option in reversed([
        click.option("--repeats", type=int, default=1, show_default=True, help="Disjoint seed ranges (or image chunks) to score; reports mean ± std, min and max."),
        click.option("--metrics", "metric_names", default="fid,kid,pr", show_default=True, help="Comma-separated: fid, kid, pr (precision/recall, k = 3)."),
        click.option("--out", type=click.Path(dir_okay=False), default=None, help="Results JSON (default: beside the network file / image folder, *-metrics.json).")]):
        fn = option(fn)
    return fn


def metrics_echo():
    """click.echo on rank 0, silence on the other torchrun ranks."""

    return click.echo if dist.is_main() else (lambda *args, **kwargs: None)


def finish_metrics(result: dict, out: Path, echo) -> None:
    from edmkit.checkpoint import write_json
    from edmkit.metrics.evaluate import format_results

    if dist.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result)
    for line in format_results(result):
        echo(line)
    echo(f"wrote {out}")


@main.group("metrics")
def metrics_group() -> None:
    """Evaluate: FID, KID, precision/recall against reference statistics; memorization; linear probe.

    \b
    The standard detector is the FID Inception network (inception-2015-12-05.pt), looked up in
    $EDMKIT_CACHE or ~/.cache/edmkit and downloaded there on first use when the network allows.
    Examples:
      edmkit metrics ref --data cifar-10-python.tar.gz --out refs/cifar10.npz
      edmkit metrics gen --checkpoint runs/cifar10 --ref refs/cifar10.npz --n 50000 --repeats 3
      edmkit metrics folder --images samples/ --ref refs/cifar10.npz
      edmkit metrics probe --checkpoint runs/mnist --data mnist5k --sigma 0.5
      edmkit metrics memorization --checkpoint runs/mnist --n 1000 --out pairs.png
      torchrun --nproc_per_node 8 -m edmkit metrics gen --seeds 0-49999 ...   (each rank a slice; torchrun mistakes --n for its own options)
    """


@metrics_group.command("ref")
@click.option("--data", required=True, help='Dataset: "mnist5k" or a path (folder, zip, npz, MNIST idx, CIFAR tarball).')
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Reference file to write, e.g. ref.npz.")
@click.option("--max-features", type=int, default=10_000, show_default=True, help="Raw features kept (a random subset) for KID and precision/recall; 50000 for pr50k3-style numbers.")
@metrics_options
@user_errors
def metrics_ref(data, out, max_features, detector, detector_sha256, batch, device, quiet) -> None:
    """Reference statistics of a dataset: feature mean and covariance over all images, plus raw features."""
    from edmkit.data import load_dataset
    from edmkit.metrics import evaluate as ev, reference as rf
    from edmkit.metrics.detectors import conversion_notice, load_detector

    if max_features < 0:
        raise ValueError("--max-features must be >= 0")
    check_output_target(Path(out))
    dev = dist.init(pick_device(device))
    echo = metrics_echo()
    ds = load_dataset(data)
    det = load_detector(detector or "inception", sha256=detector_sha256, device=dev, log=echo)
    notice = conversion_notice(det.spec, channels=ds.images.shape[1], resolution=ds.images.shape[-1])
    if notice:
        echo(notice)
    ref = ev.compute_reference(ds.images, detector=det, source=str(data), batch=batch, max_features=max_features, progress=not quiet)
    if ev.dist.is_main():
        rf.save_reference(out, ref)
    echo(f"wrote {out}: {ref.n} images of {ds.name}, {ref.features.shape[1]}-d {ref.detector} features ({len(ref.features)} kept), "
         f"detector sha256 {ref.detector_sha256}")


@metrics_group.command("gen")
@click.option("--checkpoint", required=True, help="A network .safetensors file or a run folder (its newest network with the run's sampling EMA).")
@click.option("--ref", "ref_path", required=True, type=click.Path(dir_okay=False), help="Reference file from `edmkit metrics ref`.")
@click.option("--n", "n", type=int, default=None, help="Images per repeat, seeds 0..n-1 (default 50000, as behind published FIDs).")
@click.option("--seeds", default=None, help="Seeds of the first repeat, e.g. 0-49999 (instead of --n); repeat r shifts them by r times their span.")
@click.option("--ema", "ema_std", type=float, default=None, help="With a run folder: EMA sigma_rel of the network to use (0 = raw weights).")
@click.option("--steps", type=int, default=18, show_default=True, help="Sampler steps (Heun: 2*steps-1 network evaluations).")
@click.option("--sampler", default="heun", show_default=True, help="heun, euler, ddim, ddpm, dpmpp-2m.")
@click.option("--guidance", type=float, default=1.0, show_default=True, help="Classifier-free guidance weight for class-conditional models (1 = none).")
@click.option("--class", "class_idx", type=int, default=None, help="Class of every image (default: drawn per seed for conditional models); the class kept with --reject-threshold.")
@click.option("--classifier", "classifier_path", default=None, type=click.Path(dir_okay=False), help="Noise-aware classifier file (from edmkit train-classifier) for --classifier-scale / --reject-threshold.")
@click.option("--classifier-scale", type=float, default=0.0, show_default=True, help="Classifier guidance scale s (needs --classifier; --class for unconditional models).")
@click.option("--reject-threshold", type=float, default=None, help="Rejection sampling: score only images the classifier assigns to --class with confidence >= this, in (0, 1] (one process).")
@click.option("--max-tries", type=int, default=None, help="With --reject-threshold: candidates per repeat (default 10 x the images asked for); too few accepted is an error.")
@score_options
@metrics_options
@user_errors
def metrics_gen(checkpoint, ref_path, n, seeds, ema_std, steps, sampler, guidance, class_idx, classifier_path, classifier_scale, reject_threshold,
                max_tries, repeats, metric_names, out, detector, detector_sha256, batch, device, quiet) -> None:
    """FID, KID and precision/recall of generated images (none written to disk) against a reference.

    \b
    --repeats 3 scores three disjoint seed ranges (0-49999, 50000-99999, 100000-149999 for --n 50000);
    papers commonly report the minimum FID over three. Under torchrun each rank generates a slice.
    With --reject-threshold the n images scored are the first n accepted among --max-tries consecutive
    candidate seeds from the first (repeat r: the next --max-tries seeds); the acceptance rate is reported.
    """
    import time

    from edmkit.checkpoint import find_network, load_network
    from edmkit.generate import parse_seeds
    from edmkit.metrics import evaluate as ev, reference as rf
    from edmkit.metrics.detectors import conversion_notice

    names = ev.parse_metrics(metric_names)
    seed_list = parse_seeds(seeds) if seeds else list(range(ev.PUBLISHED_N if n is None else max(n, 0)))
    if n is not None and len(seed_list) != n:
        raise ValueError(f"--n {n} but --seeds {seeds} gives {len(seed_list)} seeds")
    if len(seed_list) < 2 or repeats < 1:
        raise ValueError("need at least 2 images (--n >= 2) and --repeats >= 1")
    if max_tries is not None and reject_threshold is None:
        raise ValueError("--max-tries is for rejection sampling (--reject-threshold)")
    ref = rf.load_reference(ref_path)
    path = find_network(checkpoint, ema_std=ema_std)
    out_path = Path(out) if out else path.with_name(f"{path.stem}-metrics.json")
    check_output_target(out_path)
    dev = dist.init(pick_device(device))
    echo = metrics_echo()
    det = rf.reference_detector(ref, detector, sha256=detector_sha256, device=dev, ref_path=ref_path, log=echo)
    net, meta = load_network(path, device=dev)
    c = meta["config"].network
    echo(f"{path.name}: {meta['nimg']} images, EMA {meta['ema_std']:g}; {repeats} x {len(seed_list)} images, {sampler} {steps} steps")
    for line in (conversion_notice(det.spec, channels=c.channels, resolution=c.resolution), rf.shape_notice(ref, resolution=c.resolution, channels=c.channels),
                 ev.sample_size_notice(len(seed_list))):
        if line:
            echo(line)
    clf = load_generate_classifier(classifier_path, c, class_idx=class_idx, scale=classifier_scale, reject_threshold=reject_threshold,
                                   gif=None, device=dev)
    gen_kw = dict(resolution=c.resolution, channels=c.channels, label_dim=c.label_dim, sampler=sampler, steps=steps, guidance=guidance,
                  **classifier_generate_kw(clf, c, class_idx=class_idx, scale=classifier_scale))
    rejection = None
    if reject_threshold is not None:
        from edmkit.classifier import Rejection

        rejection = Rejection(classifier=clf, class_idx=class_idx, threshold=reject_threshold, max_tries=max_tries)
    start = time.monotonic()
    result = ev.evaluate_generator(net, ref=ref, detector=det, seeds=seed_list, repeats=repeats, metrics=names, batch=batch, device=dev,
                                   generate_kw=gen_kw, progress=not quiet, rejection=rejection)
    result.update(checkpoint=str(path), nimg=meta["nimg"], ema_std=meta["ema_std"], generate={k: v for k, v in gen_kw.items() if k != "classifier"},
                  time_sec=time.monotonic() - start, **ev.result_info(ref, ref_path, det))
    if clf is not None:
        result.update(classifier=str(classifier_path))
    if rejection is not None:
        from edmkit.classifier import resolve_max_tries

        result.update(rejection=dict(class_idx=class_idx, threshold=reject_threshold, max_tries=resolve_max_tries(len(seed_list), max_tries)))
    finish_metrics(result, out_path, echo)


@metrics_group.command("folder")
@click.option("--images", "source", required=True, help="Folder of images, or a zip / .npz (e.g. from edmkit generate --out images.npz).")
@click.option("--ref", "ref_path", required=True, type=click.Path(dir_okay=False), help="Reference file from `edmkit metrics ref`.")
@click.option("--n", "n", type=int, default=None, help="Images per repeat, in sorted order (default: all of them / --repeats).")
@score_options
@metrics_options
@user_errors
def metrics_folder(source, ref_path, n, repeats, metric_names, out, detector, detector_sha256, batch, device, quiet) -> None:
    """FID, KID and precision/recall of a folder of images against a reference (repeat r: images r*n .. (r+1)*n-1)."""
    from edmkit.data import load_dataset
    from edmkit.metrics import evaluate as ev, reference as rf
    from edmkit.metrics.detectors import conversion_notice

    names = ev.parse_metrics(metric_names)
    if repeats < 1:
        raise ValueError("--repeats must be >= 1")
    ref = rf.load_reference(ref_path)
    src = Path(source)
    out_path = Path(out) if out else src.with_name(f"{src.stem}-metrics.json")
    check_output_target(out_path)
    dev = dist.init(pick_device(device))
    echo = metrics_echo()
    det = rf.reference_detector(ref, detector, sha256=detector_sha256, device=dev, ref_path=ref_path, log=echo)
    images = load_dataset(source).images
    _, channels, resolution, _ = images.shape
    for line in (conversion_notice(det.spec, channels=channels, resolution=resolution), rf.shape_notice(ref, resolution=resolution, channels=channels),
                 ev.sample_size_notice(n or len(images) // repeats)):
        if line:
            echo(line)
    result = ev.evaluate_images(images, ref=ref, detector=det, n=n, repeats=repeats, metrics=names, batch=batch, progress=not quiet)
    result.update(images=str(source), **ev.result_info(ref, ref_path, det))
    finish_metrics(result, out_path, echo)


@metrics_group.command("memorization")
@click.option("--checkpoint", default=None, help="Generate the samples with this network file or run folder (seeds 0..n-1) ...")
@click.option("--images", "source", default=None, help="... or read them from a folder / zip / .npz (the first n).")
@click.option("--data", default=None, help="Training set to search (default: the checkpoint's).")
@click.option("--n", "n", type=int, default=1000, show_default=True, help="Samples to check.")
@click.option("--space", type=click.Choice(["pixels", "features"]), default="pixels", show_default=True, help="l2 distance of pixels, or cosine distance of detector features.")
@click.option("--top", type=int, default=16, show_default=True, help="Most copy-like pairs drawn in the PNG.")
@click.option("--steps", type=int, default=18, show_default=True, help="Sampler steps (with --checkpoint).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG of (sample | nearest training image) pairs; results JSON beside it.")
@metrics_options
@user_errors
def metrics_memorization(checkpoint, source, data, n, space, top, steps, out, detector, detector_sha256, batch, device, quiet) -> None:
    """Near-copies of training images: flagged when the nearest training image is closer than 1/3 of the next neighbours' mean distance."""
    from edmkit.checkpoint import find_network, load_network, write_json
    from edmkit.data import float_to_images, load_dataset
    from edmkit.generate import generate_images
    from edmkit.metrics import evaluate as ev
    from edmkit.metrics.detectors import load_detector
    from edmkit.metrics.memorization import save_pairs

    if (checkpoint is None) == (source is None):
        raise ValueError("give --checkpoint (generate samples) or --images (read them), not both or neither")
    if n < 1 or top < 1:
        raise ValueError("--n and --top must be >= 1")
    out = Path(out)
    check_output_target(out)
    dev = pick_device(device)
    if checkpoint:
        net, meta = load_network(find_network(checkpoint), device=dev)
        c, data = meta["config"].network, data or meta["config"].train.data
        samples = float_to_images(generate_images(net, seeds=range(n), resolution=c.resolution, channels=c.channels, label_dim=c.label_dim,
                                                  steps=steps, batch=batch, device=dev, progress=not quiet))
    else:
        samples = load_dataset(source).images
        if len(samples) < n:
            raise ValueError(f"--n {n} but {source} has only {len(samples)} images")
        samples = samples[:n]
    if data is None:
        raise ValueError("--images needs --data (the training set to search)")
    train = load_dataset(data)
    if train.images.shape[1:] != samples.shape[1:]:
        click.echo(f"note: training images {tuple(train.images.shape[1:])} converted to the samples' {tuple(samples.shape[1:])} (C, H, W)")
        train = load_dataset(data, resolution=samples.shape[-1], channels=samples.shape[1])
    det = load_detector(detector or "inception", sha256=detector_sha256, device=dev, log=click.echo) if space == "features" else None
    mem = ev.memorization_check(samples, train.images, space=space, detector=det, batch=batch, top=top, device=dev)
    save_pairs(out, samples, train.images, mem.pairs())
    write_json(out.with_suffix(".json"), dict(rate=mem.rate, flagged=int(mem.flagged.sum()), n=len(samples), space=space, data=str(data),
                                              pairs=[dict(sample=i, train=j, distance=float(mem.distance[i]), ratio=float(mem.ratio[i])) for i, j in mem.pairs()]))
    click.echo(f"near-copies: {int(mem.flagged.sum())} of {len(samples)} ({mem.rate:.2%}); most copy-like pairs in {out}, details in {out.with_suffix('.json')}")


@metrics_group.command("probe")
@click.option("--checkpoint", required=True, help="A network .safetensors file or a run folder (its newest network with the run's sampling EMA).")
@click.option("--data", required=True, help='Labelled dataset: "mnist5k" or a path (converted to the network\'s resolution and channels).')
@click.option("--sigma", type=float, default=0.5, show_default=True, help="Noise level the features are taken at.")
@click.option("--block", default=None, help="U-Net block whose pooled output is probed, e.g. dec.7x7_in0 (default: the first decoder block).")
@click.option("--test-fraction", type=float, default=0.2, show_default=True, help="Fraction of the images held out for the test accuracy.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/test split and the fixed noise.")
@click.option("--n", "n", type=int, default=None, help="Use only n images, a random subset drawn with --seed (default: all).")
@click.option("--ema", "ema_std", type=float, default=None, help="With a run folder: EMA sigma_rel of the network to use (0 = raw weights).")
@click.option("--batch", type=int, default=256, show_default=True, help="Images per forward pass (does not change the result).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@user_errors
def metrics_probe(checkpoint, data, sigma, block, test_fraction, seed, n, ema_std, batch, device) -> None:
    """Linear probe: test accuracy of a ridge classifier on frozen, pooled denoiser features at a fixed sigma.

    \b
    Example:
      edmkit metrics probe --checkpoint runs/mnist --data mnist5k --sigma 0.5 --block dec.7x7_in0
    """
    from edmkit.checkpoint import find_network, load_network
    from edmkit.data import load_dataset
    from edmkit.metrics.probe import linear_probe, resolve_block

    dev = pick_device(device)
    net, meta = load_network(find_network(checkpoint, ema_std=ema_std), device=dev)
    resolve_block(net, block)  # an unknown block fails before the dataset is read
    c = meta["config"].network
    ds = load_dataset(data, resolution=c.resolution, channels=c.channels)
    r = linear_probe(net, ds, block=block, sigma=sigma, test_fraction=test_fraction, seed=seed, max_images=n, label_dim=c.label_dim, batch=batch)
    click.echo(f"linear probe {r.block} at sigma {r.sigma:g} ({r.feature_dim} features): test accuracy {r.test_accuracy:.2%} "
               f"on {r.n_test} images (train {r.train_accuracy:.2%} on {r.n_train}; chance {r.chance:.2%})")


@main.group("dataset")
def dataset_group() -> None:
    """Prepare datasets: convert any source to the checked zip format, or summarize one.

    \b
      edmkit dataset convert cifar-10-python.tar.gz cifar-cat.zip --resolution 32 --classes 3
      edmkit dataset info cifar-cat.zip
    """


def parse_int_list(text: str | None, *, name: str) -> list[int] | None:
    """``"1,3"`` -> [1, 3] (None stays None); a malformed entry raises ValueError naming the option."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{name} expects comma-separated integers, e.g. 1,3; got {text!r}") from None


@dataset_group.command("convert")
@click.argument("source", metavar="SRC")
@click.argument("dest", metavar="DEST.zip", type=click.Path(dir_okay=False))
@click.option("--resolution", type=int, default=None, help="Square image size to resize to (default: native, must be uniform).")
@click.option("--center-crop", is_flag=True, help="Crop non-square images to their central square first (else they are an error).")
@click.option("--classes", default=None, help="Keep only these class indices, e.g. 1,3 (relabelled 0, 1, ... in this order).")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="Convert to grayscale (1) or RGB (3) (default: native).")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable files in folders / zips (reported with a count) instead of failing.")
@user_errors
def dataset_convert(source, dest, resolution, center_crop, classes, channels, skip_bad) -> None:
    """Convert SRC (folder, zip, npz, MNIST idx, CIFAR tarball, mnist5k) to DEST.zip: PNGs + dataset.json labels.

    The archive is read back and checked; a preview grid DEST-preview.png is written beside it.
    """
    import warnings

    from edmkit.convert import convert_dataset, format_summary

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = convert_dataset(source, dest, resolution=resolution, channels=None if channels is None else int(channels),
                               classes=parse_int_list(classes, name="--classes"), center_crop=center_crop, skip_bad=skip_bad)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    click.echo(format_summary(info))
    click.echo(f"wrote {info['dest']} (checked); preview: {info['preview']}")


@dataset_group.command("info")
@click.argument("source", metavar="SRC")
@user_errors
def dataset_info(source) -> None:
    """Summarize SRC: image count, resolution, channels, classes (with counts)."""
    from edmkit.convert import dataset_summary, format_summary
    from edmkit.data import load_dataset

    click.echo(format_summary(dataset_summary(load_dataset(source))))

@main.command()
@click.option("--checkpoint", required=True, help="A network .safetensors file or a run folder (its newest network with the run's sampling EMA).")
@click.option("--task", required=True, type=click.Choice(["inpaint", "sr"]), help="inpaint (needs --mask) or sr (super-resolution by --scale).")
@click.option("--image", required=True, type=click.Path(exists=True, dir_okay=False), help="inpaint: the image (model size); sr: the low-res image (model size / scale).")
@click.option("--mask", type=click.Path(exists=True, dir_okay=False), default=None, help="inpaint: PNG of the image's size, white (nonzero) = known pixel; 1 channel or the image's.")
@click.option("--scale", type=int, default=2, show_default=True, help="sr: upsampling factor (must divide the model's image size).")
@click.option("--method", default=None, help="inpaint: replace (default) or dps; sr: ilvr (default), ccdf, dps, or cascade (a model trained with --task sr).")
@click.option("--sr-aug", "sr_aug", type=float, default=None, help="cascade: fixed noise level of the conditioning image (default: the model's train.sr_aug_sample).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Result PNG; the side-by-side (input | result | truth) goes to <out>-compare.png.")
@click.option("--truth", type=click.Path(exists=True, dir_okay=False), default=None, help="Ground-truth image to show in the side-by-side.")
@click.option("--steps", type=int, default=18, show_default=True, help="Sampler steps (ccdf: only those below --sigma-start are taken).")
@click.option("--sampler", default="heun", show_default=True, help="heun, euler, ddim, ddpm, dpmpp-2m.")
@click.option("--schedule", default="karras", show_default=True, help="Noise levels: karras, loglinear, vp.")
@click.option("--resample", type=int, default=1, show_default=True, help="RePaint resampling: repeats per step (replace, ilvr, ccdf).")
@click.option("--zeta", type=float, default=1.0, show_default=True, help="dps: step size of the reconstruction-guidance gradient.")
@click.option("--sigma-start", type=float, default=1.0, show_default=True, help="ccdf: noise level the reverse process starts from.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed.")
@click.option("--class", "class_idx", type=int, default=None, help="Class label for conditional models (default: drawn from the seed).")
@click.option("--ema", "ema_std", type=float, default=None, help="With a run folder: EMA sigma_rel of the network to use.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@user_errors
def restore(checkpoint, task, image, mask, scale, method, sr_aug, out, truth, steps, sampler, schedule, resample, zeta, sigma_start, seed, class_idx, ema_std, device) -> None:
    """Inpaint or super-resolve an image zero-shot with any trained model and sampler.

    \b
    Examples:
      edmkit restore --checkpoint runs/mnist --task inpaint --image in.png --mask mask.png --out out.png --resample 5
      edmkit restore --checkpoint runs/mnist --task sr --scale 2 --image low.png --method ccdf --out out.png
    """
    from edmkit.checkpoint import find_network, load_network
    from edmkit.data import images_to_float, save_image_grid
    from edmkit.generate import class_labels, sampling_sigmas
    from edmkit.inverse import check_mask, check_scale, read_image_file, restore as restore_images, upsample, write_image_file
    from edmkit.samplers import SeededRandn, get_sampler

    if (task == "inpaint") != (mask is not None):
        raise ValueError("--task inpaint needs --mask" if mask is None else "--mask is only for --task inpaint")
    out = Path(out)
    check_output_target(out)
    sample = get_sampler(sampler)
    dev = pick_device(device)
    net, meta = load_network(find_network(checkpoint, ema_std=ema_std), device=dev)
    c = meta["config"].network
    if task == "sr":
        check_scale(c.resolution, scale)
    y = images_to_float(read_image_file(image, channels=c.channels)).to(dev)
    m = read_image_file(mask).to(dev) if task == "inpaint" else None
    rnd = SeededRandn([seed], device=dev)
    labels = class_labels([seed], label_dim=c.label_dim, class_idx=class_idx, device=dev) if c.label_dim else None
    if method == "cascade":  # a trained SR stage (edmkit.cascade), not a zero-shot method
        from edmkit.cascade import super_resolve

        if task != "sr" or scale != meta["config"].train.sr_scale:
            raise ValueError(f"--method cascade is for --task sr with the model's --scale {meta['config'].train.sr_scale}")
        x = super_resolve(net, y, cfg=meta["config"], sample=sample, sigmas=sampling_sigmas(schedule, steps, device=dev),
                          noise=rnd.randn([c.channels, c.resolution, c.resolution]), sigma_aug=sr_aug, labels=labels, randn=rnd)
    else:
        x = restore_images(net, y, task=task, sample=sample, sigmas=sampling_sigmas(schedule, steps, device=dev), noise=rnd.randn([c.channels, c.resolution, c.resolution]),
                           mask=m, scale=scale, method=method, labels=labels, randn=rnd, resample=resample, zeta=zeta, sigma_start=sigma_start)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_image_file(x, out)
    shown = [check_mask(m, y) * y if task == "inpaint" else upsample(y, scale=scale), x]
    if truth:
        t = images_to_float(read_image_file(truth, channels=c.channels)).to(dev)
        if t.shape != x.shape:
            raise ValueError(f"--truth is {t.shape[-1]}x{t.shape[-2]}; the result is {x.shape[-1]}x{x.shape[-2]}")
        shown.append(t)
    compare = out.with_name(f"{out.stem}-compare.png")
    save_image_grid(torch.cat(shown), compare, nrow=len(shown))
    click.echo(f"wrote {out} and {compare} (input | result{' | truth' if truth else ''})")


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


@main.command()
@click.argument("run_dir", metavar="RUN", type=click.Path())
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Output folder (default RUN/report): index.html with its PNGs and GIF.")
@click.option("--gif-n", type=int, default=4, show_default=True, help="Images in the reverse-diffusion GIF (0: none).")
@click.option("--gif-steps", type=int, default=None, help="Sampler steps of the GIF (default: the run's sample_steps).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto (for the GIF).")
@user_errors
def report(run_dir, out, gif_n, gif_steps, device) -> None:
    """HTML report of a training run: loss, learning rate, gradient norm, validation and metric curves, sample grids, reverse-diffusion GIF.

    \b
    Example:
      edmkit report runs/mnist            # writes runs/mnist/report/index.html
    """
    from edmkit.report import write_report

    if gif_n < 0:
        raise ValueError("--gif-n must be >= 0")
    page = write_report(run_dir, out, gif_n=gif_n, gif_steps=gif_steps, device=pick_device(device))
    click.echo(f"wrote {page}")

if __name__ == "__main__":
    main()
