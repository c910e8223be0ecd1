"""The ``edmkit`` command line: train, generate, phema.

Library code raises ValueError / OSError; this module alone turns them into one-line errors with a
non-zero exit code and sets ``torch.backends`` flags.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click
import torch

from edmkit.config import DEFAULT_PRESET, FORMULATIONS, LADDER, PRESETS, ExperimentConfig, get_preset, parse_nimg, resolve_formulation, resolve_ladder


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
@click.option("--run", "run_dir", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<preset>[-<config>][-<formulation>]). Re-running the same command resumes from its newest state.")
@click.option("--data", default=None, help='Dataset: "mnist5k" (embedded, no download) or a path (folder, zip, npz, MNIST idx, CIFAR tarball).')
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
@user_errors
def train(preset, ladder, formulation, run_dir, data, resolution, batch, total_nimg, lr, seed, cond, p_uncond, device, force, dry_run, quiet) -> None:
    """Train a diffusion model; writes config.json, stats.jsonl, sample grids, network snapshots and resumable states."""
    cfg = resolve_train_config(get_preset(preset), ladder=ladder, formulation=formulation, data=data, resolution=resolution, batch=batch,
                               total_nimg=total_nimg, lr=lr, seed=seed, cond=cond, p_uncond=p_uncond)
    if dry_run:
        click.echo(cfg.to_json())
        return
    from edmkit.train import train as run_training  # heavy imports only when training

    run_dir = Path(run_dir or Path("runs") / "-".join([preset] + [v for v in (ladder, formulation) if v]))
    state = run_training(cfg, run_dir, device=pick_device(device), force=force, progress=not quiet, log=click.echo)
    click.echo(f"done: {state.nimg} images in {state.totals['train_sec'] / 60:.1f} min of training; samples: "
               f"edmkit generate --checkpoint {run_dir} --n 64 --out grid.png")


def resolve_train_config(cfg: ExperimentConfig, *, ladder=None, formulation=None, data=None, resolution=None, batch=None, total_nimg=None, lr=None,
                         seed=None, cond=None, p_uncond=None) -> ExperimentConfig:
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
    train_kw = {k: v for k, v in dict(data=data, batch=batch, total_nimg=total_nimg, seed=seed).items() if v is not None}
    if train_kw:
        cfg = cfg.override("train", **train_kw)
    if lr is not None:
        cfg = cfg.override("optim", lr=lr)
    if cond is not None:
        label_dim = 0
        if cond:
            from edmkit.data import load_dataset

            label_dim = load_dataset(cfg.train.data).num_classes
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
@click.option("--batch", type=int, default=64, show_default=True, help="Images per batch (does not change the images).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@user_errors
def generate(checkpoint, out, n, seeds, steps, sampler, schedule, S_churn, S_tmin, S_tmax, S_noise, eta, class_idx, guidance,
             guide_checkpoint, guide_ema, interval, oscillate, oscillate_warmup, threshold, gif, gif_n, ema_std, batch, device) -> None:
    """Sample images; image k depends only on its seed, whatever the batch size.

    \b
    Examples:
      edmkit generate --checkpoint runs/mnist --out grid.png --sampler heun --steps 18 --churn 10
      edmkit generate --checkpoint runs/cond --out grid.png --class 3 --guidance 2 --interval 0.3,5
      edmkit generate --checkpoint runs/big --guide-checkpoint runs/small --guidance 1.5 --out grid.png --gif reverse.gif
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
    recorder = ReverseProcessRecorder(num=min(gif_n, len(seed_list)), sigma_data=c.sigma_data) if gif else None
    x = generate_images(net, seeds=seed_list, resolution=c.resolution, channels=c.channels, label_dim=c.label_dim,
                        class_idx=class_idx, sampler=sampler, steps=steps, schedule=schedule, guide=guide, batch=batch,
                        device=dev, progress=True, callback=recorder, **guidance_kw, **sampler_kw)
    write_images(x, Path(out), seeds=seed_list)
    click.echo(f"wrote {len(seed_list)} images to {out}")
    if recorder is not None:
        recorder.save(gif)
        click.echo(f"wrote the reverse process of {recorder.num} images ({len(recorder.steps)} steps) to {gif}")


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


if __name__ == "__main__":
    main()
