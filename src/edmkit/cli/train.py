"""``edmkit train`` and ``edmkit train-classifier``: flags in, ``presets.resolve_config`` turns them into an ``ExperimentConfig``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import click

from edmkit import dist
from edmkit.cli._common import NIMG, check_output_target, main, parse_int_list, pick_device, user_errors
from edmkit.config import ARCHS, EMA_CHOICES, FORMULATIONS, LADDER, PRECISIONS, SIGMA_SAMPLINGS
from edmkit.presets import DEFAULT_PRESET, PRESETS, load_config_file, resolve_config


@main.command()
@click.option("--preset", default=DEFAULT_PRESET, show_default=True, help=f"Named configuration: {', '.join(PRESETS)}.")
@click.option("--config-file", type=click.Path(dir_okay=False), default=None, help="Start from this config file (JSON, as --dry-run prints it) instead of --preset; flags still override it.")
@click.option("--arch", default=None, help=f"Backbone: {', '.join(ARCHS)} (default: the preset's). --dry-run prints its parameters and GFLOPs.")
@click.option("--config", "ladder", default=None, help=f"EDM2 config-ladder rung ({', '.join(LADDER)}; default: the preset's, G). Also sets its loss weighting and lr schedule (A: no uncertainty; A-D: constant lr; A-C: lr 1e-3); --lr still wins.")
@click.option("--formulation", default=None, help=f"Diffusion formulation: {', '.join(FORMULATIONS)} (default: the preset's, edm). flow also sets logit-normal(0, 1) t.")
@click.option("--run", "--run-dir", "run_dir", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<preset>[-<config>][-<formulation>]). Re-running the same command resumes from its newest state. Under torchrun spell it --run-dir (torchrun's parser takes --run for its --run-path).")
@click.option("--data", default=None, help='Dataset: "mnist5k" (embedded, no download) or a path (folder, zip, npz, MNIST idx, CIFAR tarball). Video networks: "movingmnist" (synthesised; options e.g. movingmnist:digits=1,clips=5000), an npz with \'videos\' [N, T, H, W(, C)] or a folder of GIFs.')
@click.option("--frames", type=int, default=None, help="Video networks (--arch video-unet): frames per training clip, e.g. 8 (default: the preset's).")
@click.option("--image-frames", type=int, default=None, help="Joint image-video training: append this many independent images (frames of random clips) to each clip; masked temporal attention keeps each to itself, e.g. --preset movingmnist --image-frames 4.")
@click.option("--image-data", default=None, help="Joint training: draw the appended images from this image dataset (any --data source of images at the clips' size, e.g. mnist5k) instead of frames of other clips.")
@click.option("--classes", default=None, help="Train on these classes only, e.g. 1 or 3,5 (relabelled 0..k-1 in this order).")
@click.option("--center-crop", is_flag=True, default=None, help="Crop non-square images to a centred square before resizing.")
@click.option("--resolution", type=int, default=None, help="Train at this square image size (data are resized to it).")
@click.option("--attn", default=None, help="Self-attention at these resolutions, e.g. 16,8 (default: the preset's; none: --attn '').")
@click.option("--batch", type=int, default=None, help="Global batch size.")
@click.option("--duration", "total_nimg", type=NIMG, default=None, help="Training length in images, e.g. 80k, 2Mi.")
@click.option("--lr", type=float, default=None, help="Reference learning rate (Adam).")
@click.option("--seed", type=int, default=None, help="Seed for initialization, data order and noise.")
@click.option("--cond/--uncond", default=None, help="Class-conditional on the dataset's labels (default: the preset's).")
@click.option("--context/--no-context", default=None, help="Cross-attention to the dataset's per-image context tokens (an npz 'context' array [N, L, D] or a folder's dataset.json \"context\" entries; every arch), e.g. --data pairs.npz --context --p-uncond 0.1.")
@click.option("--p-uncond", type=float, default=None, help="Label (and context) dropout probability for classifier-free guidance (with --cond or --context), e.g. 0.1.")
@click.option("--sigma-sampling", type=click.Choice(SIGMA_SAMPLINGS), default=None, help="Training noise levels (default: the preset's, lognormal): lognormal = independent draws from the formulation's density; stratified = low-discrepancy, each batch spread evenly over it (one random offset, n equal-mass strata); importance = iDDPM's loss-aware draws, sigma bins in proportion to sqrt(E[loss^2]) from a running history, the loss reweighted so its expectation is the same; adaptive = the same bins with probabilities fitted from the network's learned uncertainty, p ∝ exp(u(sigma)), reweighted likewise (needs the uncertainty head) and recorded in stats.jsonl. Example: --sigma-sampling importance")
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
@click.option("--compile/--no-compile", "compile", default=None, help="torch.compile the backbone (slow first steps; off by default).")
@click.option("--keep-states", type=int, default=None, help="Resumable training states kept in the run folder (default 2).")
@click.option("--stop-when-flat", "stop_when_flat", type=int, default=None, metavar="PATIENCE", help="Stop (saving the state, snapshots and grid, and saying why in the log and stats.jsonl) once the first --eval-metrics score, else the validation loss (--val-fraction), has not improved for PATIENCE evaluations in a row, e.g. --eval-every 20k --eval-ref ref.npz --stop-when-flat 3. Needs one of them.")
@click.option("--max-bad-steps", type=int, default=None, help="Stop after this many steps in a row with a non-finite loss or gradient (default 20; each is skipped).")
@click.option("--snapshot-every", "snapshot_nimg", type=NIMG, default=None, help="Save EMA snapshots (for post-hoc EMA) every this many images.")
@click.option("--snapshot-dtype", type=click.Choice(["float32", "float16"]), default=None, help="Storage type of EMA snapshots (float16 halves the disk).")
@click.option("--snapshot-budget", "snapshot_budget_mb", type=float, default=None, help="Refuse to start when the snapshots would exceed this many MB.")
@click.option("--ema-choice", "ema_choice", type=click.Choice(EMA_CHOICES), default=None, help="At the end of training, pick the EMA length `generate --checkpoint RUN` samples by a post-hoc sweep (into RUN/ema-choice/): fid (against --eval-ref, or the built-in digit detector on the embedded digits), loss (denoising loss), auto (fid where a reference fits, else loss; the presets' default) or off.")
@click.option("--augment", "augment_p", type=float, default=None, help="Non-leaky augmentation (EDM App. C): probability of each transform (flip, translation, scaling, rotation), e.g. 0.12; adds augment-label conditioning to the network.")
@click.option("--task", type=click.Choice(["generate", "sr"]), default=None, help="generate (default) or sr: a cascade super-resolution stage conditioned on the low-res image (noise-conditioning augmentation).")
@click.option("--sr-scale", type=int, default=None, help="sr: low-res factor (must divide the image size; default 2).")
@click.option("--sr-aug-max", type=float, default=None, help="sr: conditioning noise sigma_aug ~ U[0, this] in training (default 0.5).")
@click.option("--eval-every", "eval_nimg", type=NIMG, default=None, help="In-training FID/KID of the sampling EMA every this many images and at the end, e.g. 50k (needs --eval-ref). Small n: labelled as such, not comparable with published 50k scores.")
@click.option("--eval-ref", default=None, help="Reference statistics for --eval-every (from `edmkit metrics ref`); checked before training starts.")
@click.option("--eval-n", type=int, default=None, help="Images per in-training evaluation, seeds 0..n-1 (default 1000).")
@click.option("--eval-steps", type=int, default=None, help="Steps of the run's sampler for the evaluation images (default 18).")
@click.option("--eval-detector", default=None, help="Detector of the evaluation: inception, dinov2, mnist (built in, digits) or a TorchScript file (default: the reference's).")
@click.option("--eval-metrics", default=None, help="Scores of each evaluation, comma-separated: fid, kid, pr, is (default fid,kid).")
@user_errors
def train(preset, config_file, run_dir, device, force, dry_run, quiet, loggers, classes, attn, **overrides) -> None:
    """Train a diffusion model; writes config.json, stats.jsonl, sample grids, network snapshots and resumable states.

    \b
    Examples:
      edmkit train                                   # the default: preset mnist, run folder runs/mnist
      edmkit train --preset tiny --duration 2k --run runs/smoke
      edmkit train --preset mnist --dry-run > run.json && edmkit train --config-file run.json --lr 0.005
    Several processes (CPU: gloo, GPUs: nccl), same results as one process for the same --batch:
      torchrun --nproc_per_node=4 -m edmkit train --preset cifar10 --batch 512 --run-dir runs/c10
    """
    base = load_config_file(config_file) if config_file else preset
    attn_resolutions = None if attn is None else (parse_int_list(attn, name="--attn") if attn.strip() else [])
    cfg = resolve_config(base, classes=parse_int_list(classes, name="--classes"), attn_resolutions=attn_resolutions, **overrides)
    if dry_run:
        from edmkit.nn.build import network_cost

        click.echo(cfg.to_json())
        params, gflops = network_cost(cfg.network)
        unit = f"clip of {cfg.network.frames} frames" if cfg.network.frames else "image"
        click.echo(f"{cfg.network.arch}: {params / 1e6:.2f}M parameters, {gflops:.3g} GFLOPs per {unit} per forward pass", err=True)
        return
    from edmkit.training.loop import train as run_training  # heavy imports only when training

    name = Path(config_file).stem if config_file else preset
    run_dir = Path(run_dir or Path("runs") / "-".join([name] + [v for v in (overrides["arch"], overrides["ladder"], overrides["formulation"]) if v]))
    # DDP on CPU: 1x1-conv weight gradients come with other (equivalent) strides for their size-1 dims; harmless
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    try:
        state = run_training(cfg, run_dir, device=pick_device(device), force=force, progress=not quiet, log=click.echo, loggers=loggers)
    finally:
        dist.shutdown()  # leave torchrun's process group (a no-op in one process)
    if int(os.environ.get("RANK", "0")) > 0 or state.stop_signal:  # under torchrun only rank 0 reports; a stopped run said so
        return
    if state.stop_reason:
        click.echo(f"stopped early (--stop-when-flat): {state.stop_reason}")
    click.echo(f"done: {state.nimg} images in {state.totals['train_sec'] / 60:.1f} min of training; samples: "
               f"edmkit generate --checkpoint {run_dir} --n 64 --out grid.png")


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
    from edmkit.training.classifier import train_classifier

    check_output_target(Path(out))
    cfg = resolve_config(preset, data=data, batch=batch, seed=seed, classes=parse_int_list(classes, name="--classes"))
    result = train_classifier(cfg, out, nimg=nimg, lr=lr, force=force, device=pick_device(device), progress=not quiet, log=click.echo)
    click.echo(f"wrote {out} (EMA sigma_rel {result['ema_std']:g} after {result['nimg']} images; training state in {result['state_dir']})")


@main.command("train-autoencoder")
@click.option("--data", default="mnist5k", show_default=True, help='Images: "mnist5k" (embedded) or a path (folder, zip, npz, ...).')
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Run folder (re-running the same command resumes it).")
@click.option("--duration", "nimg", type=NIMG, default="20k", show_default=True, help="Training length in images, e.g. 20k.")
@click.option("--resolution", type=int, default=28, show_default=True, help="Image size the data is resized to (divisible by the factor).")
@click.option("--channels", type=click.Choice(["1", "3"]), default="1", show_default=True, help="Image channels.")
@click.option("--classes", default=None, help="Train on these classes only, e.g. 3,5.")
@click.option("--latent-channels", type=int, default=4, show_default=True, help="Channels of the latents.")
@click.option("--factor", type=click.Choice(["1", "2", "4", "8"]), default="2", show_default=True, help="Spatial downsampling of the latents.")
@click.option("--width", "model_channels", type=int, default=32, show_default=True, help="Channels at the first level.")
@click.option("--loss", type=click.Choice(["l1", "l2"]), default="l1", show_default=True, help="Reconstruction loss.")
@click.option("--kl-weight", type=float, default=1e-4, show_default=True, help="Weight of the KL term per latent element.")
@click.option("--batch", type=int, default=32, show_default=True, help="Images per step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for initialization, data order and posterior noise.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def train_autoencoder_cmd(data, run_dir, nimg, resolution, channels, classes, latent_channels, factor, model_channels, loss, kl_weight,
                          batch, lr, seed, quiet) -> None:
    """Train edmkit's small KL autoencoder, the latent space for `edmkit dataset convert --vae` (CPU-friendly, offline).

    Writes autoencoder.safetensors, recon.png (held-out images over their reconstructions) and report.json (held-out
    PSNR, and that of the mean image: the floor to beat) to the run folder; Ctrl-C saves, re-running resumes.

    \b
    Example:
      edmkit train-autoencoder --data mnist5k --run runs/ae --duration 20k
      edmkit dataset convert mnist5k digits-latents.npz --vae runs/ae/autoencoder.safetensors
      edmkit train --data digits-latents.npz --preset tiny --attn 7 --run runs/latent
    """
    from edmkit.latent.autoencoder import AEConfig
    from edmkit.training.autoencoder import train_autoencoder

    levels = {"1": (1,), "2": (1, 2), "4": (1, 2, 2), "8": (1, 2, 2, 4)}[factor]
    cfg = AEConfig(data=data, resolution=resolution, channels=int(channels), classes=tuple(parse_int_list(classes, name="--classes") or ()),
                   latent_channels=latent_channels, model_channels=model_channels, channel_mult=levels, loss=loss, kl_weight=kl_weight,
                   batch=batch, lr=lr, total_nimg=nimg, seed=seed)
    report = train_autoencoder(cfg, run_dir, progress=not quiet, log=click.echo)
    click.echo(f"done: {report['nimg']} images; held-out PSNR {report['psnr']:.2f} dB (mean image: {report['psnr_mean_image']:.2f} dB); "
               f"latents {'x'.join(map(str, report['latent_shape']))}; {run_dir}/autoencoder.safetensors")
