"""Side-by-side CPU speed of edmkit against two peer U-Nets doing the same work (issue 10).

Peers (optional, never imported by the library): lucidrains' ``KarrasUnet`` (MIT, package
denoising-diffusion-pytorch, an EDM2 config-G port) and diffusers' ``UNet2DModel`` (Apache-2.0). Install them
beside, not into, the environment, without dependencies (the benchmark imports only the two model files)::

    python -m pip install --no-deps --target /tmp/peers denoising-diffusion-pytorch diffusers einops \\
        huggingface_hub httpx2 httpcore2 truststore h11

and point ``$EDMKIT_PEERS`` (default ``/tmp/peers``) at that folder. A peer that cannot be imported is skipped.

Every measurement runs in a fresh subprocess (``--worker``), so peak RSS and allocator state are its own; the
models are visited in alternating order over ``--rounds`` rounds and the median of the rounds is reported.
Per model and size:

- ``train img/s``: loss + backward + Adam step at batch ``--batch``. edmkit uses its real ``build_denoiser`` and
  ``make_loss`` (EDM2 uncertainty-weighted loss, forced weight normalization inside forward for E/G); the peers get
  EDM preconditioning around their raw output and the same lambda(sigma)-weighted MSE. No EMA, no data loading.
- ``eval img/s``: one denoiser evaluation D(x; sigma) per image under ``torch.inference_mode`` (what a sampler step costs),
  at batch ``--batch`` and at batch 1 (``eval1``: one image at a time, where per-call overheads show).
- ``--allocator``: edmkit's commands raise glibc's malloc thresholds (``edmkit.runtime``), so the edmkit workers do
  too by default; ``--allocator all`` gives the peers the same setting, ``none`` takes it from everyone.
- ``rss MB``: peak resident set size of the worker (``resource.getrusage``).
- ``GFLOP/img``: ``torch.utils.flop_counter`` count of one forward (eval) or forward + backward (train) per image.

Sizes: ``cifar`` = 3x32x32 at about 10M parameters, ``mnist`` = 1x28x28 at about 1.8M parameters (every model runs
at 28x28 there: KarrasUnet takes it with two downsamplings). edmkit runs as EDM2 configs G and E in fp32, and G
with its backbone under bf16 autocast (``train.autocast_backbone``, as ``--precision bf16`` trains); the bf16 run is
only made at ``--bf16-sizes`` (default mnist), since on CPUs without bf16 units (AVX2 only) it is ~10x slower.

    python benchmarks/peers.py [--rounds 3] [--steps 2] [--eval-steps 3] [--sizes cifar,mnist] [--out peers.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

SIZES = {  # name -> image shape; cifar: ~10M params, mnist: ~2M params
    "cifar": dict(channels=3, resolution=32),
    "mnist": dict(channels=1, resolution=28),
}
# KarrasUnet is an EDM2 config-G port: edmkit gets its exact channel widths, blocks per level and attention
# resolution (the same layout; KarrasUnet has ~6% more parameters, edmkit ~10% more FLOPs from EDM2's upsampling
# blocks, which run at the lower level's width). UNet2DModel is a different design: widths chosen for about the
# same parameter count. Both are printed by the run.
EDMKIT_NET = {
    "cifar": dict(model_channels=48, channel_mult=(1, 2, 4), num_blocks=2, attn_resolutions=(8,), channels_per_head=64),
    "mnist": dict(model_channels=24, channel_mult=(1, 2, 4), num_blocks=1, attn_resolutions=(7,), channels_per_head=32),
}
KARRAS_NET = {
    "cifar": dict(dim=48, dim_max=192, num_downsamples=2, num_blocks_per_stage=2, attn_res=(8,), attn_dim_head=64),
    "mnist": dict(dim=24, dim_max=96, num_downsamples=2, num_blocks_per_stage=1, attn_res=(7,), attn_dim_head=32),
}
DIFFUSERS_NET = {
    "cifar": dict(block_out_channels=(64, 128, 192), layers_per_block=2),
    "mnist": dict(block_out_channels=(32, 64, 96), layers_per_block=1),
}
MODELS = ("edmkit-G", "edmkit-E", "edmkit-G-bf16", "karras", "diffusers")
PEERS = ("karras", "diffusers")
MODES = ("train", "eval", "eval1")  # eval1: denoiser evaluations at batch 1
SIGMA_DATA = 0.5


# ---------------------------------------------------------------------------------------------------- model builders

def peers_path() -> str:
    return os.environ.get("EDMKIT_PEERS", "/tmp/peers")


def import_karras() -> type:
    """``KarrasUnet`` from its single file: the package ``__init__`` imports torchvision-dependent trainers."""
    root = Path(peers_path()) / "denoising_diffusion_pytorch"
    if not (root / "karras_unet.py").is_file():
        raise ImportError(f"no denoising_diffusion_pytorch under {peers_path()}")
    sys.path.insert(0, peers_path())
    pkg = types.ModuleType("denoising_diffusion_pytorch")  # an empty package shell: submodules load, __init__ does not
    pkg.__path__ = [str(root)]
    sys.modules.setdefault("denoising_diffusion_pytorch", pkg)
    return importlib.import_module("denoising_diffusion_pytorch.karras_unet").KarrasUnet


def import_diffusers() -> type:
    sys.path.insert(0, peers_path())
    return importlib.import_module("diffusers.models.unets.unet_2d").UNet2DModel


class PeerDenoiser(torch.nn.Module):
    """EDM preconditioning (EDM Eq. 7, Table 1) around a peer's raw network F(c_in x, c_noise) -> D(x; sigma)."""

    def __init__(self, net: torch.nn.Module, *, diffusers: bool) -> None:
        super().__init__()
        self.net, self.diffusers = net, diffusers

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, 1, 1, 1)
        c_skip = SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2)
        c_out = s * SIGMA_DATA / (s ** 2 + SIGMA_DATA ** 2).sqrt()
        c_in = 1 / (SIGMA_DATA ** 2 + s ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.net(c_in * x, c_noise)
        F_x = F_x.sample if self.diffusers else F_x
        return c_skip * x + c_out * F_x


def peer_loss(D: PeerDenoiser, y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """lambda(sigma)-weighted denoising MSE (EDM Eq. 2, 8), mean over the batch."""
    s = sigma.reshape(-1, 1, 1, 1)
    weight = (s ** 2 + SIGMA_DATA ** 2) / (s * SIGMA_DATA) ** 2
    return (weight * (D(y + noise * s, sigma) - y) ** 2).mean()


def edmkit_config(size: str, rung: str):
    from edmkit.presets import get_preset, resolve_ladder
    cfg = resolve_ladder(get_preset("mnist"), rung)
    return cfg.override("network", **SIZES[size], **EDMKIT_NET[size], dropout=0.0)


def build(model: str, size: str, *, device: str = "cpu") -> tuple[torch.nn.Module, object]:
    """(denoiser module on ``device``, loss callable ``(y, sigma, noise) -> scalar``) of ``model`` at ``size``."""
    if model.startswith("edmkit"):
        from edmkit.checkpoint import build_denoiser
        from edmkit.diffusion.loss import make_loss
        from edmkit.training.loop import autocast_backbone
        cfg = edmkit_config(size, model.split("-")[1])
        net = build_denoiser(cfg).to(device)
        if model.endswith("bf16"):
            autocast_backbone(net, dtype=torch.bfloat16, device_type=torch.device(device).type)
        loss_fn = make_loss(cfg)
        return net, lambda y, sigma, noise: loss_fn(net, y, None, sigma=sigma, noise=noise)[0].mean()
    ch, res = SIZES[size]["channels"], SIZES[size]["resolution"]
    if model == "karras":
        raw = import_karras()(image_size=res, channels=ch, dropout=0.0, **KARRAS_NET[size])
    elif model == "diffusers":
        raw = import_diffusers()(sample_size=res, in_channels=ch, out_channels=ch, **DIFFUSERS_NET[size],
                                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    else:
        raise ValueError(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
    D = PeerDenoiser(raw, diffusers=model == "diffusers").to(device)
    return D, lambda y, sigma, noise: peer_loss(D, y, sigma, noise)


# ---------------------------------------------------------------------------------------------------- one measurement

def batch_of(size: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, SIZES[size]["channels"], SIZES[size]["resolution"], SIZES[size]["resolution"])
    y = torch.rand(shape, generator=g) * 2 - 1
    sigma = (torch.randn(n, generator=g) * 1.2 - 1.2).exp()
    return y, sigma, torch.randn(shape, generator=g)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def train_stepper(net: torch.nn.Module, loss, y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor):
    """The training step every model gets: loss + backward + Adam on the fixed batch (y, sigma, noise), as a closure."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss(y, sigma, noise).backward()
        opt.step()

    return step


def measure_train(model: str, size: str, *, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    net, loss = build(model, size)
    net.train()
    y2, s2, n2 = batch_of(size, 2, seed=1)
    flops = count_flops(lambda: loss(y2, s2, n2).backward()) / 2  # forward + backward per image
    step = train_stepper(net, loss, *batch_of(size, batch))
    step()  # warm-up: allocator, Adam state, oneDNN kernel selection
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    return {"img_per_sec": batch * steps / seconds, "gflop_per_img": flops / 1e9, "params": sum(p.numel() for p in net.parameters())}


def measure_eval(model: str, size: str, *, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    net, _ = build(model, size)
    net.eval()
    y, sigma, noise = batch_of(size, batch)
    x = y + noise * sigma.reshape(-1, 1, 1, 1)
    with torch.inference_mode():
        flops = count_flops(lambda: net(x[:2], sigma[:2])) / 2
        net(x, sigma)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            net(x, sigma)
        seconds = time.perf_counter() - t0
    return {"img_per_sec": batch * steps / seconds, "gflop_per_img": flops / 1e9, "params": sum(p.numel() for p in net.parameters())}


def worker(args: argparse.Namespace) -> None:
    if args.allocator == "all" or (args.allocator == "edmkit" and args.model.startswith("edmkit")):
        from edmkit.runtime import tune_cpu_allocator
        tune_cpu_allocator()  # what every `edmkit` command does (pick_device); results unchanged, fewer page faults
    measure = measure_train if args.mode == "train" else measure_eval  # eval and eval1 differ only in the batch
    rec = measure(args.model, args.size, batch=args.batch, steps=args.steps)
    rec["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    rec["gflop_per_sec"] = rec["img_per_sec"] * rec["gflop_per_img"]
    print("RESULT " + json.dumps(rec))


def spawn(model: str, size: str, mode: str, *, batch: int, steps: int, allocator: str) -> dict:
    """Run one measurement in a fresh interpreter; a peer that cannot be imported comes back as ``{"skipped": why}``."""
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--size", size, "--mode", mode,
           "--batch", str(batch), "--steps", str(steps), "--allocator", allocator]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if model in PEERS and ("ImportError" in err or "ModuleNotFoundError" in err):
        return {"skipped": err}
    raise RuntimeError(f"worker {model} {size} {mode} failed: {proc.stderr[-2000:]}")


# ---------------------------------------------------------------------------------------------------- driver

def median_of(recs: list[dict]) -> dict:
    if not recs:
        return {"skipped": "not run at this size (--bf16-sizes)"}
    if any("skipped" in r for r in recs):
        return {"skipped": recs[0].get("skipped", "")}
    out = {k: statistics.median(r[k] for r in recs) for k in recs[0]}
    out["rounds_img_per_sec"] = [r["img_per_sec"] for r in recs]
    return out


def ratio(a: dict, b: dict) -> float:
    if "skipped" in a or "skipped" in b:
        return math.nan
    return a["img_per_sec"] / b["img_per_sec"]


def print_table(results: dict) -> None:
    for size, by_model in results["median"].items():
        print(f"\n== {size}: {SIZES[size]['channels']}x{SIZES[size]['resolution']}x{SIZES[size]['resolution']}, batch {results['batch'][size]}")
        print(f"{'model':15s} {'params':>8s} {'train img/s':>11s} {'eval img/s':>10s} {'eval1 img/s':>11s} {'train GF/img':>12s} {'train GF/s':>10s} "
              f"{'eval GF/s':>9s} {'rss train MB':>12s} {'rss eval MB':>11s}")
        for model, m in by_model.items():
            tr, ev, ev1 = m["train"], m["eval"], m["eval1"]
            if "skipped" in tr:
                print(f"{model:15s} skipped: {tr['skipped']}")
                continue
            print(f"{model:15s} {tr['params'] / 1e6:7.2f}M {tr['img_per_sec']:11.1f} {ev['img_per_sec']:10.1f} {ev1['img_per_sec']:11.1f} {tr['gflop_per_img']:12.3f} "
                  f"{tr['gflop_per_sec']:10.1f} {ev['gflop_per_sec']:9.1f} {tr['rss_mb']:12.0f} {ev['rss_mb']:11.0f}")
        print("ratios (edmkit / peer, img/s):")
        for name, r in results["ratios"][size].items():
            if math.isnan(r["train"]):
                continue  # a side was skipped
            print(f"  {name:38s} train {r['train']:5.2f}x   eval {r['eval']:5.2f}x   eval1 {r['eval1']:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement (after one warm-up step)")
    parser.add_argument("--eval-steps", type=int, default=3, help="timed denoiser evaluations per measurement")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sizes", default="cifar,mnist")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--bf16-sizes", default="mnist", help="sizes at which edmkit-G-bf16 runs (it is slow without CPU bf16 units)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--allocator", choices=("edmkit", "all", "none"), default="edmkit",
                        help="who gets edmkit.runtime.tune_cpu_allocator: edmkit only, as shipped (default), all models, or none")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    sizes, models = args.sizes.split(","), args.models.split(",")
    runs: dict = {s: {m: {mode: [] for mode in MODES} for m in models} for s in sizes}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        order = models if r % 2 == 0 else models[::-1]  # alternate so that no model always runs first (or last)
        for size in sizes:
            for model in order:
                if model.endswith("bf16") and size not in args.bf16_sizes.split(","):
                    continue
                for mode in MODES:
                    steps = {"train": args.steps, "eval": args.eval_steps, "eval1": 8 * args.eval_steps}[mode]
                    rec = spawn(model, size, mode, batch=1 if mode == "eval1" else args.batch, steps=steps, allocator=args.allocator)
                    runs[size][model][mode].append(rec)
                    shown = rec.get("skipped") or f"{rec['img_per_sec']:.1f} img/s, {rec['params'] / 1e6:.2f}M params"
                    print(f"[round {r + 1}/{args.rounds} {time.perf_counter() - t0:5.0f}s] {size} {model} {mode}: {shown}", flush=True)

    median = {s: {m: {mode: median_of(runs[s][m][mode]) for mode in MODES} for m in models} for s in sizes}
    ratios = {s: {} for s in sizes}
    for s in sizes:
        for mine in (m for m in models if m.startswith("edmkit")):
            for peer in (m for m in models if m in PEERS):
                ratios[s][f"{mine} / {peer}"] = {mode: ratio(median[s][mine][mode], median[s][peer][mode]) for mode in MODES}
            if mine.endswith("bf16") and mine[:-5] in models:
                ratios[s][f"{mine} / {mine[:-5]}"] = {mode: ratio(median[s][mine][mode], median[s][mine[:-5]][mode]) for mode in MODES}
    results = {"allocator": args.allocator, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": os.cpu_count(), "rounds": args.rounds,
               "steps": args.steps, "eval_steps": args.eval_steps, "batch": {s: args.batch for s in sizes},
               "seconds": time.perf_counter() - t0, "median": median, "ratios": ratios, "runs": runs}
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
