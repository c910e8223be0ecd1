"""The GPU path, checked in one command on a CUDA machine (issue 24): tests, train speed and memory, sampling, DDP.

    python benchmarks/gpu_check.py OUTDIR

edmkit is imported from this checkout's ``src/`` (nothing to install: the GPU machine keeps its own torch). Each section
runs in its own try/except under its own time budget (about 7.5 minutes in all), and OUTDIR/gpu_check.json and
OUTDIR/summary.md are rewritten after every measurement, so a run cut short still leaves what it measured:

1. tests: the ``gpu``-marked tests (tests/test_gpu.py: MP layers, preconditioning, loss and gradients against the CPU,
   Heun's order, EMA, checkpoint round trip, bit-exact resume with deterministic algorithms, bf16, torch.compile) in a
   pytest subprocess with ``EDMKIT_TEST_DEVICE=cuda``.
2. train: img/s and peak GPU memory of ``training.loop.train_step`` through ``wrap_for_training`` (what ``edmkit train``
   runs: EMA, augmentation and all) for each CIFAR preset (``cifar10`` and every backbone's ``<arch>-cifar10``) at fp32,
   bf16 autocast and bf16 + torch.compile; then edmkit G against the peers of benchmarks/peers.py at its matched
   layouts and the same step (``peers.train_stepper``), fp32 and bf16, each model's backbone under the same autocast.
   A peer not installed (``$EDMKIT_PEERS``) is skipped. Ratios are taken within the run.
3. sampling: denoiser evaluations/s (images) of the ``cifar10`` preset at batch 1, 64 and 512, fp32 and bf16; Heun's
   time over a bare loop of the same denoiser calls (benchmarks/sampler_overhead.py) for a one-conv denoiser at batch 1
   and the cifar10 network at batch 64.
4. ddp: two optimizer steps through DistributedDataParallel on one nccl process equal the plain steps bit for bit
   (deterministic algorithms); with more than one GPU, two processes equal them up to float rounding.

fp32 throughput runs with TF32 and cuDNN autotuning on, as ``edmkit`` commands set them on CUDA (``pick_device``).
Without CUDA it prints "no CUDA device: nothing run" and exits 0. ``--device cpu --smoke`` (not in ``--help``) runs every
section with tiny configs on the CPU (torch.compile with the eager backend): what tests/test_gpu_check.py runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "benchmarks")]  # this checkout's edmkit; peers.py, sampler_overhead.py

BUDGET_SEC = {"tests": 150, "train": 180, "sampling": 45, "ddp": 60}  # full run: 435 s of sections, < 8 min with start-up
SMOKE_BUDGET_SEC = {"tests": 60, "train": 30, "sampling": 15, "ddp": 45}
NEEDS = ("numpy", "scipy", "safetensors", "PIL", "tqdm", "click", "matplotlib", "pytest")  # edmkit's dependencies + pytest
SAMPLE_BATCHES = (1, 64, 512)
TRAIN_BATCH, PEER_BATCH, DDP_BATCH = 256, 256, 64


# ---------------------------------------------------------------------------------------------------- the report

class Report:
    """The results so far, written to OUTDIR/gpu_check.json and OUTDIR/summary.md on every ``save``."""

    def __init__(self, out: Path, header: dict) -> None:
        self.out, self.data = out, {**header, "sections": {}}

    def section(self, name: str) -> dict:
        return self.data["sections"].setdefault(name, {})

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "summary.md").write_text(render_summary(self.data))


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run_section(report: Report, name: str, fn, *args) -> None:
    """Run one section under its budget; an exception is recorded in the section, never raised."""
    rec, t0 = report.section(name), time.monotonic()
    rec["budget_sec"] = args[-1]
    print(f"== {name} (budget {args[-1]:.0f} s)", flush=True)
    try:
        fn(report, rec, *args[:-1], Deadline(args[-1]))
    except Exception as e:  # the check goes on to the next section: record the error for the summary
        rec["error"] = f"{type(e).__name__}: {e}".strip()[:500]
        rec["traceback"] = traceback.format_exc()[-3000:]
        print(rec["traceback"], file=sys.stderr, flush=True)
    rec["seconds"] = round(time.monotonic() - t0, 1)
    report.save()


def header(device) -> dict:
    import torch
    cuda = device.type == "cuda"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
            "gpus": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "python": platform.python_version(),
            "commit": commit or None, "missing_packages": [m for m in NEEDS if importlib.util.find_spec(m) is None]}


# ---------------------------------------------------------------------------------------------------- timing helpers

def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, *, steps: int, warmup: int) -> dict:
    """Seconds per call of ``step`` after ``warmup`` calls, and the peak GPU memory of all of them (None on a CPU)."""
    import torch
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    sec = (time.perf_counter() - t1) / steps
    return {"sec_per_step": sec, "warmup_sec": t1 - t0, "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}


@contextlib.contextmanager
def compile_backend(name: str):
    """``nn.Module.compile`` (what ``wrap_for_training`` calls) with another backend: ``eager`` in smoke runs, since
    inductor spends minutes building C++ kernels on a CPU. ``inductor``, the default, leaves it alone."""
    import torch
    original = torch.nn.Module.compile
    if name != "inductor":
        torch.nn.Module.compile = functools.partialmethod(original, backend=name)
    try:
        yield
    finally:
        torch.nn.Module.compile = original


# ---------------------------------------------------------------------------------------------------- 1 tests

def section_tests(report: Report, rec: dict, args, deadline: Deadline) -> None:
    if importlib.util.find_spec("pytest") is None:
        raise RuntimeError("pytest is not installed here")
    xml = report.out / "pytest_gpu.xml"
    targets = ["tests/test_gpu.py", "-k", "ema or checkpoint"] if args.smoke else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "gpu", f"--junitxml={xml}", *targets]  # -v: the log names each test
    env = {**os.environ, "EDMKIT_TEST_DEVICE": args.device, "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    rec["command"] = " ".join(cmd[1:])
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(deadline.left(), 1))
        output, rec["returncode"] = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, rec["error"] = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), "time budget ran out"
    (report.out / "pytest_gpu.log").write_text(output)
    rec["tail"] = output.strip().splitlines()[-3:]
    if xml.is_file():
        rec.update(junit_results(xml))


def junit_results(path: Path) -> dict:
    """passed count, and failed / skipped tests with their first message line, from pytest's JUnit XML."""
    passed, failed, skipped = 0, [], []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            failed.append(f"{name}: {(bad.get('message') or '').splitlines()[0][:200] if bad.get('message') else ''}")
        elif case.find("skipped") is not None:
            skipped.append(f"{name}: {case.find('skipped').get('message', '')[:200]}")
        else:
            passed += 1
    return {"passed": passed, "failed": failed, "skipped": skipped}


