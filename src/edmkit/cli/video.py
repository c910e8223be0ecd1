"""``edmkit video``: temporal extension, frame interpolation, per-frame super-resolution and long clips with a video network.

The math is :mod:`edmkit.diffusion.video` (replacement plus VDM Eq. 7 reconstruction guidance, autoregressive windows);
this module reads the clips (:mod:`edmkit.data.videos`), draws seeded noise per clip (``SeededRandn``) and writes the
result with ``generate``'s clip writers.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch
from tqdm.auto import tqdm

from edmkit.cli._common import check_output_target, main, pick_device, user_errors
from edmkit.cli.generate import check_video_options, write_clips


@main.command()
@click.option("--checkpoint", required=True, help="A video network's .safetensors file or run folder (--arch video-unet).")
@click.option("--extend", "extend_source", type=click.Path(), default=None, help="Temporal extension: clips (.npz with 'videos' or a folder of GIFs) whose first --known frames are kept.")
@click.option("--known", type=int, default=None, help="--extend: frames K taken from the start of each input clip (default: all its frames).")
@click.option("--interpolate", "interpolate_source", type=click.Path(), default=None, help="Frame interpolation: clips whose frames become frames 0, k, 2k, ... of the output (k = --every).")
@click.option("--every", type=int, default=2, show_default=True, help="--interpolate: spacing k of the known frames ((K - 1) * k + 1 frames out).")
@click.option("--sr", "sr_source", type=click.Path(), default=None, help="Per-frame super-resolution: clips at 1/--scale of the network's size; every output frame box-averages to its input frame.")
@click.option("--scale", type=int, default=None, help="--sr: upscaling factor s, input frames of resolution/s pixels (default 2).")
@click.option("--long", "long_frames", type=int, default=None, help="Autoregressive long clips from noise: total frames T (windows of --frames overlapping by --overlap).")
@click.option("--overlap", type=int, default=None, help="--long: frames k each window shares with the previous one (default: half a window).")
@click.option("--frames", type=int, default=None, help="--extend: total frames T per output clip; --long: the window (default: the network's training length).")
@click.option("--n", "n", type=int, default=4, show_default=True, help="--long: number of clips.")
@click.option("--seed", type=int, default=0, show_default=True, help="Clip i uses noise seed --seed + i.")
@click.option("--w-r", "w_r", type=float, default=4.0, show_default=True, help="Reconstruction-guidance weight w_r of the new frames (VDM Eq. 7); 0 = replacement only (no gradients, faster).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="clips.gif (a grid of playing clips), clips.npz ('videos' uint8 [N, T, H, W(, C)]) or strip.png.")
@click.option("--steps", type=int, default=None, help="Sampler steps (default: the run's, else 18).")
@click.option("--sampler", default=None, help="heun, euler, ddim, ddpm, dpmpp-2m, dpmpp-3m (default: the run's sampler; the movingmnist presets: heun).")
@click.option("--schedule", default=None, help="Noise levels: karras, loglinear, vp (default: the run's).")
@click.option("--class", "class_idx", type=int, default=None, help="Class label for conditional models (default: drawn per seed).")
@click.option("--batch", type=int, default=16, show_default=True, help="Clips per batch (does not change the clips).")
@click.option("--ema", "ema_std", type=float, default=None, help="With a run folder: EMA sigma_rel of the network to use.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@user_errors
def video(checkpoint, extend_source, known, interpolate_source, every, sr_source, scale, long_frames, overlap, frames, n, seed, w_r, out, steps, sampler,
          schedule, class_idx, batch, ema_std, device) -> None:
    """Extend, interpolate, super-resolve or lengthen clips with a video network; what is known is kept exactly.

    \b
    Examples:
      edmkit video --checkpoint runs/movingmnist --extend clips.npz --known 4 --frames 12 --out extended.gif
      edmkit video --checkpoint runs/movingmnist --extend gifs/ --known 4 --frames 12 --w-r 0 --sampler euler --steps 32 --out ext.npz
      edmkit video --checkpoint runs/movingmnist --interpolate clips.npz --every 2 --out smooth.gif
      edmkit video --checkpoint runs/movingmnist --sr small.npz --scale 2 --out sharp.gif
      edmkit video --checkpoint runs/movingmnist --long 40 --overlap 4 --n 4 --out long.gif
    """
    from edmkit.checkpoint import find_network, load_network
    from edmkit.diffusion.samplers import get_sampler
    from edmkit.sampling.generate import run_sampling, sampling_sigmas

    if sum(x is not None for x in (extend_source, interpolate_source, sr_source, long_frames)) != 1:
        raise ValueError("give exactly one of --extend CLIPS, --interpolate CLIPS, --sr CLIPS or --long T")
    if batch < 1 or n < 1:
        raise ValueError("--batch and --n must be >= 1")
    for option, value, mode in (("--known", known, extend_source), ("--frames", frames, extend_source or long_frames),
                                ("--overlap", overlap, long_frames), ("--scale", scale, sr_source)):
        if value is not None and mode is None:
            raise ValueError(f"{option} does not apply to this mode (see edmkit video --help)")
    out = Path(out)
    check_output_target(out)
    if sampler is not None:
        get_sampler(sampler)  # an unknown name is a one-line error before the network loads
    dev = pick_device(device)
    path = find_network(checkpoint, ema_std=ema_std)
    net, meta = load_network(path, device=dev)
    cfg, c = meta["config"], meta["config"].network
    if not c.frames:
        raise ValueError(f"{path.name} is an image network; edmkit video needs a video network (trained with --arch video-unet)")
    if class_idx is not None and not (c.label_dim and 0 <= class_idx < c.label_dim):
        raise ValueError(f"--class {class_idx}: the network has {c.label_dim} classes" if c.label_dim else "--class: the network is unconditional")
    window = check_video_options(c, frames=frames, out=out, gif=None, classifier=None)
    sampler_kw = run_sampling(cfg, sampler, steps, schedule=schedule)
    sample = get_sampler(sampler_kw.pop("sampler"))
    sampler_kw["sigmas"] = sampling_sigmas(sampler_kw.pop("schedule"), sampler_kw.pop("steps"), device=dev)
    label_kw = dict(label_dim=c.label_dim, class_idx=class_idx)
    if long_frames is not None:
        k = window // 2 if overlap is None else overlap
        seeds = list(range(seed, seed + n))
        x = long_clips(net, sample, seeds=seeds, shape=(c.channels, window, c.resolution, c.resolution), total=long_frames, overlap=k,
                       w_r=w_r, batch=batch, device=dev, **label_kw, **sampler_kw)
        what = f"{n} clips of {long_frames} frames ({window}-frame windows overlapping by {k})"
    else:
        source = extend_source or interpolate_source or sr_source
        scale = 2 if scale is None else scale
        if sr_source and (scale < 2 or c.resolution % scale):
            raise ValueError(f"--scale must be >= 2 and divide the network's resolution {c.resolution}, got {scale}")
        clips = read_input_clips(source, resolution=c.resolution // scale if sr_source else c.resolution, channels=c.channels)
        if extend_source:
            known = clips.shape[2] if known is None else known
            if not 1 <= known <= clips.shape[2]:
                raise ValueError(f"--known must be in [1, {clips.shape[2]}] (the input clips' frames), got {known}")
            if known >= window:
                raise ValueError(f"--known ({known}) must be below --frames ({window}): nothing to sample")
            clips = clips[:, :, :known]
        task = dict(frames=window) if extend_source else dict(every=every) if interpolate_source else dict(scale=scale)
        seeds = list(range(seed, seed + len(clips)))
        x = conditioned_clips(net, sample, clips, seeds=seeds, task=task, w_r=w_r, batch=batch, device=dev, **label_kw, **sampler_kw)
        known_what = f"{clips.shape[-1]}x{clips.shape[-1]} frames" if sr_source else f"{clips.shape[2]} known"
        what = f"{len(clips)} clips of {x.shape[2]} frames ({known_what}, from {source})"
    write_clips(x, out, seeds=seeds)
    click.echo(f"wrote {what} to {out}")


def read_input_clips(source: str, *, resolution: int, channels: int) -> torch.Tensor:
    """Clips of ``source`` (npz or GIF folder) as float [N, C, T, H, W] in [-1, 1], checked against the network's size."""
    from edmkit.data.images import images_to_float
    from edmkit.data.videos import read_clips

    if not Path(source).expanduser().exists():
        raise OSError(f"{source}: no such clips file (.npz) or folder of GIFs")
    clips, _, name = read_clips(source)  # uint8 [N, T, H, W, C]
    _, _, h, w, ch = clips.shape
    if (h, w, ch) != (resolution, resolution, channels):
        raise ValueError(f"{name}: clips are {w}x{h}x{ch}; the network takes {resolution}x{resolution}x{channels}")
    return images_to_float(torch.from_numpy(clips).permute(0, 4, 1, 2, 3).contiguous())


