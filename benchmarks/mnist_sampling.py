"""Sampling trials on one digits network: FID with the built-in digit detector per sampler setting (issue 21, items 2 and 4).

Every setting samples the same seeds 0..n-1 from the same network, so score differences are the sampler's, not noise.
The reference is all 5,000 embedded digits through the built-in "mnist" detector (its FIDs are not comparable with
Inception FIDs; its real-vs-real floor is in docs/trials/mnist-detector.json). Writes one JSON (and a grid of the first
64 images per setting) to --out, and prints a markdown table with the network evaluations (NFE) of each setting.

    python benchmarks/mnist_sampling.py runs/mnist --n 2000 --settings heun18,dpmpp2m-10 --out docs/trials/sampling
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edmkit.checkpoint import find_network, load_network
from edmkit.data.dataset import load_dataset
from edmkit.data.images import save_image_grid
from edmkit.metrics.detectors import load_detector
from edmkit.metrics.evaluate import compute_reference, evaluate_generator
from edmkit.sampling.generate import generate_images, load_guide

# name: generate_images keywords (sampler, steps, schedule and the sampler's options)
SETTINGS: dict[str, dict] = {
    "heun18": dict(sampler="heun", steps=18),  # edmkit generate's default: 35 evaluations
    "heun18-churn10": dict(sampler="heun", steps=18, S_churn=10, S_tmin=0.05, S_tmax=10, S_noise=1.003),
    "heun18-churn5": dict(sampler="heun", steps=18, S_churn=5, S_tmin=0.05, S_tmax=10, S_noise=1.003),
    "heun18-churn20": dict(sampler="heun", steps=18, S_churn=20, S_tmin=0.05, S_tmax=10, S_noise=1.003),
    "heun18-churn30": dict(sampler="heun", steps=18, S_churn=30, S_tmin=0.05, S_tmax=10, S_noise=1.003),
    "heun18-churn10-tmax50": dict(sampler="heun", steps=18, S_churn=10, S_tmin=0.05, S_tmax=50, S_noise=1.003),
    "heun12": dict(sampler="heun", steps=12),
    "heun8": dict(sampler="heun", steps=8),
    "heun6": dict(sampler="heun", steps=6),
    "dpmpp2m-12": dict(sampler="dpmpp-2m", steps=12),
    "dpmpp2m-11": dict(sampler="dpmpp-2m", steps=11),
    "dpmpp2m-10": dict(sampler="dpmpp-2m", steps=10),
    "dpmpp2m-8": dict(sampler="dpmpp-2m", steps=8),
    "euler12": dict(sampler="euler", steps=12),
    # fast sampling (issue 21 item 4): at most 11 evaluations, a third of Heun 18's 35
    "dpmpp2m-11": dict(sampler="dpmpp-2m", steps=11),
    "dpmpp3m-11": dict(sampler="dpmpp-3m", steps=11),
    "dpmpp2m-sde-11": dict(sampler="dpmpp-2m", steps=11, eta=1.0),
    "dpmpp3m-sde-11": dict(sampler="dpmpp-3m", steps=11, eta=1.0),
    "dpmpp2m-sde-35": dict(sampler="dpmpp-2m", steps=35, eta=1.0),
    "dpmpp2m-sde-18": dict(sampler="dpmpp-2m", steps=18, eta=1.0),
    "dpmpp2m-sde-14": dict(sampler="dpmpp-2m", steps=14, eta=1.0),
    "dpmpp2m-sde-10": dict(sampler="dpmpp-2m", steps=10, eta=1.0),
    "dpmpp2m-sde-8": dict(sampler="dpmpp-2m", steps=8, eta=1.0),
    "dpmpp2m-sde-6": dict(sampler="dpmpp-2m", steps=6, eta=1.0),
    "dpmpp2m-sde05-11": dict(sampler="dpmpp-2m", steps=11, eta=0.5),
    "dpmpp3m-sde05-11": dict(sampler="dpmpp-3m", steps=11, eta=0.5),
    "heun6-churn10": dict(sampler="heun", steps=6, S_churn=10, S_tmin=0.05, S_tmax=10, S_noise=1.003),
    "dpmpp3m-11-rho5": dict(sampler="dpmpp-3m", steps=11, rho=5.0),
    "dpmpp3m-11-smax20": dict(sampler="dpmpp-3m", steps=11, sigma_max=20.0),
    "dpmpp3m-sde-11-smax20": dict(sampler="dpmpp-3m", steps=11, eta=1.0, sigma_max=20.0),
    "dpmpp2m-sde-11-smax20": dict(sampler="dpmpp-2m", steps=11, eta=1.0, sigma_max=20.0),
    "dpmpp2m-sde-11-loglinear": dict(sampler="dpmpp-2m", steps=11, eta=1.0, schedule="loglinear"),
    "dpmpp2m-sde-8-loglinear": dict(sampler="dpmpp-2m", steps=8, eta=1.0, schedule="loglinear"),
    "dpmpp2m-sde-14-loglinear": dict(sampler="dpmpp-2m", steps=14, eta=1.0, schedule="loglinear"),
    "dpmpp2m-sde-18-loglinear": dict(sampler="dpmpp-2m", steps=18, eta=1.0, schedule="loglinear"),
    "dpmpp2m-11-loglinear": dict(sampler="dpmpp-2m", steps=11, schedule="loglinear"),
    "heun18-churn10-loglinear": dict(sampler="heun", steps=18, S_churn=10, S_tmin=0.05, S_tmax=10, S_noise=1.003, schedule="loglinear"),
    "dpmpp2m-sde-11-rho3": dict(sampler="dpmpp-2m", steps=11, eta=1.0, rho=3.0),
    "dpmpp2m-sde-11-smax20": dict(sampler="dpmpp-2m", steps=11, eta=1.0, sigma_max=20.0),
    "dpmpp3m-sde-11-loglinear": dict(sampler="dpmpp-3m", steps=11, eta=1.0, schedule="loglinear"),
    # autoguidance (EDM2 / Karras et al. 2024): the guide is --guide (e.g. an early snapshot of the same run); 2 x NFE
    "dpmpp2m-sde-11-ag1.5": dict(sampler="dpmpp-2m", steps=11, eta=1.0, guidance=1.5),
    "dpmpp2m-sde-11-ag2": dict(sampler="dpmpp-2m", steps=11, eta=1.0, guidance=2.0),
    "dpmpp2m-sde-11-ag1.25": dict(sampler="dpmpp-2m", steps=11, eta=1.0, guidance=1.25),
    "dpmpp2m-sde-11-loglinear-ag2": dict(sampler="dpmpp-2m", steps=11, eta=1.0, schedule="loglinear", guidance=2.0),
    "dpmpp2m-sde-6-loglinear-ag2": dict(sampler="dpmpp-2m", steps=6, eta=1.0, schedule="loglinear", guidance=2.0),
}


def nfe(setting: dict) -> int:
    """Network evaluations per image: Heun's last step is an Euler step; guidance evaluates the guide too."""
    per_step = 2 if setting.get("guidance", 1) != 1 else 1
    return per_step * (2 * setting["steps"] - 1 if setting["sampler"] == "heun" else setting["steps"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="network file or run folder (its EMA choice, else its sampling EMA)")
    p.add_argument("--ema", type=float, default=None, help="with a run folder: this tracked EMA instead")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--settings", default="heun18", help=f"comma-separated, of: {', '.join(SETTINGS)}")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--guide", default=None, help="autoguidance settings (-ag*): the guide network file or run folder")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    names = [s for s in a.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; valid: {', '.join(SETTINGS)}")
    path = find_network(a.checkpoint, ema_std=a.ema)
    net, meta = load_network(path)
    n = meta["config"].network
    guide = load_guide(a.guide, like=n) if a.guide else None
    if guide is None and any("guidance" in SETTINGS[s] for s in names):
        p.error("autoguidance settings need --guide")
    det = load_detector("mnist")
    ref = compute_reference(load_dataset("mnist5k").images, detector=det, source="mnist5k")
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        kw = dict(resolution=n.resolution, channels=n.channels, label_dim=n.label_dim, **SETTINGS[name])
        if "guidance" in kw:
            kw["guide"] = guide
        start = time.perf_counter()
        result = evaluate_generator(net, ref=ref, detector=det, seeds=list(range(a.n)), metrics=("fid", "kid"), batch=a.batch, generate_kw=kw)
        sec = time.perf_counter() - start
        r = result["repeats"][0]
        rows.append({"setting": name, **SETTINGS[name], "nfe": nfe(SETTINGS[name]), "n": a.n, "fid": round(float(r["fid"]), 3),
                     "kid": round(float(r["kid"]), 5), "sec": round(sec, 1), "network": path.name, "guide": a.guide if "guidance" in kw else None, "nimg": meta["nimg"], "ema_std": meta["ema_std"]})
        print(json.dumps(rows[-1]), flush=True)
        with torch.no_grad():
            save_image_grid(generate_images(net, seeds=list(range(64)), **kw), a.out / f"{name}-ema{meta['ema_std']:.3f}.png")
        out_json = a.out / f"sampling-{meta['nimg']}-ema{meta['ema_std']:.3f}.json"
        old = json.loads(out_json.read_text())["rows"] if out_json.is_file() else []
        keep = [o for o in old if o["setting"] not in {r["setting"] for r in rows}]
        out_json.write_text(json.dumps({"network": path.name, "rows": keep + rows}, indent=1) + "\n")
    print("| setting | NFE | FID (digit detector, n=%d) | KID | sec |" % a.n)
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['nfe']} | {r['fid']:.2f} | {r['kid']:.4f} | {r['sec']:.0f} |")


if __name__ == "__main__":
    main()
