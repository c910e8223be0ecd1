"""Trials behind the default `mnist` preset: what gives recognisable digits in 15 minutes on 2 CPU cores.

Each trial is the `mnist` preset with a few overrides and a budget in images (set from the measured
throughput so that training takes at most ~15 minutes on the reference machine). After training it writes
one grid per network file of the final image count (raw weights and each tracked EMA) so the EMA
choice can be compared by eye.

    python benchmarks/mnist_recipe.py TRIAL [TRIAL ...] [--threads N] [--out runs/trials]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edmkit import checkpoint as ckpt
from edmkit.data.images import save_image_grid
from edmkit.presets import get_preset
from edmkit.sampling.generate import generate_images
from edmkit.training.loop import train

SMALL = dict(model_channels=16, channel_mult=(1, 2, 4), num_blocks=1, channels_per_head=32)
TRIALS: dict[str, dict] = {
    # name: {section: {field: value}}
    "small-b32": dict(network=SMALL, optim=dict(lr_ref_nimg=20_000), train=dict(batch=32, total_nimg=120_000)),
    "small-b32-wideP": dict(network=SMALL, loss=dict(P_mean=-0.8, P_std=1.6), optim=dict(lr_ref_nimg=20_000), train=dict(batch=32, total_nimg=120_000)),
    "small-b16": dict(network=SMALL, optim=dict(lr_ref_nimg=20_000), train=dict(batch=16, total_nimg=100_000)),
    "mid-b32": dict(network=dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=1), optim=dict(lr_ref_nimg=20_000), train=dict(batch=32, total_nimg=55_000)),
    "small-b32-lr003": dict(network=SMALL, optim=dict(lr=0.003, lr_ref_nimg=40_000), train=dict(batch=32, total_nimg=120_000)),
}


def trial_config(name: str):
    cfg = get_preset("mnist")
    for section, changes in TRIALS[name].items():
        cfg = cfg.override(section, **changes)
    return cfg.override("train", grid_nimg=10**12)  # grids only at the end


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trials", nargs="+", choices=list(TRIALS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/trials")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.trials:
        cfg = trial_config(name)
        run = Path(args.out) / name
        t0 = time.perf_counter()
        state = train(cfg, run, progress=False, log=print)
        wall = time.perf_counter() - t0
        result = {"trial": name, "nimg": state.nimg, "train_sec": state.totals["train_sec"], "wall_sec": wall,
                  "img_per_sec": state.nimg / state.totals["train_sec"], "last_stats": json.loads((run / "stats.jsonl").read_text().splitlines()[-1])}
        for std in (0.0, *cfg.ema.stds):
            net, _ = ckpt.load_network(ckpt.network_path(run, state.nimg, std))
            x = generate_images(net, seeds=range(64), resolution=28, channels=1, steps=18)
            save_image_grid(x, run / f"final-ema{std:.3f}.png")
        print(json.dumps(result))
        with open(Path(args.out) / "results.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