def conditioned_clips(net, sample, clips: torch.Tensor, *, seeds: list[int], task: dict, w_r: float, batch: int, device,
                      label_dim: int, class_idx: int | None, **sampler_kw) -> torch.Tensor:
    """Extension (``task`` = {frames: T}), interpolation ({every: k}) or per-frame super-resolution ({scale: s}) of
    `clips` [N, C, K, H, W], batch by batch; clip i's noise comes from ``seeds[i]`` only. Returns float32 [N, C, T, H, W]
    on the CPU."""
    from edmkit.diffusion.samplers import SeededRandn
    from edmkit.diffusion.video import extension, frame_super_resolution, interpolation, sample_conditioned
    from edmkit.sampling.generate import class_labels

    make = {"frames": extension, "every": interpolation, "scale": frame_super_resolution}[next(iter(task))]
    make(clips[:1], **task)  # a bad --every / --frames / --scale is a one-line error before any sampling (and its progress bar)
    out = []
    for start in tqdm(range(0, len(clips), batch), desc="video", unit="batch"):
        part, part_seeds = clips[start:start + batch].to(device), seeds[start:start + batch]
        m = make(part, **task)
        rnd = SeededRandn(part_seeds, device=device)
        labels = class_labels(part_seeds, label_dim=label_dim, class_idx=class_idx, device=device) if label_dim else None
        x = sample_conditioned(sample, net, m, noise=rnd.randn(m.y_full.shape[1:]), w_r=w_r, labels=labels, randn=rnd, **sampler_kw)
        out.append(x.to("cpu", torch.float32))
    return torch.cat(out)


def long_clips(net, sample, *, seeds: list[int], shape: tuple[int, int, int, int], total: int, overlap: int, w_r: float, batch: int,
               device, label_dim: int, class_idx: int | None, **sampler_kw) -> torch.Tensor:
    """Autoregressive clips of `total` frames from noise, windows of `shape` = (C, T, H, W); clip i depends on ``seeds[i]`` only."""
    from edmkit.diffusion.samplers import SeededRandn
    from edmkit.diffusion.video import sample_long, window_starts
    from edmkit.sampling.generate import class_labels

    window_starts(total, window=shape[1], overlap=overlap)  # a bad --long / --overlap is a one-line error before any sampling
    out = []
    for start in tqdm(range(0, len(seeds), batch), desc="video", unit="batch"):
        part_seeds = seeds[start:start + batch]
        labels = class_labels(part_seeds, label_dim=label_dim, class_idx=class_idx, device=device) if label_dim else None
        x = sample_long(sample, net, shape=(len(part_seeds), *shape), total=total, overlap=overlap, w_r=w_r, labels=labels,
                        randn=SeededRandn(part_seeds, device=device), device=device, **sampler_kw)
        out.append(x.to("cpu", torch.float32))
    return torch.cat(out)
