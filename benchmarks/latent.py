"""Pixel space vs edmkit's own autoencoder's latent space on the embedded digits, at the same training time.

Steps (all in one process, one machine, so the ratios hold however busy it is):
1. train edmkit's KL autoencoder (``--ae-nimg`` images) and report its held-out PSNR and that of the mean image;
2. encode the digits once into a latent dataset;
3. measure the training speed of the same EDM2 U-Net recipe on pixels (28x28x1) and on latents (4x14x14) on a short
   probe run, then train each for the images that fit ``--minutes`` at that speed (on a machine whose load changes,
   the two runs' training times differ: both are reported);
4. sample ``--n`` images from each (Heun, 18 steps; latents decoded), timing it, and write both grids;
5. score both sample sets with edmkit's built-in digit detector (``--detector mnist``: FID on its own scale, not
   comparable to Inception FIDs) against the digits, beside the real-vs-real floor and the autoencoder's floor (its
   reconstructions of the same digits).

    python benchmarks/latent.py --minutes 5 --out docs/latent
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from edmkit import checkpoint as ckpt
from edmkit.data.dataset import load_dataset
from edmkit.data.images import float_to_images, save_image_grid
from edmkit.data.latents import write_latents
from edmkit.latent.autoencoder import AEConfig
from edmkit.latent.encoder import encode_measured, encoder_from_spec, reconstruct
from edmkit.metrics.detectors import load_detector
from edmkit.metrics.stats import frechet_distance
from edmkit.presets import get_preset, resolve_config
from edmkit.sampling.generate import generate_images
from edmkit.training.autoencoder import train_autoencoder
from edmkit.training.loop import train


def digit_fid(detector, a: torch.Tensor, b: torch.Tensor) -> float:
    """FID of uint8 image sets ``a`` vs ``b`` in the mnist detector's features."""
    fa, fb = (torch.cat([detector(chunk) for chunk in x.split(250)]).double().numpy() for x in (a, b))
    return float(frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False)))


def run_for(cfg, run: Path, minutes: float) -> dict:
    """Measure img/s on a short run, then train a fresh run for ``minutes`` of training time."""
    probe = train(cfg.override("train", total_nimg=cfg.train.batch * 20, grid_nimg=10**12), run.with_name(run.name + "-probe"), progress=False, log=lambda s: None)
    speed = probe.nimg / probe.totals["train_sec"]
    nimg = max(cfg.train.batch, int(speed * minutes * 60) // cfg.train.batch * cfg.train.batch)
    state = train(cfg.override("train", total_nimg=nimg, grid_nimg=10**12), run, progress=False, log=lambda s: None)
    return {"nimg": state.nimg, "train_sec": state.totals["train_sec"], "img_per_sec": state.nimg / state.totals["train_sec"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="training time of each diffusion model")
    ap.add_argument("--ae-nimg", type=int, default=20_000, help="autoencoder training images")
    ap.add_argument("--n", type=int, default=500, help="samples per model for the proxy FID")
    ap.add_argument("--out", default="runs/latent-bench")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"minutes": args.minutes, "torch": torch.__version__, "threads": torch.get_num_threads()}
    detector = load_detector("mnist")

    t0 = time.perf_counter()
    report = train_autoencoder(AEConfig(total_nimg=args.ae_nimg), out / "ae", progress=False, log=print)
    result["autoencoder"] = {**report, "train_sec": time.perf_counter() - t0}
    data = load_dataset("mnist5k")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))  # the file is sorted by class
    ref, held = data.images[perm[args.n:]], data.images[perm[:args.n]]
    t0 = time.perf_counter()
    enc, mean, std = encode_measured(out / "ae" / "autoencoder.safetensors", data.images)
    write_latents(out / "digits-latents.npz", mean=mean, std=std, encoder=enc.spec, labels=data.labels, class_names=data.class_names)
    result["encode_sec"] = time.perf_counter() - t0

    # the same preset; in latent space (14x14x4) the 28x28 level is gone: two levels at 14 and 7, as the pixel run's inner two
    latent_base = get_preset("mnist").override("network", channel_mult=(2, 4))
    runs = {"pixels": resolve_config("mnist"), "latent": resolve_config(latent_base, data=str(out / "digits-latents.npz"), attn_resolutions=(7,))}
    for name, cfg in runs.items():
        result[name] = run_for(cfg, out / name, args.minutes)
        net, meta = ckpt.load_network(ckpt.find_network(out / name), latent=True)
        decode = encoder_from_spec(meta["encoder"]).decode if meta["encoder"] else (lambda x: x)
        n = cfg.network
        t0 = time.perf_counter()
        x = decode(generate_images(net, seeds=range(args.n), resolution=n.resolution, channels=n.channels, steps=18, batch=100))
        result[name]["sample_img_per_sec"] = args.n / (time.perf_counter() - t0)
        samples = float_to_images(x)
        save_image_grid(samples[:64], out / f"{name}-grid.png")
        result[name]["fid_mnist"] = digit_fid(detector, samples, ref)
        print(name, json.dumps(result[name]))
    result["fid_mnist_real_floor"] = digit_fid(detector, held, ref)  # n real digits not in the reference
    result["fid_mnist_autoencoder_floor"] = digit_fid(detector, reconstruct(out / "ae" / "autoencoder.safetensors", held), ref)
    (out / "latent.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
