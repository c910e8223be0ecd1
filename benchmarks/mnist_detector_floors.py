"""What the built-in "mnist" detector's FID / KID / IS say about known image sets: the real-vs-real floor and failures.

Reference: one half of the 5,000 embedded digits (seeded split, 2,500); compared sets of 2,500 images each unless
noted: the other half (the floor), one image repeated, all of one class (the 500 digits of each class, n = 500,
with the floor at n = 500 for comparison), uniform and Gaussian pixel noise, and the other half blurred.
Writes ``docs/trials/mnist-detector.json`` (and prints a table for the README).

    python benchmarks/mnist_detector_floors.py [--out docs/trials/mnist-detector.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edmkit.data.dataset import load_dataset
from edmkit.metrics.detectors import load_detector
from edmkit.metrics.mnist_net import heldout_mask
from edmkit.metrics.stats import feature_stats, frechet_distance, inception_score, kid

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "trials" / "mnist-detector.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args()
    start = time.monotonic()
    det = load_detector("mnist")
    ds = load_dataset("mnist5k")
    g = torch.Generator().manual_seed(a.seed)
    perm = torch.randperm(len(ds.images), generator=g)
    half_a, half_b = perm[: len(perm) // 2], perm[len(perm) // 2:]
    real_a, real_b = ds.images[half_a], ds.images[half_b]
    n = len(real_b)
    feats_a = det(real_a)
    mu_a, sigma_a = feature_stats(feats_a)

    def scores(images: torch.Tensor) -> dict:
        f = det(images)
        mu, sigma = feature_stats(f)
        k, _ = kid(f, feats_a, subsets=50, subset_size=min(500, len(f)), seed=a.seed)
        is_mean, _ = inception_score(det.probs(images))
        return {"n": len(images), "fid": round(frechet_distance(mu, sigma, mu_a, sigma_a), 3), "kid": round(float(k), 5), "is": round(is_mean, 3)}

    gauss = ((torch.randn(n, 1, 28, 28, generator=g) * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    blur = F.avg_pool2d(real_b.float(), 3, stride=1, padding=1).round().to(torch.uint8)
    rows = {
        "real half vs the other half (floor)": scores(real_b),
        "real 500 of the other half (floor at n = 500)": scores(real_b[:500]),
        "one image repeated": scores(real_b[:1].repeat(n, 1, 1, 1)),
        "uniform noise": scores(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)),
        "Gaussian noise (mean 128, std 128, clipped)": scores(gauss),
        "other half, 3x3 box blur": scores(blur),
    }
    for c in range(10):
        rows[f"all of class {c} (n = 500)"] = scores(ds.images[ds.labels == c])
    held = torch.from_numpy(heldout_mask(len(ds.images)))
    acc = float((det.probs(ds.images[held]).argmax(1) == ds.labels[held]).float().mean())
    result = dict(detector=det.spec.name, detector_sha256=det.sha256, note=det.spec.note, reference="half of mnist5k (2,500 digits, "
                  f"torch.randperm seed {a.seed})", heldout_accuracy=round(acc, 4), heldout_digits=int(held.sum()),
                  scores=rows,
                  time_sec=round(time.monotonic() - start, 1), command="python benchmarks/mnist_detector_floors.py")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"held-out accuracy {acc:.4f} on {int(held.sum())} digits")
    print("| compared with half the digits | n | FID | KID | IS |\n|---|---|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v['n']} | {v['fid']:.2f} | {v['kid']:.4f} | {v['is']:.2f} |")
    print(f"wrote {a.out} ({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    main()
