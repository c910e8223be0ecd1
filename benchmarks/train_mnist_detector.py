"""Train the built-in "mnist" detector (edmkit.metrics.mnist_net.DigitNet) on the embedded digits, reproducibly.

Seeded, CPU, a few minutes. Trains on the 4,000 digits outside ``heldout_mask`` (every 5th digit is held out),
with random shifts of up to 2 pixels and small rotations, AdamW and a cosine learning-rate decay; reports the
held-out accuracy of the float16 file it writes, and prints its sha256 (to pin in ``detectors.MNIST`` and
``assets/README.md``).

    python benchmarks/train_mnist_detector.py [--epochs 8] [--out src/edmkit/assets/mnist-detector.safetensors]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edmkit.data.dataset import load_dataset
from edmkit.files import file_sha256
from edmkit.metrics.mnist_net import DigitNet, heldout_mask, load_digit_net, save_digit_net

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "edmkit" / "assets" / "mnist-detector.safetensors"


def augment(x: torch.Tensor, *, gen: torch.Generator, max_shift_px: float = 2.0, max_deg: float = 10.0) -> torch.Tensor:
    """Random shift (up to `max_shift_px`) and rotation (up to `max_deg`) of float images [N, 1, 28, 28], zero padded."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(max_deg)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * max_shift_px / x.shape[-1])
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # [N, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


@torch.no_grad()
def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of uint8 images [N, 1, 28, 28]."""
    probs = torch.cat([net(x.float(), return_features=False) for x in images.split(500)])
    return float((probs.argmax(1) == labels).float().mean())


def train(*, epochs: int, batch: int, lr: float, seed: int) -> tuple[DigitNet, dict]:
    torch.manual_seed(seed)
    ds = load_dataset("mnist5k")
    held = torch.from_numpy(heldout_mask(len(ds.images)))
    x_train, y_train = ds.images[~held].float(), ds.labels[~held]
    net = DigitNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x_train) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    gen = torch.Generator().manual_seed(seed)
    start = time.monotonic()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for idx in order.split(batch):
            x = augment(x_train[idx], gen=gen)
            loss = F.cross_entropy(net.logits_or_features(x, features=False), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        net.eval()
        print(f"epoch {epoch + 1:3d}  loss {total / len(x_train):.4f}  held-out acc {accuracy(net, ds.images[held], ds.labels[held]):.4f}  "
              f"{time.monotonic() - start:.0f} s", flush=True)
    info = dict(data="mnist5k", train_digits=int((~held).sum()), heldout_digits=int(held.sum()), heldout="index % 5 == 0",
                epochs=epochs, batch=batch, lr=lr, optimizer="AdamW wd 1e-4, cosine decay", augment="shift <= 2 px, rotation <= 10 deg",
                seed=seed, torch=torch.__version__)  # no wall time here: the same seed gives the same file, byte for byte
    return net, info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    net, info = train(epochs=a.epochs, batch=a.batch, lr=a.lr, seed=a.seed)
    ds = load_dataset("mnist5k")
    held = torch.from_numpy(heldout_mask(len(ds.images)))
    info["heldout_accuracy"] = round(accuracy(net, ds.images[held], ds.labels[held]), 4)
    save_digit_net(net, a.out, info=info)
    shipped = load_digit_net(a.out)  # float16 weights, as shipped
    print(f"wrote {a.out}: {a.out.stat().st_size / 1024:.0f} KiB, sha256 {file_sha256(a.out)}")
    print(f"held-out accuracy: float32 {info['heldout_accuracy']:.4f}, shipped float16 {accuracy(shipped, ds.images[held], ds.labels[held]):.4f} "
          f"({int(held.sum())} digits)")


if __name__ == "__main__":
    main()
