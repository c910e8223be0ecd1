"""What the `movingmnist` CPU preset learns: motion checks of its samples against real and frame-shuffled clips (issue 22).

Samples `--n` clips (seeds 0..n-1) from a finished run with the run's own sampling setting and scores them, real clips of
the same synthetic data and those real clips with every frame drawn from another clip (content with no motion) with
`edmkit.metrics.video.motion_checks` (digit mass variation, blob-count changes, centroid acceleration, digit identity
with the built-in digit detector) and the mean correlation of consecutive frames. Writes `preset.json` (with the run's
length and speed from its stats.jsonl) and `preset-samples.gif` to --out.

    python benchmarks/movingmnist_preset.py runs/movingmnist --n 64 --out docs/video
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edmkit.checkpoint import find_network, load_network
from edmkit.data.dataset import dataset_of
from edmkit.data.videos import clips_uint8, save_clip_grid_gif
from edmkit.metrics.detectors import load_detector
from edmkit.metrics.video import intensity, motion_checks
from edmkit.sampling.generate import describe_sampling, generate_images, run_sampling


def consecutive_correlation(clips: torch.Tensor) -> float:
    """Mean Pearson correlation of frame t and t+1 over clips and t: uint8 [N, C, T, H, W] -> float."""
    x = intensity(clips).flatten(2)  # [N, T, H·W]
    x = x - x.mean(-1, keepdim=True)
    a, b = x[:, :-1], x[:, 1:]
    corr = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)
    return float(corr.mean())


def shuffled_frames(clips: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Frame t of clip i taken from clip perm_t(i): the same frames, no motion between them."""
    g = torch.Generator().manual_seed(seed)
    n, t = clips.shape[0], clips.shape[2]
    return torch.stack([clips[torch.randperm(n, generator=g), :, k] for k in range(t)], dim=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished movingmnist run folder")
    ap.add_argument("--n", type=int, default=64, help="clips per set")
    ap.add_argument("--out", type=Path, default=Path("docs/video"))
    a = ap.parse_args()
    path = find_network(a.run)
    net, meta = load_network(path)
    cfg, c = meta["config"], meta["config"].network
    setting = run_sampling(cfg)
    start = time.perf_counter()
    gen = clips_uint8(generate_images(net, seeds=range(a.n), resolution=c.resolution, channels=c.channels, label_dim=c.label_dim,
                                      frames=c.frames, **setting))
    sample_sec = time.perf_counter() - start
    real = dataset_of(cfg).images[-a.n:]  # the synthetic data's last clips (training draws from all of them)
    digits = load_detector("mnist")
    sets = {"samples": gen, "real": real, "real, frames shuffled across clips": shuffled_frames(real)}
    rows = {name: {**motion_checks(x, classifier=digits), "consecutive_corr": consecutive_correlation(x)} for name, x in sets.items()}
    stats = [json.loads(line) for line in (a.run / "stats.jsonl").read_text().splitlines() if line.strip()]
    train = [s for s in stats if s.get("kind") == "train"][-1]
    result = {"run": str(a.run), "network": path.name, "nimg": meta["nimg"], "ema_std": meta["ema_std"], "train_sec": train["train_sec"],
              "clips_per_sec": round(train["nimg"] / train["train_sec"], 2), "sampling": describe_sampling(setting), "n": a.n,
              "sample_sec": round(sample_sec, 1), "checks": {k: {m: round(v, 4) for m, v in r.items()} for k, r in rows.items()}}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "preset.json").write_text(json.dumps(result, indent=1) + "\n")
    save_clip_grid_gif(gen[:16], a.out / "preset-samples.gif", nrow=4)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