# ---------------------------------------------------------------------------------------------------- 2 train

def train_presets() -> list[str]:
    """``cifar10`` and each backbone's CIFAR preset (``<arch>-cifar10``) that exists."""
    from edmkit.nn.build import NETWORKS
    from edmkit.presets import PRESETS
    return ["cifar10"] + [f"{arch}-cifar10" for arch in NETWORKS if f"{arch}-cifar10" in PRESETS]


def preset_config(name: str, *, precision: str, compile: bool, batch: int, smoke: bool):
    from edmkit.presets import get_preset
    cfg = get_preset(name).override("train", precision=precision, compile=compile, batch=batch, batch_per_device=0)
    if smoke:  # the preset's backbone at its smallest: two levels of one block, 8x8
        cfg = cfg.override("network", model_channels=16, channel_mult=(1, 2), num_blocks=1, channels_per_head=8, resolution=8, attn_resolutions=(4,))
    return cfg


def fresh_train_state(cfg, device):
    """A new net, Adam and EMA on ``device``, with ``train_net`` wrapped as ``edmkit train`` wraps it."""
    import torch
    from edmkit import checkpoint as ckpt
    from edmkit.training.ema import PowerFunctionEMA
    from edmkit.training.loop import wrap_for_training
    from edmkit.training.run_state import TrainState
    torch.manual_seed(0)
    net = ckpt.build_denoiser(cfg).to(device).train()
    o = cfg.optim
    state = TrainState(net=net, optimizer=torch.optim.Adam(net.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps),
                       ema=PowerFunctionEMA(net, stds=cfg.ema.stds), scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16"))
    state.train_net = wrap_for_training(net, cfg, device)
    return state


def random_batch(cfg, n: int, device, seed: int = 0):
    """Images [n, C, H, W] in [-1, 1] and one-hot labels (or None) on ``device``."""
    import torch
    g = torch.Generator().manual_seed(seed)
    c = cfg.network
    y = (torch.rand(n, c.channels, c.resolution, c.resolution, generator=g) * 2 - 1).to(device)
    labels = torch.nn.functional.one_hot(torch.randint(c.label_dim, (n,), generator=g), c.label_dim).float().to(device) if c.label_dim else None
    return y, labels


def measure_preset(name: str, variant: str, device, args) -> dict:
    from edmkit.diffusion.loss import make_loss
    from edmkit.training.loop import train_step
    cfg = preset_config(name, precision="fp32" if variant == "fp32" else "bf16", compile=variant == "bf16+compile",
                        batch=args.train_batch, smoke=args.smoke)
    with compile_backend(args.compile_backend):
        state = fresh_train_state(cfg, device)
        loss_fn = make_loss(cfg)
        y, labels = random_batch(cfg, cfg.train.batch, device)
        t = time_steps(lambda: train_step(state, loss_fn, cfg, y, labels), device, steps=args.steps, warmup=args.warmup)
    return {**t, "img_per_sec": cfg.train.batch / t["sec_per_step"], "params": sum(p.numel() for p in state.net.parameters())}


def measure_peer(model: str, variant: str, device, args) -> dict:
    """edmkit G or a peer at benchmarks/peers.py's cifar layout, the backbone under bf16 autocast for ``bf16``."""
    import peers
    import torch
    from edmkit.training.loop import autocast_backbone
    torch.manual_seed(0)
    try:
        net, loss = peers.build(model, args.peer_size, device=str(device))
    except ImportError as e:
        return {"skipped": f"not installed ({e})"}
    if variant == "bf16":
        autocast_backbone(net, dtype=torch.bfloat16, device_type=device.type)  # edmkit's Denoiser and PeerDenoiser: both keep F in .net
    net.train()
    step = peers.train_stepper(net, loss, *(t.to(device) for t in peers.batch_of(args.peer_size, args.peer_batch)))
    t = time_steps(step, device, steps=args.steps, warmup=args.warmup)
    return {**t, "img_per_sec": args.peer_batch / t["sec_per_step"], "params": sum(p.numel() for p in net.parameters())}


def section_train(report: Report, rec: dict, device, args, deadline: Deadline) -> None:
    rec.update(batch=args.train_batch, peer_batch=args.peer_batch, steps=args.steps, warmup=args.warmup, peer_size=args.peer_size, presets={}, peers={}, ratios={})
    compile_min_sec = 5 if args.smoke else 100  # a compile takes about this long: do not start one with less left
    plan = [(p, v) for v in ("fp32", "bf16") for p in train_presets()] + [("peer", v) for v in ("fp32", "bf16")]
    plan += [(p, "bf16+compile") for p in train_presets()[:1 if args.smoke else None]]  # last: the slowest, cifar10's first
    for name, variant in plan:
        if deadline.left() < (compile_min_sec if variant.endswith("compile") else 1):
            rec.setdefault("not_run", []).append(f"{name} {variant}: time budget")
            continue
        if name == "peer":
            for model in ("edmkit-G", *peers_list()[:1 if args.smoke else None]):  # smoke: one peer covers the path
                rec["peers"].setdefault(model, {})[variant] = guarded(measure_peer, model, variant, device, args)
                report.save()
        else:
            rec["presets"].setdefault(name, {})[variant] = guarded(measure_preset, name, variant, device, args)
        print(f"  {name} {variant}: done ({deadline.left():.0f} s left)", flush=True)
        rec["ratios"] = train_ratios(rec)
        report.save()


def peers_list() -> tuple[str, ...]:
    import peers
    return peers.PEERS


def guarded(fn, *args) -> dict:
    """``fn(*args)``, or ``{"error": ...}``: one failed measurement does not end the section."""
    try:
        return fn(*args)
    except Exception as e:
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        return {"error": f"{type(e).__name__}: {e}".strip()[:300]}
    finally:
        free_memory()


def free_memory() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ips(rec: dict | None) -> float | None:
    return rec.get("img_per_sec") if rec else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def train_ratios(rec: dict) -> dict:
    out = {}
    for name, v in rec["presets"].items():
        out[f"{name} bf16 / fp32"] = ratio(ips(v.get("bf16")), ips(v.get("fp32")))
        out[f"{name} bf16+compile / bf16"] = ratio(ips(v.get("bf16+compile")), ips(v.get("bf16")))
    mine = rec["peers"].get("edmkit-G", {})
    for peer, v in rec["peers"].items():
        if peer != "edmkit-G":
            for variant in ("fp32", "bf16"):
                out[f"edmkit-G / {peer} {variant}"] = ratio(ips(mine.get(variant)), ips(v.get(variant)))
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------------------------------- 3 sampling

def eval_rate(net, x, sigma, device, *, min_sec: float) -> float:
    """Denoiser evaluations per second, in images: batches of ``x`` until ``min_sec`` have passed (at least 3)."""
    import torch
    with torch.inference_mode():
        net(x, sigma)  # warm-up
        net(x, sigma)
        sync(device)
        calls, t0 = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - t0 < min_sec:
            net(x, sigma)
            calls += 1
            if calls % 8 == 0:
                sync(device)
        sync(device)
        return calls * x.shape[0] / (time.perf_counter() - t0)


def section_sampling(report: Report, rec: dict, device, args, deadline: Deadline) -> None:
    import torch
    from edmkit import checkpoint as ckpt
    from edmkit.diffusion.schedules import karras_sigmas
    from edmkit.training.loop import autocast_backbone
    from sampler_overhead import heun_overhead
    cfg = preset_config("cifar10", precision="fp32", compile=False, batch=1, smoke=args.smoke)
    n = cfg.network
    rec.update(preset="cifar10", evals_per_sec={}, heun_over_bare={})
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        net = ckpt.build_denoiser(cfg).to(device).eval()
        if precision == "bf16":
            autocast_backbone(net, dtype=torch.bfloat16, device_type=device.type)
        for b in args.sample_batches:
            if deadline.left() < 2:
                rec.setdefault("not_run", []).append(f"{precision} batch {b}: time budget")
                continue
            x = torch.randn(b, n.channels, n.resolution, n.resolution, device=device) * 2.0
            rec["evals_per_sec"][f"{precision} b={b}"] = guarded(lambda: {"img_per_sec": eval_rate(net, x, torch.full((b,), 2.0, device=device), device, min_sec=args.min_sec)})
            report.save()
    torch.manual_seed(0)
    conv, net_fp32 = torch.nn.Conv2d(3, 3, 3, padding=1).to(device), ckpt.build_denoiser(cfg).to(device).eval()
    heun_cases = {"conv b=1": (lambda x, sigma, labels: conv(x), 1), f"cifar10 fp32 b={args.heun_batch}": (net_fp32, args.heun_batch)}
    for name, (denoiser, b) in heun_cases.items():
        if deadline.left() < 2:
            rec.setdefault("not_run", []).append(f"heun {name}: time budget")
            continue
        noise = torch.randn(b, n.channels, n.resolution, n.resolution, device=device)
        sigmas = karras_sigmas(18, device=device)
        rec["heun_over_bare"][name] = guarded(lambda: heun_overhead(denoiser, noise, sigmas, repeats=args.heun_repeats))
        report.save()


# ---------------------------------------------------------------------------------------------------- 4 ddp

def ddp_config(smoke: bool):
    from edmkit.presets import get_preset
    if smoke:
        return get_preset("tiny").override("network", resolution=8, attn_resolutions=(4,)).override("train", batch=4)
    return get_preset("cifar10-small").override("network", dropout=0.0).override("train", batch=DDP_BATCH, batch_per_device=0)


def ddp_worker(args) -> None:
    """One rank: two plain train steps, then two through DDP (the process group joined in between), compared on rank 0."""
    import torch
    import torch.distributed as td
    from torch.nn.parallel import DistributedDataParallel

    from edmkit import checkpoint as ckpt
    from edmkit import dist
    from edmkit.diffusion.loss import make_loss
    from edmkit.training.ema import PowerFunctionEMA
    from edmkit.training.loop import train_step
    from edmkit.training.run_state import TrainState
    from edmkit.training.step_inputs import make_shard

    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    cfg = ddp_config(args.smoke)
    loss_fn = make_loss(cfg)
    y, labels = random_batch(cfg, cfg.train.batch, device, seed=7)

    def two_steps(wrap, shard):
        torch.manual_seed(0)
        net = ckpt.build_denoiser(cfg).to(device).train()
        state = TrainState(net=net, optimizer=torch.optim.Adam(net.parameters(), lr=cfg.optim.lr), ema=PowerFunctionEMA(net, stds=cfg.ema.stds))
        state.train_net = wrap(net)
        rows = shard.rows().to(device) if shard else slice(None)
        losses = [train_step(state, loss_fn, cfg, y[rows], None if labels is None else labels[rows], shard=shard)["loss"] for _ in range(2)]
        return state, losses

    plain, plain_losses = two_steps(lambda net: None, None)  # before the group exists: no collective touches it
    device = dist.init(device)  # world > 1: joins as torchrun's processes do (nccl on CUDA, gloo on CPU)
    if not dist.is_initialized():  # one process: dist.init and wrap_ddp leave DDP out, which this check wants to run
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                              device_id=device if device.type == "cuda" else None)
    world = dist.world_size()
    if world == 1:
        wrap = functools.partial(DistributedDataParallel, device_ids=[device] if device.type == "cuda" else None,
                                 forward_sync_buffers=False, find_unused_parameters=not cfg.loss.uncertainty)
    else:
        wrap = functools.partial(dist.wrap_ddp, device=device, find_unused_parameters=not cfg.loss.uncertainty)
    ddp, ddp_losses = two_steps(wrap, make_shard(cfg, rank=dist.rank(), world=world))
    if dist.is_main():
        a = {**plain.net.state_dict(), **{f"ema.{k}": v for k, v in plain.ema.averaged(0).items()}}
        b = {**ddp.net.state_dict(), **{f"ema.{k}": v for k, v in ddp.ema.averaged(0).items()}}
        diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
        Path(args.ddp_out).write_text(json.dumps({
            "world": world, "backend": td.get_backend(), "equal": all(torch.equal(a[k], b[k]) for k in a), "max_abs_diff": diff,
            "plain_loss": plain_losses, "ddp_loss": ddp_losses, "params": sum(p.numel() for p in plain.net.parameters())}))
    dist.barrier()
    dist.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ddp(world: int, args, out: Path) -> tuple[list[subprocess.Popen], Path]:
    """Start ``world`` worker processes as torchrun would (RANK, WORLD_SIZE, ...); rank 0 writes the returned path."""
    result = out / f"ddp_world{world}.json"
    result.unlink(missing_ok=True)
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
            "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--ddp-worker", "--device", args.device, "--ddp-out", str(result)] + (["--smoke"] if args.smoke else [])
    return [subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(world)], result


