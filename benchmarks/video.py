"""Joint image-video training on vs off at the same CPU time on Moving MNIST, and the cost of the temporal blocks.

Steps (one process, one torch thread, runs one after the other, so the two arms see the same machine):
1. For ``image_frames`` = 0 (clips only) and = K (each clip plus K independent frames of other clips, segment-masked;
   Ho et al. 2022 Sec. 3), measure the training speed of the ``--preset`` (video-unet) on a short probe run, then train
   a fresh run for the clips that fit ``--minutes`` at that speed (on a machine whose load changes the two training
   times differ: both are reported). ``clips`` counts training examples (one clip each, appended images not counted).
2. Score each run's sampling EMA by the lambda(sigma)-weighted denoising error per sigma on held-out clips
   (``training.validation.make_probe`` / ``probe_loss``: clips of another Moving-MNIST seed, the same sigmas, which are
   the quantiles of the training density, and the same noise for both arms), and by the motion checks
   (``metrics.video.motion_checks``, ``flicker_failures``) of ``--samples`` sampled clips (Heun, ``--steps``), beside
   those of the held-out real clips.
3. Cost per clip of the temporal blocks: inference forward time of the video-unet backbone per clip against its own
   spatial U-Net on the same frames folded into the batch, with no temporal block (``UNet.trunk`` without the hook),
   at T frames and at T + K frames (a joint-training example).

Writes ``<out>/bench.json``, each arm's samples as ``<out>/samples-k<K>.gif``, and prints a markdown table.

    python benchmarks/video.py --minutes 3 --image-frames 4 --out docs/video
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edmkit import checkpoint as ckpt
from edmkit.data.dataset import dataset_of
from edmkit.data.images import float_to_images
from edmkit.data.videos import save_clip_grid_gif
from edmkit.diffusion.loss import make_loss
from edmkit.metrics.detectors import load_detector
from edmkit.metrics.video import flicker_failures, motion_checks
from edmkit.nn.video import VideoUNet
from edmkit.presets import resolve_config
from edmkit.sampling.generate import generate_images
from edmkit.training.loop import train
from edmkit.training.validation import make_probe, probe_loss

QUIET = dict(progress=False, log=lambda s: None)


def run_for(cfg, run: Path, minutes: float, probe_steps: int) -> dict:
    """Measure clips/s on a short run, then train a fresh run for ``minutes`` of training time."""
    probe = train(cfg.override("train", total_nimg=cfg.train.batch * probe_steps), run.with_name(run.name + "-probe"), force=True, **QUIET)
    speed = probe.nimg / probe.totals["train_sec"]
    nimg = max(cfg.train.batch, int(speed * minutes * 60) // cfg.train.batch * cfg.train.batch)
    state = train(cfg.override("train", total_nimg=nimg), run, force=True, **QUIET)
    return {"clips": state.nimg, "train_sec": state.totals["train_sec"], "clips_per_sec": state.nimg / state.totals["train_sec"]}


def backbone_of(net: torch.nn.Module) -> VideoUNet:
    return next(m for m in net.modules() if isinstance(m, VideoUNet))


@torch.inference_mode()
def forward_ms_per_clip(video: VideoUNet, *, channels: int, resolution: int, clips: int, frames: int, reps: int) -> tuple[float, float]:
    """(video-unet, spatial U-Net alone) forward milliseconds per clip of ``frames`` frames, batch ``clips``, best of ``reps``."""
    s = video.spatial
    x = torch.randn(clips, channels, frames, resolution, resolution)
    c_noise = torch.zeros(clips)
    folded = x.transpose(1, 2).reshape(clips * frames, channels, resolution, resolution)  # the same frames, no time axis

    def spatial():
        emb = s._embedding(c_noise, None, batch=clips, device=x.device).repeat_interleave(frames, dim=0)
        return s.trunk(folded, emb)

    times = {}
    for name, fn in (("video", lambda: video(x, c_noise)), ("spatial", spatial)):
        fn()  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        times[name] = 1000 * best / clips
    return times["video"], times["spatial"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="movingmnist")
    ap.add_argument("--minutes", type=float, default=3.0, help="training time of each arm")
    ap.add_argument("--image-frames", type=int, default=4, help="K of the joint arm")
    ap.add_argument("--probe-steps", type=int, default=4, help="training steps of each speed probe")
    ap.add_argument("--held", type=int, default=32, help="held-out clips of the denoising loss")
    ap.add_argument("--sigmas", type=int, default=6, help="noise levels of the denoising loss")
    ap.add_argument("--samples", type=int, default=8, help="sampled clips per arm for the motion checks")
    ap.add_argument("--steps", type=int, default=18, help="Heun steps of the samples")
    ap.add_argument("--reps", type=int, default=5, help="timed forwards of the cost measurement")
    ap.add_argument("--out", type=Path, default=Path("docs/video"))
    ap.add_argument("--runs", type=Path, default=Path("runs/video-bench"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    base = resolve_config(args.preset)
    n = base.network
    result: dict = {"preset": args.preset, "minutes": args.minutes, "image_frames": args.image_frames, "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "batch": base.train.batch, "frames": n.frames, "resolution": n.resolution}

    loss_fn = make_loss(base)
    held = dataset_of(base, source=f"movingmnist:clips={args.held},seed=999")  # not among the training clips (seed 0)
    probe = make_probe(held, torch.arange(args.held), label_dim=0, sigmas=loss_fn.sigma_quantiles(args.sigmas), noise_seed=1)
    result["sigma"] = list(probe.sigmas)
    classifier = load_detector("mnist")
    real = held.images[: args.samples]
    result["real_motion"] = motion_checks(real, classifier=classifier)

    arms = {"clips only": 0, f"joint (K={args.image_frames})": args.image_frames}
    result["arms"] = {}
    for name, K in arms.items():
        cfg = base.override("train", image_frames=K, grid_nimg=10**12, state_nimg=10**12, status_nimg=10**12)
        rec = run_for(cfg, args.runs / f"k{K}", args.minutes, args.probe_steps)
        net, _ = ckpt.load_network(ckpt.find_network(args.runs / f"k{K}"))
        per_sigma = probe_loss(net, loss_fn, probe, batch=8)
        rec["loss_per_sigma"], rec["loss"] = per_sigma.tolist(), per_sigma.mean().item()
        t = time.perf_counter()
        x = generate_images(net, seeds=range(args.samples), resolution=n.resolution, channels=n.channels, frames=n.frames,
                            steps=args.steps, batch=args.samples)
        rec["sample_sec"] = time.perf_counter() - t
        save_clip_grid_gif(x, args.out / f"samples-k{K}.gif")
        rec["motion"] = motion_checks(float_to_images(x), classifier=classifier)
        rec["flicker"] = flicker_failures(rec["motion"])
        result["arms"][name] = rec
        print(name, json.dumps(rec), flush=True)

    video = backbone_of(ckpt.build_denoiser(base)).eval()
    result["temporal_params"] = sum(p.numel() for p in video.temporal.parameters())
    result["params"] = sum(p.numel() for p in video.parameters())
    result["cost_ms_per_clip"] = {}
    for frames in (n.frames, n.frames + args.image_frames):
        v, s = forward_ms_per_clip(video, channels=n.channels, resolution=n.resolution, clips=base.train.batch, frames=frames, reps=args.reps)
        result["cost_ms_per_clip"][str(frames)] = {"video_unet": v, "spatial_only": s, "temporal_share": (v - s) / v}
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(r: dict) -> str:
    sig = " / ".join(f"{s:.2g}" for s in r["sigma"])
    lines = [f"| arm | clips trained | train s | held-out loss (mean) | loss per σ ({sig}) | mass_cv | count_changes | accel | identity | flicker |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in r["arms"].items():
        m = a["motion"]
        lines.append(f"| {name} | {a['clips']} | {a['train_sec']:.0f} | {a['loss']:.4f} | {' / '.join(f'{v:.3f}' for v in a['loss_per_sigma'])} | "
                     f"{m['mass_cv']:.3f} | {m['count_changes']:.3f} | {m['acceleration']:.2f} | {m['identity']:.2f} | {', '.join(a['flicker']) or 'none'} |")
    m = r["real_motion"]
    lines.append(f"| real held-out clips | - | - | - | - | {m['mass_cv']:.3f} | {m['count_changes']:.3f} | {m['acceleration']:.2f} | "
                 f"{m['identity']:.2f} | {', '.join(flicker_failures(m)) or 'none'} |")
    lines += ["", "| frames per example | video-unet ms/clip | spatial U-Net only ms/clip | temporal blocks' share |", "|---|---|---|---|"]
    for frames, c in r["cost_ms_per_clip"].items():
        lines.append(f"| {frames} | {c['video_unet']:.1f} | {c['spatial_only']:.1f} | {100 * c['temporal_share']:.0f}% |")
    lines.append(f"\ntemporal blocks: {r['temporal_params']:,} of {r['params']:,} parameters")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
