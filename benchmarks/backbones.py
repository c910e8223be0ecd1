"""Backbones side by side on the CPU (issue 26): size, cost, speed and the loss reached after the same training.

For each backbone of the registry (``config.ARCHS``) at two sizes, ``small`` = 28x28x1 at ~1M parameters and
``medium`` = 32x32x3 at ~5M (``model_channels`` is searched so each backbone lands nearest the target, on the meta
device), and each transformer also at the edm2-unet's GFLOPs of that size (``match = gflops``; a transformer's
parameters and FLOPs grow at different rates than a U-Net's), in a fresh subprocess each:

- ``params`` and ``GFLOPs/img`` of one forward (``nn.build.network_cost``: torch's flop counter, 2 per multiply-add);
- ``train img/s``: ``training.loop.train_step`` (EDM loss, Adam, EMA) at batch ``--batch``, after one warm-up step;
- ``eval img/s``: denoiser evaluations D(x; sigma) under inference mode at batch ``--batch``;
- ``loss`` (small size only): the lambda(sigma)-weighted error at fixed sigma and noise on 256 held-out embedded
  digits after ``--train-nimg`` training images (batch 32, each backbone's tiny-preset schedule, seed 0).

Speeds are reported as ratios to edm2-unet measured in the same run (the machine's speed varies between days).

    python benchmarks/backbones.py [--batch 32] [--steps 3] [--train-nimg 4k] [--archs dit,edm2-unet] [--matches gflops] [--out backbones.json]

``--matches gflops`` measures only the transformers' GFLOPs-matched rows (edm2-unet, the reference, is always measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from edmkit import checkpoint as ckpt
from edmkit.config import ARCHS, UNETS, parse_nimg
from edmkit.data.dataset import load_dataset
from edmkit.data.images import images_to_float
from edmkit.diffusion.loss import make_loss
from edmkit.nn.build import network_cost
from edmkit.presets import get_preset
from edmkit.training.ema import PowerFunctionEMA
from edmkit.training.loop import train_step
from edmkit.training.run_state import TrainState

SIZES = {"small": dict(channels=1, resolution=28, target=1e6), "medium": dict(channels=3, resolution=32, target=5e6)}
WIDTHS = range(8, 513, 4)  # model_channels searched (multiples of 4: group norms), up to twice the target
MATCHES = ("params", "gflops")  # what a width is matched on: the size's parameter target, or edm2-unet's GFLOPs at it


def config(arch: str, size: str, match: str = "params"):
    """The tiny preset of ``arch`` at the size's image shape, with the model_channels nearest the size's target."""
    s = SIZES[size]
    base = get_preset("tiny" if arch == "edm2-unet" else f"tiny-{arch}")
    base = base.override("network", channels=s["channels"], resolution=s["resolution"], attn_resolutions=(s["resolution"] // 2,))
    index, target = (0, s["target"]) if match == "params" else (1, network_cost(config("edm2-unet", size).network)[1])
    costs = {}
    for w in WIDTHS:
        try:
            value = network_cost(dataclasses.replace(base.network, model_channels=w))[index]
        except ValueError:  # a width this backbone cannot take (e.g. group norm groups, attention heads)
            continue
        costs[w] = abs(value - target)
        if value > 2 * target:
            break
    return base.override("network", model_channels=min(costs, key=costs.get))


def batch(cfg, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_cfg = cfg.network
    y = torch.rand(n, n_cfg.channels, n_cfg.resolution, n_cfg.resolution, generator=g) * 2 - 1
    return y, make_loss(cfg).sample_sigma(n, generator=g), torch.randn(y.shape, generator=g)


def fresh_state(cfg) -> TrainState:
    torch.manual_seed(0)
    net = ckpt.build_denoiser(cfg).train()
    return TrainState(net=net, optimizer=torch.optim.Adam(net.parameters(), lr=cfg.optim.lr), ema=PowerFunctionEMA(net, stds=(0.1,)))


def measure(arch: str, size: str, match: str, *, batch_size: int, steps: int, train_nimg: int) -> dict:
    cfg = config(arch, size, match).override("train", batch=batch_size)
    params, gflops = network_cost(cfg.network)
    state, loss_fn = fresh_state(cfg), make_loss(cfg)
    y, sigma, noise = batch(cfg, batch_size, 0)
    train_step(state, loss_fn, cfg, y, None)  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        train_step(state, loss_fn, cfg, y, None)
    train_ips = steps * batch_size / (time.perf_counter() - t)
    net = state.net.eval()
    with torch.inference_mode():
        net(y + sigma.view(-1, 1, 1, 1) * noise, sigma)
        t = time.perf_counter()
        for _ in range(steps):
            net(y + sigma.view(-1, 1, 1, 1) * noise, sigma)
        eval_ips = steps * batch_size / (time.perf_counter() - t)
    rec = dict(arch=arch, size=size, match=match, model_channels=cfg.network.model_channels, params=params, gflops=gflops, train_ips=train_ips, eval_ips=eval_ips)
    if size == "small" and train_nimg:
        rec["loss"] = digits_loss(cfg.override("train", batch=32), train_nimg)
    return rec


def digits_loss(cfg, train_nimg: int) -> float:
    """Fixed-sigma, fixed-noise lambda-weighted error on 256 held-out digits after ``train_nimg`` training images."""
    images = images_to_float(load_dataset("mnist5k").images)
    held, train = images[:256], images[256:]
    state, loss_fn = fresh_state(cfg), make_loss(cfg)
    g = torch.Generator().manual_seed(0)
    for step in range(train_nimg // 32):
        train_step(state, loss_fn, cfg, train[torch.randint(len(train), (32,), generator=g)], None)
    sigma, noise = loss_fn.sigma_quantiles(256)[torch.randperm(256, generator=g)], torch.randn(held.shape, generator=g)
    with torch.no_grad():
        D = state.net.eval()(held + sigma.view(-1, 1, 1, 1) * noise, sigma)
    return (loss_fn.weight(sigma).view(-1, 1, 1, 1) * (D - held) ** 2).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--train-nimg", default="4k")
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: small, medium")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated backbones (edm2-unet is the speed reference)")
    ap.add_argument("--matches", default=",".join(MATCHES), help="comma-separated transformer rows: params, gflops")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", nargs=3, metavar=("ARCH", "SIZE", "MATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        print(json.dumps(measure(*args.worker, batch_size=args.batch, steps=args.steps, train_nimg=parse_nimg(args.train_nimg))))
        return
    rows = []
    archs = ["edm2-unet"] + [a for a in args.archs.split(",") if a != "edm2-unet"]
    for size in args.sizes.split(","):
        for arch in archs:
            for match in args.matches.split(",") if arch not in UNETS else MATCHES[:1]:
                cmd = [sys.executable, __file__, "--worker", arch, size, match, "--batch", str(args.batch), "--steps", str(args.steps),
                       "--train-nimg", args.train_nimg]
                rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]))
                print(f"measured {arch} {size} {match}", file=sys.stderr)
    print("| size | arch | width | params | GFLOPs/img | train img/s (x edm2-unet) | eval img/s (x edm2-unet) | digits loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next(q for q in rows if q["size"] == r["size"] and q["arch"] == "edm2-unet")
        loss = f"{r['loss']:.4f}" if "loss" in r else "-"
        name = r["arch"] if r["match"] == "params" else f"{r['arch']} (GFLOPs-matched)"
        print(f"| {r['size']} | {name} | {r['model_channels']} | {r['params'] / 1e6:.2f}M | {r['gflops']:.3f} | "
              f"{r['train_ips']:.0f} ({r['train_ips'] / ref['train_ips']:.2f}) | {r['eval_ips']:.0f} ({r['eval_ips'] / ref['eval_ips']:.2f}) | {loss} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
