"""What the video checks say on known cases: flicker checks on bouncing digits, and VDM Eq. 7 guidance on a Gaussian clip.

1. Motion checks (``edmkit.metrics.video.motion_checks``) of bouncing-digit clips (2 embedded MNIST digits, 64x64,
   20 frames, 2.5 px/frame, overlap by max; a small generator here until the clips of ``data/`` are used), the same clips
   with their frames shuffled, and clips whose frames come from independent clips: the basis of ``FLICKER_LIMITS``.
2. Temporal extension of an exact AR(1) Gaussian clip (ρ = 0.9, T = 6, 2 known frames, Heun 24 steps): the largest error
   of the new frames' mean against the true conditional mean, for replacement alone (w_r = 0) and Eq. 7 guidance.
Writes ``docs/trials/video-metrics.json`` and prints a table.

    python benchmarks/video_metrics.py [--clips 64] [--out docs/trials/video-metrics.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from edmkit.data.dataset import load_dataset
from edmkit.diffusion.samplers import sample_heun
from edmkit.diffusion.schedules import karras_sigmas
from edmkit.diffusion.video import extension, sample_conditioned
from edmkit.metrics.detectors import load_detector
from edmkit.metrics.video import flicker_failures, motion_checks

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "trials" / "video-metrics.json"


def bouncing_digits(n: int, *, seed: int, frames: int = 20, size: int = 64, digits: int = 2, speed: float = 2.5) -> torch.Tensor:
    """uint8 [n, 1, T, S, S] of embedded digits moving at constant speed, reflected at the borders, combined by max."""
    images = load_dataset("mnist5k").images[:, 0].numpy()
    g = np.random.default_rng(seed)
    d = images.shape[-1]
    out = np.zeros((n, 1, frames, size, size), np.uint8)
    for i in range(n):
        for _ in range(digits):
            img, pos = images[g.integers(len(images))], g.uniform(0, size - d, 2)
            angle = g.uniform(0, 2 * np.pi)
            vel = speed * np.array([np.sin(angle), np.cos(angle)])
            for t in range(frames):
                r, c = (int(round(v)) for v in pos)
                np.maximum(out[i, 0, t, r:r + d, c:c + d], img, out=out[i, 0, t, r:r + d, c:c + d])
                pos = pos + vel
                low, high = pos < 0, pos > size - d
                pos = np.where(low, -pos, np.where(high, 2 * (size - d) - pos, pos))
                vel = np.where(low | high, -vel, vel)
    return torch.from_numpy(out)


def ar1_denoiser(rho: float, frames: int):
    idx = torch.arange(frames, dtype=torch.float64)
    cov = rho ** (idx[:, None] - idx[None]).abs()

    def denoise(x, sigma, labels):
        gain = cov @ torch.linalg.inv(cov + sigma.double().reshape(-1, 1, 1) ** 2 * torch.eye(frames, dtype=torch.float64))
        return torch.einsum("ntu,ncuhw->ncthw", gain.to(x.dtype), x)

    return denoise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args()
    start = time.monotonic()
    classifier = load_detector("mnist")
    real = bouncing_digits(a.clips, seed=a.seed)
    g = torch.Generator().manual_seed(a.seed)
    cases = {
        "real": real,
        "frames shuffled": real[:, :, torch.randperm(real.shape[2], generator=g)],
        "independent frames": torch.stack([real[torch.randperm(len(real), generator=g), :, t] for t in range(real.shape[2])], dim=2),
    }
    motion = {}
    for name, clips in cases.items():
        checks = motion_checks(clips, classifier=classifier)
        motion[name] = dict(checks, flicker=flicker_failures(checks))
        print(f"{name:20s} " + "  ".join(f"{k} {v:.3f}" for k, v in checks.items()) + f"  flicker: {motion[name]['flicker'] or 'none'}")

    rho, frames, n = 0.9, 6, 4000
    known = torch.full((n, 1, 2, 1, 1), 1.5)
    exact = 1.5 * rho ** torch.arange(1, frames - 1, dtype=torch.float32)
    guidance = {}
    for w_r in (0.0, 1.0, 2.0, 4.0, 8.0, 16.0):
        noise = torch.randn(n, 1, frames, 1, 1, generator=torch.Generator().manual_seed(a.seed))
        x = sample_conditioned(sample_heun, ar1_denoiser(rho, frames), extension(known, frames=frames), noise=noise, sigmas=karras_sigmas(24),
                               w_r=w_r)
        guidance[str(w_r)] = err = float((x[:, 0, 2:, 0, 0].mean(0) - exact).abs().max())
        print(f"extension w_r = {w_r:4g}: max |mean − E[x_t | known]| = {err:.3f}")
    result = dict(motion=motion, extension_mean_error=guidance, clips=a.clips, seed=a.seed, time_sec=time.monotonic() - start)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out} ({result['time_sec']:.0f} s)")


if __name__ == "__main__":
    main()