def finish_ddp(procs: list[subprocess.Popen], result: Path, deadline: Deadline) -> dict:
    """Wait for the workers (killed when the budget runs out) and read rank 0's result."""
    try:
        outputs = [p.communicate(timeout=max(deadline.left(), 1))[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return {"error": "time budget ran out"}
    if not result.is_file():
        return {"error": f"no result; return codes {[p.returncode for p in procs]}: {outputs[0].strip()[-1500:]}"}
    rec = json.loads(result.read_text())
    result.unlink()
    rec["ok"] = rec["equal"] if rec["world"] == 1 else rec["max_abs_diff"] <= 1e-4  # two processes: same up to float rounding
    return rec


def section_ddp(report: Report, rec: dict, device, args, deadline: Deadline) -> None:
    """The one-process check, and the two-process one where two GPUs are visible (smoke: on the CPU), run side by side."""
    import torch
    worlds = [1] + ([2] if args.smoke or (device.type == "cuda" and torch.cuda.device_count() > 1) else [])
    started = {world: start_ddp(world, args, report.out) for world in worlds}
    for world, (procs, result) in started.items():
        rec[f"world{world}"] = finish_ddp(procs, result, deadline)
        report.save()


# ---------------------------------------------------------------------------------------------------- summary

def cell(m: dict | None) -> str:
    """img/s (peak GB) of one measurement, or why there is none."""
    if not m:
        return "-"
    if "img_per_sec" not in m:
        return m.get("skipped") or f"error: {m.get('error', '?')}"
    return f"{m['img_per_sec']:.1f}" + (f" ({m['peak_gb']:.1f} GB)" if m.get("peak_gb") is not None else "")


def render_summary(d: dict) -> str:
    s = d["sections"]
    lines = [f"# edmkit GPU check, {d['date']}", "",
             f"{d['device_name']} ({d['device']}, {d['gpus']} visible) · torch {d['torch']} · CUDA {d['cuda']} · cuDNN {d['cudnn']} · "
             f"Python {d['python']} · commit {d['commit']}" + (" · **smoke run (tiny configs, not measurements)**" if d.get("smoke") else ""),
             f"missing packages: {', '.join(d['missing_packages']) or 'none'}", ""]
    for name, title in (("tests", "1 Tests on the device"), ("train", "2 Training throughput and peak memory"),
                        ("sampling", "3 Sampling"), ("ddp", "4 DDP")):
        rec = s.get(name)
        lines.append(f"## {title}")
        if rec is None:
            lines += ["not run", ""]
            continue
        lines.append(f"{rec.get('seconds', '?')} s of a {rec.get('budget_sec')} s budget" + (f"; **error**: {rec['error']}" if "error" in rec else ""))
        lines += [""] + globals()[f"summary_{name}"](rec) + [""]
    return "\n".join(lines)


def summary_tests(rec: dict) -> list[str]:
    if "passed" not in rec:
        return [f"no results; output ends: {' / '.join(rec.get('tail', []))}"]
    out = [f"{rec['passed']} passed, {len(rec['failed'])} failed, {len(rec['skipped'])} skipped (`{rec.get('command', '')}`)"]
    out += [f"- FAILED {f}" for f in rec["failed"]] + [f"- skipped {f}" for f in rec["skipped"]]
    return out


def summary_train(rec: dict) -> list[str]:
    out = [f"img/s (peak GPU memory) of one optimizer step at batch {rec.get('batch')} (presets) and {rec.get('peer_batch')} (peers)", "",
           "| preset / model | params | fp32 | bf16 | bf16+compile |", "|---|---|---|---|---|"]
    for name, v in {**rec.get("presets", {}), **{f"{k} (peers.py {rec.get('peer_size')})": v for k, v in rec.get("peers", {}).items()}}.items():
        params = next((m["params"] for m in v.values() if "params" in m), None)
        out.append(f"| {name} | {f'{params / 1e6:.1f}M' if params else '-'} | {cell(v.get('fp32'))} | {cell(v.get('bf16'))} | {cell(v.get('bf16+compile'))} |")
    out += ["", "ratios (img/s):"] + [f"- {k}: {v:.2f}x" for k, v in rec.get("ratios", {}).items()]
    out += [f"- {k} bf16+compile: compile and {rec.get('warmup', 2)} warm-up steps took {v['bf16+compile']['warmup_sec']:.0f} s"
            for k, v in rec.get("presets", {}).items() if "warmup_sec" in v.get("bf16+compile", {})]
    return out + [f"- not run: {x}" for x in rec.get("not_run", [])]


def summary_sampling(rec: dict) -> list[str]:
    out = [f"denoiser evaluations/s (images) of the {rec.get('preset')} preset's network:", ""]
    out += [f"- {k}: {cell(v)}" for k, v in rec.get("evals_per_sec", {}).items()]
    out += ["", "Heun's time / a bare loop of the same denoiser calls (target <= 1.5):"]
    for k, v in rec.get("heun_over_bare", {}).items():
        out.append(f"- {k}: " + (f"{v['ratio']:.2f}x ({v['heun_sec'] * 1e3:.2f} ms for {v['calls']} calls)" if "ratio" in v else f"error: {v.get('error')}"))
    return out + [f"- not run: {x}" for x in rec.get("not_run", [])]


def summary_ddp(rec: dict) -> list[str]:
    out = []
    for k, v in rec.items():
        if k.startswith("world"):
            out.append(f"- {k[5:]} process(es): " + (f"{'OK' if v['ok'] else 'MISMATCH'} ({v['backend']}, bit-equal {v['equal']}, max |diff| "
                                                    f"{v['max_abs_diff']:.2e} after 2 steps)" if "ok" in v else f"error: {v.get('error')}"))
    return out


# ---------------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="example: python benchmarks/gpu_check.py /tmp/gpu_check --sections tests,ddp",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", type=Path, help="folder for gpu_check.json, summary.md and the pytest log")
    ap.add_argument("--sections", default="tests,train,sampling,ddp", help="comma-separated subset to run")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per measurement (after 2 warm-up steps)")
    hidden = argparse.SUPPRESS
    ap.add_argument("--device", default="cuda", help=hidden)
    ap.add_argument("--smoke", action="store_true", help=hidden)
    ap.add_argument("--ddp-worker", action="store_true", help=hidden)
    ap.add_argument("--ddp-out", help=hidden)
    args = ap.parse_args(argv)
    if not args.ddp_worker and args.outdir is None:
        ap.error("OUTDIR is required")
    if unknown := set(args.sections.split(",")) - set(BUDGET_SEC):
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}; valid: {', '.join(BUDGET_SEC)}")
    smoke = args.smoke
    args.compile_backend = "eager" if smoke else "inductor"
    args.train_batch, args.peer_batch, args.peer_size = (4, 2, "mnist") if smoke else (TRAIN_BATCH, PEER_BATCH, "cifar")
    args.steps, args.warmup = (1, 1) if smoke else (args.steps, 2)
    args.sample_batches = (1, 4) if smoke else SAMPLE_BATCHES
    args.min_sec, args.heun_repeats, args.heun_batch = (0.0, 2, 2) if smoke else (0.5, 5, 64)
    args.budgets = SMOKE_BUDGET_SEC if smoke else BUDGET_SEC
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing run")
        return 0
    device = torch.device(args.device)
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: one thread is faster, and steady on a busy machine (as tests/conftest.py)
    if device.type == "cuda":
        from edmkit.cli._common import pick_device
        pick_device(args.device)  # TF32 and cuDNN autotuning, as `edmkit` commands run on CUDA (tests and DDP: own processes)
    args.outdir.mkdir(parents=True, exist_ok=True)
    report = Report(args.outdir, {**header(device), "smoke": args.smoke})
    report.save()
    sections = {"tests": (section_tests, args), "train": (section_train, device, args),
                "sampling": (section_sampling, device, args), "ddp": (section_ddp, device, args)}
    for name in args.sections.split(","):
        fn, *fn_args = sections[name]
        run_section(report, name, fn, *fn_args, args.budgets[name])
    print(f"wrote {args.outdir / 'summary.md'} and {args.outdir / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
