"""The ``edmkit`` command line: train, generate.

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

from edmkit.config import DEFAULT_PRESET, PRESETS, ExperimentConfig, get_preset, parse_nimg


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
@click.option("--run", "run_dir", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<preset>). Re-running the same command resumes from its newest state.")
@click.option("--data", default=None, help='Dataset: "mnist5k" (embedded, no download) or a path (folder, zip, npz, MNIST idx, CIFAR tarball).')
@click.option("--resolution", type=int, default=None, help="Train at this square image size (data are resized to it).")
@click.option("--batch", type=int, default=None, help="Global batch size.")
@click.option("--duration", "total_nimg", type=NIMG, default=None, help="Training length in images, e.g. 80k, 2Mi.")
@click.option("--lr", type=float, default=None, help="Reference learning rate (Adam).")
@click.option("--seed", type=int, default=None, help="Seed for initialization, data order and noise.")
@click.option("--cond/--uncond", default=None, help="Class-conditional on the dataset's labels (default: the preset's).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--force", is_flag=True, help="Continue a run folder even though its config differs.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit without training.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def train(preset, run_dir, data, resolution, batch, total_nimg, lr, seed, cond, device, force, dry_run, quiet) -> None:
    """Train a diffusion model; writes config.json, stats.jsonl, sample grids, network snapshots and resumable states."""
    cfg = resolve_train_config(get_preset(preset), data=data, resolution=resolution, batch=batch, total_nimg=total_nimg, lr=lr, seed=seed, cond=cond)
    if dry_run:
        click.echo(cfg.to_json())
        return
    from edmkit.train import train as run_training  # heavy imports only when training

    run_dir = Path(run_dir or Path("runs") / preset)
    state = run_training(cfg, run_dir, device=pick_device(device), force=force, progress=not quiet, log=click.echo)
    click.echo(f"done: {state.nimg} images in {state.totals['train_sec'] / 60:.1f} min of training; samples: "
               f"edmkit generate --checkpoint {run_dir} --n 64 --out grid.png")


def resolve_train_config(cfg: ExperimentConfig, *, data=None, resolution=None, batch=None, total_nimg=None, lr=None, seed=None, cond=None) -> ExperimentConfig:
    """Apply command-line overrides (``None`` = keep the preset's value)."""
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
    return cfg


@main.command()
@click.option("--checkpoint", required=True, help="A network .safetensors file or a run folder (its newest network with the run's sampling EMA).")
@click.option("--out", required=True, type=click.Path(), help="grid.png (one grid), images.npz (uint8 array) or a folder (one PNG per seed).")
@click.option("--n", "n", type=int, default=None, help="Number of images (seeds 0..n-1). Default 64.")
@click.option("--seeds", default=None, help="Explicit seeds, e.g. 0-63 or 1,5,9 (instead of --n).")
@click.option("--steps", type=int, default=18, show_default=True, help="Sampler steps (Heun: 2*steps-1 network evaluations).")
@click.option("--sampler", default="heun", show_default=True, help="heun, euler, ddim, ddpm, dpmpp-2m.")
@click.option("--class", "class_idx", type=int, default=None, help="Class label for conditional models (default: drawn per seed).")
@click.option("--ema", "ema_std", type=float, default=None, help="With a run folder: EMA sigma_rel of the network to use (0 = raw weights).")
@click.option("--batch", type=int, default=64, show_default=True, help="Images per batch (does not change the images).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@user_errors
def generate(checkpoint, out, n, seeds, steps, sampler, class_idx, ema_std, batch, device) -> None:
    """Sample images; image k depends only on its seed, whatever the batch size."""
    from edmkit.checkpoint import find_network, load_network
    from edmkit.generate import generate_images, parse_seeds

    if n is not None and seeds is not None:
        raise ValueError("give --n or --seeds, not both")
    seed_list = parse_seeds(seeds) if seeds else list(range(64 if n is None else n))
    if n is not None and n < 1:
        raise ValueError("--n must be >= 1")
    check_output_target(Path(out))
    dev = pick_device(device)
    path = find_network(checkpoint, ema_std=ema_std)
    net, meta = load_network(path, device=dev)
    c = meta["config"].network
    click.echo(f"{path.name}: {meta['nimg']} images, EMA {meta['ema_std']:g}, {c.resolution}x{c.resolution}x{c.channels}")
    x = generate_images(net, seeds=seed_list, resolution=c.resolution, channels=c.channels, label_dim=c.label_dim,
                        class_idx=class_idx, sampler=sampler, steps=steps, batch=batch, device=dev, progress=True)
    write_images(x, Path(out), seeds=seed_list)
    click.echo(f"wrote {len(seed_list)} images to {out}")


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


if __name__ == "__main__":
    main()
