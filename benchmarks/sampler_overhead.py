"""Per-step overhead of sample_heun against a bare loop making the same denoiser calls.

At batch 1 with a tiny conv as the denoiser, the sampler's own arithmetic and bookkeeping dominate;
target: sampler time / bare-loop time <= 1.5.

    python benchmarks/sampler_overhead.py [--steps 18] [--res 32] [--repeats 50] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from edmkit.diffusion.samplers import sample_heun
from edmkit.diffusion.schedules import karras_sigmas


def heun_overhead(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *, repeats: int) -> dict:
    """Median seconds of ``sample_heun`` and of a bare loop making the same denoiser calls, and their paired ratio.

    The bare loop makes the same (x, σ) calls Heun makes (2 per step, 1 for the last), nothing else. The two are
    interleaved so that load from other processes hits both alike; CUDA work is synchronized before each clock read.
    """
    device = noise.device
    call_sigmas = [torch.full((noise.shape[0],), s, device=device) for s in sigmas[:-1].tolist() for _ in range(2)][:-1]

    def bare():
        x = noise
        for sigma in call_sigmas:
            x = denoiser(x, sigma, None)
        return x

    def heun():
        return sample_heun(denoiser, noise, sigmas)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.inference_mode():
        for fn in (bare, heun):  # warm-up
            fn()
        pairs = [(timed(bare), timed(heun)) for _ in range(repeats)]
    return {"calls": len(call_sigmas), "bare_sec": statistics.median(b for b, _ in pairs),
            "heun_sec": statistics.median(h for _, h in pairs), "ratio": statistics.median(h / b for b, h in pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--res", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    conv = torch.nn.Conv2d(3, 3, 3, padding=1).to(device)

    def denoiser(x, sigma, labels):
        return conv(x)

    r = heun_overhead(denoiser, torch.randn(1, 3, args.res, args.res, device=device), karras_sigmas(args.steps, device=device),
                      repeats=args.repeats)
    n_calls = r["calls"]
    print(f"{n_calls} denoiser calls, batch 1, {args.res}x{args.res}, {device}, {torch.get_num_threads()} threads")
    print(f"bare loop  {r['bare_sec'] * 1e3:8.3f} ms  ({r['bare_sec'] / n_calls * 1e6:.1f} us/call)")
    print(f"heun       {r['heun_sec'] * 1e3:8.3f} ms  ({r['heun_sec'] / n_calls * 1e6:.1f} us/call)")
    print(f"ratio heun/bare = {r['ratio']:.2f} (median of paired runs; target <= 1.5)")


if __name__ == "__main__":
    main()
