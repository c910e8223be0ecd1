"""PSNR / SSIM of the zero-shot inverse-problem methods (and a cascade SR model) on held-out digits.

For each task (inpainting of the right half; 2x super-resolution) and method (replace, ilvr, ccdf, dps, mcg; cascade with
``--sr-checkpoint``), restores ``--n`` digits from their measurements and reports the mean PSNR (dB, [-1, 1] range
of 2) and SSIM (Wang et al. 2004, global 7x7 box-window variant) against the truth, plus the measurement-only
baseline (the masked / nearest-upsampled input). Held-out digits: the run's validation split when the checkpoint was
trained with ``--val-fraction``; otherwise the last ``--n`` images of the data (seen in training: say so).

    python benchmarks/inverse.py --checkpoint runs/mnist [--sr-checkpoint runs/mnist-sr] [--n 32] [--steps 18]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from edmkit.checkpoint import find_network, load_network
from edmkit.data.dataset import dataset_of
from edmkit.data.images import images_to_float
from edmkit.diffusion.inverse import restore
from edmkit.diffusion.operators import downsample, upsample
from edmkit.diffusion.samplers import SeededRandn, get_sampler
from edmkit.sampling.generate import sampling_sigmas
from edmkit.training.validation import split_dataset


def psnr(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio 10 log10(R^2 / MSE) per image, [N, C, H, W] x2 -> [N] dB."""
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 2.0, window: int = 7) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004, Eq. 13) with a uniform ``window`` x ``window`` window, per image -> [N]."""
    C1, C2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    pool = lambda t: F.avg_pool2d(t, window, stride=1)
    mx, my = pool(x), pool(y)
    vx, vy, cxy = pool(x * x) - mx**2, pool(y * y) - my**2, pool(x * y) - mx * my
    s = ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
    return s.flatten(1).mean(1)


def held_out(cfg, n: int) -> tuple[torch.Tensor, str]:
    """[n, C, H, W] truth images in [-1, 1] and where they come from."""
    data = dataset_of(cfg)  # prepared as in training (size, channels, classes), so the split matches the run's
    if cfg.train.val_fraction > 0:
        _, val = split_dataset(data, fraction=cfg.train.val_fraction, seed=cfg.train.seed)
        return images_to_float(val.images[:n]), f"held-out split ({len(val)} images, never trained on)"
    return images_to_float(data.images[-n:]), "last images of the training data (no held-out split in this run: seen in training)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="network file or run folder (unconditional or conditional)")
    parser.add_argument("--sr-checkpoint", default=None, help="optional cascade SR model (edmkit train --task sr) to compare")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--sampler", default="heun")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--zeta", type=float, default=1.0, help="DPS step size")
    parser.add_argument("--alpha", type=float, default=1.0, help="MCG gradient step (restore --method mcg --zeta)")
    parser.add_argument("--sigma-start", type=float, default=1.0, help="CCDF start noise level")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dev = torch.device(args.device)
    net, meta = load_network(find_network(args.checkpoint), device=dev)
    cfg = meta["config"]
    y, source = held_out(cfg, args.n)
    y = y.to(dev)
    if cfg.network.label_dim:
        raise SystemExit("class-conditional checkpoints: give an unconditional model (labels of held-out digits are not used)")
    print(f"{args.n} digits: {source}; {args.sampler}, {args.steps} steps")
    mask = torch.ones_like(y[:1])
    mask[..., y.shape[-1] // 2:] = 0  # right half unknown
    sample, sigmas = get_sampler(args.sampler), sampling_sigmas("karras", args.steps, device=dev)
    rows = [("inpaint", "input", mask * y), ("sr", "input (nearest)", upsample(downsample(y, scale=args.scale), scale=args.scale))]
    for task, methods in (("inpaint", ("replace", "dps", "mcg")), ("sr", ("ilvr", "ccdf", "dps", "mcg"))):
        meas = mask * y if task == "inpaint" else downsample(y, scale=args.scale)
        for method in methods:
            rnd = SeededRandn(range(args.n), device=dev)
            tick = time.perf_counter()
            x = restore(net, meas, task=task, sample=sample, sigmas=sigmas, noise=rnd.randn(y.shape[1:]), mask=mask if task == "inpaint" else None,
                        scale=args.scale, method=method, randn=rnd, zeta=args.alpha if method == "mcg" else args.zeta, sigma_start=args.sigma_start)
            rows.append((task, method, x.clamp(-1, 1), time.perf_counter() - tick))
    if args.sr_checkpoint:
        from edmkit.sampling.cascade import super_resolve

        sr_net, sr_meta = load_network(find_network(args.sr_checkpoint), device=dev)
        rnd = SeededRandn(range(args.n), device=dev)
        tick = time.perf_counter()
        x = super_resolve(sr_net, downsample(y, scale=sr_meta["config"].train.sr_scale), cfg=sr_meta["config"], sample=sample,
                          sigmas=sigmas, noise=rnd.randn(y.shape[1:]), randn=rnd)
        rows.append(("sr", f"cascade (x{sr_meta['config'].train.sr_scale})", x.clamp(-1, 1), time.perf_counter() - tick))
    print(f"{'task':8} {'method':18} {'PSNR dB':>8} {'SSIM':>6} {'sec':>6}")
    for task, method, x, *sec in rows:
        print(f"{task:8} {method:18} {psnr(x, y).mean():8.2f} {ssim(x, y).mean():6.3f} {sec[0] if sec else 0:6.1f}")


if __name__ == "__main__":
    main()
