"""Trials behind the default `mnist` preset: what gives recognisable digits in 15 minutes on 2 CPU cores.

Each trial is the `mnist` preset with a few overrides and a budget in images (set from the measured
throughput so that training takes at most ~15 minutes on the reference machine). After training it writes
one grid per network file of the final image count (raw weights and each tracked EMA) so the EMA
choice can be compared by eye. With --fid N it also scores the EMA network (σ_rel 0.05, the end-of-training choice
off so every trial is scored alike) with the built-in digit detector's FID at n = N, sampled with --setting (one of
benchmarks/mnist_sampling.py's), and appends the row to results.jsonl.

The `screen-*` trials (issue 21, item 2) change one training knob of today's preset each, at a third of its budget
(36k images), so a dozen fit in the time of a few full runs; they rank knobs, the full run confirms.

    python benchmarks/mnist_recipe.py TRIAL [TRIAL ...] [--threads N] [--out runs/trials] [--fid 2000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from mnist_sampling import SETTINGS, nfe  # benchmarks/ is on sys.path when this script runs

from edmkit import checkpoint as ckpt
from edmkit.data.dataset import load_dataset
from edmkit.data.images import save_image_grid
from edmkit.metrics.detectors import load_detector
from edmkit.metrics.evaluate import compute_reference, evaluate_generator
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
SCREEN = 36_000  # images per screening trial: a third of the preset's 108k
SCREEN_TRIALS: dict[str, dict] = {  # one knob of today's preset each (class-conditional, 16-ch, batch 32, lr 0.01 from 20k)
    "screen-base": {},
    "screen-b16": dict(train=dict(batch=16)),
    "screen-b64": dict(train=dict(batch=64)),
    "screen-lr005": dict(optim=dict(lr=0.005)),
    "screen-lr02": dict(optim=dict(lr=0.02)),
    "screen-decay8k": dict(optim=dict(lr_ref_nimg=8_000)),
    "screen-edm-sigma": dict(loss=dict(P_mean=-1.2, P_std=1.2)),
    "screen-dropout10": dict(network=dict(dropout=0.1)),
    "screen-augment": dict(network=dict(augment_dim=7), train=dict(augment_p=0.12)),
    "screen-attn14": dict(network=dict(attn_resolutions=(14, 7))),
    "screen-wide24": dict(network=dict(model_channels=24)),
    "screen-depth2": dict(network=dict(num_blocks=2)),
    "screen-ch-mult-122": dict(network=dict(channel_mult=(1, 2, 2))),
}
for _name, _changes in SCREEN_TRIALS.items():
    TRIALS[_name] = {**_changes, "train": {**_changes.get("train", {}), "total_nimg": SCREEN}}



def trial_config(name: str):
    cfg = get_preset("mnist")
    for section, changes in TRIALS[name].items():
        cfg = cfg.override(section, **changes)
    cfg = cfg.override("ema", choose="off")  # score a fixed tracked EMA: the choice's sweep would differ per trial
    return cfg.override("train", grid_nimg=10**12)  # grids only at the end


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trials", nargs="+", choices=list(TRIALS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/trials")
    ap.add_argument("--fid", type=int, default=0, help="score the EMA 0.05 network with the digit detector at this n (0: no)")
    ap.add_argument("--setting", default="dpmpp2m-sde-11", choices=list(SETTINGS), help="sampler setting for --fid")
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
        n = cfg.network
        kw = dict(resolution=n.resolution, channels=n.channels, label_dim=n.label_dim, **SETTINGS[args.setting])
        for std in (0.0, *cfg.ema.stds):
            net, _ = ckpt.load_network(ckpt.network_path(run, state.nimg, std))
            save_image_grid(generate_images(net, seeds=range(64), **kw), run / f"final-ema{std:.3f}.png")
        if args.fid:
            det = load_detector("mnist")
            ref = compute_reference(load_dataset("mnist5k").images, detector=det, source="mnist5k")
            net, _ = ckpt.load_network(ckpt.network_path(run, state.nimg, 0.05))
            r = evaluate_generator(net, ref=ref, detector=det, seeds=list(range(args.fid)), metrics=("fid", "kid"), batch=250,
                                   generate_kw=kw)["repeats"][0]
            result.update(fid=round(float(r["fid"]), 3), kid=round(float(r["kid"]), 5), fid_n=args.fid, setting=args.setting,
                          nfe=nfe(SETTINGS[args.setting]), ema_std=0.05, params_m=round(sum(p.numel() for p in net.parameters()) / 1e6, 3))
        print(json.dumps(result))
        with open(Path(args.out) / "results.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
