"""Post-hoc EMA sweep: reconstruct a grid of sigma_rel from a run's snapshots, score each, keep the best (EDM2 Fig. 5).

``sweep`` scores each reconstruction (lower is better; by default ``denoising_score``, the denoising loss on fixed
images, sigmas and noise; ``fid_score``: FID of images generated from fixed seeds, as EDM2 Fig. 5 picks the EMA
length), writes ``sweep.csv``, ``sweep.json`` and ``sweep.png``, and names (and saves) the best. The reconstruction
itself is :mod:`edmkit.training.phema`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from edmkit import checkpoint as ckpt
from edmkit.config import ExperimentConfig
from edmkit.diffusion.precond import Denoiser
from edmkit.files import write_json

if TYPE_CHECKING:  # the metrics stack is imported only when an FID score is built
    from edmkit.metrics.detectors import Detector
    from edmkit.metrics.reference import Reference

from edmkit.training.phema import check_out_dir, check_sigma_rels, collect_snapshots, iter_reconstructions, resolve_at_nimg

DEFAULT_SWEEP = (0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20, 0.25)


def denoising_score(cfg: ExperimentConfig, *, n_images: int = 128, n_sigmas: int = 8, seed: int = 0, data: str | None = None,
                    device: torch.device | str = "cpu", batch: int = 256) -> Callable[[Denoiser], float]:
    """Score = EDM denoising loss on fixed images, sigmas and noise (EDM Eq. 2 with lambda(sigma)); lower is better.

    The images are ``n_images`` fixed picks (``seed``) from the run's held-out images when it was trained
    with a split (``train.val_fraction`` > 0), else from its dataset (``data`` overrides it: all its images
    are candidates). The sigmas are the ``n_sigmas`` midpoint quantiles (k + 1/2)/K of the training
    log-normal exp(P_mean + P_std z), so the mean approximates the training objective; every image is
    noised at every sigma with fixed noise. It is the same loss as the training's validation loss
    (``validation.probe_loss``), with EDM's lambda(sigma) for every formulation. Without a held-out split
    the images are training images, so it measures fit, not generalisation.

    Returns:
        A function net -> float (mean loss over images and sigmas), the same number for the same network.
    """
    from edmkit.data.dataset import dataset_of
    from edmkit.diffusion.loss import EDMLoss
    from edmkit.training.validation import make_probe, probe_loss, split_dataset

    if n_images < 1 or n_sigmas < 1 or batch < 1:
        raise ValueError(f"the denoising score needs n_images, n_sigmas and batch >= 1, got {n_images}, {n_sigmas}, {batch}")
    n = cfg.network
    dataset = dataset_of(cfg, data)
    if data is None:
        _, held_out = split_dataset(dataset, fraction=cfg.train.val_fraction, seed=cfg.train.seed)
        dataset = dataset if held_out is None else held_out
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n_images]
    loss_fn = EDMLoss(P_mean=cfg.loss.P_mean, P_std=cfg.loss.P_std, sigma_data=n.sigma_data, uncertainty=False)
    probe = make_probe(dataset, idx, label_dim=n.label_dim, sigmas=loss_fn.sigma_quantiles(n_sigmas), noise_seed=seed)

    def score(net: Denoiser) -> float:
        return probe_loss(net, loss_fn, probe, batch=batch, device=device).mean().item()

    score.__name__ = "denoising loss"
    return score


def fid_score(ref: Reference, detector: Detector, *, resolution: int, channels: int, label_dim: int = 0, n: int = 1000,
              seeds: Sequence[int] | None = None, steps: int = 18, sampler: str = "heun", batch: int = 64,
              device: torch.device | str = "cpu", log: Callable[[str], None] | None = None,
              options: dict[str, float] | None = None) -> Callable[[Denoiser], float]:
    """Score = FID of ``n`` generated images against reference statistics (EDM2 Sec. 3.2, Fig. 5); lower is better.

    EDM2 chooses the EMA length by FID. Every network is sampled from the same fixed seeds (default
    0..n-1), so each image starts from the same noise (and class label) for every sigma_rel, and score
    differences are not sampling noise. The number is ``edmkit.metrics.evaluate.evaluate_generator``'s
    FID (the same code as ``edmkit metrics gen``). At small n the FID is biased upward: compare scores
    at the same n only. The checks (detector hash, seeds, sampler) run here, before any reconstruction.

    Args:
        ref: Reference statistics (``edmkit.metrics.reference.load_reference``).
        detector: The reference's detector file (``reference_detector``); its sha256 must match.
        resolution, channels, label_dim: Of the run's network (``config.network``).
        n: Images per network.
        seeds: The n seeds (default 0..n-1).
        steps, sampler: Sampler settings (Heun with 18 steps: 35 network evaluations per image).
        options: Further ``generate_images`` keywords: the sampler's options and the schedule (e.g. ``TrainConfig.sampling()``
            less its sampler and steps).
        batch: Images per sampling / detector batch (does not change the images).
        device: Where sampling runs.
        log: Receives notices (small n, image shape, detector input conversion) once, here.

    Returns:
        A function net -> float named ``"FID (n=<n>)"``, the same number for the same network.
    """
    from edmkit.diffusion.samplers import get_sampler
    from edmkit.metrics import evaluate as ev
    from edmkit.metrics.reference import check_detector

    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n or len(set(seeds)) != n:
        raise ValueError(f"the FID score needs n = {n} distinct seeds, got {len(seeds)} seeds ({len(set(seeds))} distinct)")
    if n < 2 or steps < 1 or batch < 1:
        raise ValueError(f"the FID score needs n >= 2, steps >= 1 and batch >= 1, got {n}, {steps}, {batch}")
    get_sampler(sampler)
    check_detector(ref, detector)
    for line in ev.evaluation_notices(ref, detector, n=n, resolution=resolution, channels=channels) if log is not None else ():
        log(line)
    generate_kw = dict(resolution=resolution, channels=channels, label_dim=label_dim, sampler=sampler, steps=steps, **(options or {}))

    def score(net: Denoiser) -> float:
        result = ev.evaluate_generator(net, ref=ref, detector=detector, seeds=seeds, metrics=("fid",), batch=batch, device=device,
                                       generate_kw=generate_kw)
        return float(result["repeats"][0]["fid"])

    score.__name__ = f"FID (n={n})"
    return score


def _net_from_state(cfg: ExperimentConfig, state: dict[str, torch.Tensor], device: torch.device | str) -> Denoiser:
    net = ckpt.build_denoiser(cfg)
    net.load_state_dict(state, strict=True)
    return net.to(device).eval().requires_grad_(False)


def sweep(run_dir: str | Path, *, out_dir: str | Path, sigma_rels: Sequence[float] = DEFAULT_SWEEP,
          score_fn: Callable[[Denoiser], float] | None = None, at_nimg: int | None = None, device: torch.device | str = "cpu",
          save_best: bool = True, progress: bool = False) -> dict[str, Any]:
    """Reconstruct a grid of sigma_rel, score each (lower is better), write the table and plot, name the best.

    Writes ``sweep.csv`` and ``sweep.json`` (one row per sigma_rel: score, cond, gain, fit_error,
    used, warnings), ``sweep.png`` (score vs sigma_rel, log x, tracked stds and the best marked) and,
    with ``save_best``, the best network as ``network-<nimg>-<sigma_rel>.safetensors``.

    Args:
        run_dir: The run folder with the snapshots.
        out_dir: Output folder (created; must not be the run folder).
        sigma_rels: The grid.
        score_fn: net -> float, lower is better; default ``denoising_score(config)``; ``fid_score`` scores by FID.
        at_nimg: Time of the reconstructions (default: the last snapshot).
        device: Where networks are scored.
        save_best: Also write the best reconstruction as a network file.
        progress: Progress bar over the grid points.

    Returns:
        {"rows": [...], "best": the best row (None if no score is finite), "nimg", "score_name",
        "table", "json", "plot", "network" (path or None)}.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    snaps = collect_snapshots(run_dir)
    sigma_rels = check_sigma_rels(sigma_rels)
    at_nimg = resolve_at_nimg(snaps, at_nimg)
    config = snaps[-1].config
    score_fn = score_fn or denoising_score(config, device=device)
    score_name = getattr(score_fn, "__name__", "score")
    check_out_dir(run_dir, out_dir)

    rows, best_state, best = [], None, None
    points = iter_reconstructions(snaps, sigma_rels=sigma_rels, at_nimg=at_nimg)
    for sigma_rel, state, info in tqdm(points, total=len(sigma_rels), desc="sweep", unit="point", disable=not progress, dynamic_ncols=True):
        score = float(score_fn(_net_from_state(info["config"], state, device)))
        row = {"sigma_rel": sigma_rel, "score": score, "nimg": info["nimg"], "cond": info["cond"], "gain": info["gain"],
               "fit_error": info["fit_error"], "used": info["used"], "warnings": "; ".join(info["warnings"])}
        rows.append(row)
        if math.isfinite(score) and (best is None or score < best["score"]):
            best, best_state = row, (state, info["config"])
    nimg = rows[0]["nimg"]
    result = {"rows": rows, "best": best, "nimg": nimg, "score_name": score_name, "table": out_dir / "sweep.csv",
              "json": out_dir / "sweep.json", "plot": out_dir / "sweep.png", "network": None}
    write_table(rows, result["table"])
    write_json(result["json"], {"run": str(run_dir), "nimg": nimg, "score": score_name, "lower_is_better": True, "rows": rows, "best": best})
    plot_sweep(rows, result["plot"], best=best, tracked=sorted({s.std for s in snaps}), score_name=score_name, nimg=nimg)
    if save_best and best is not None:
        result["network"] = ckpt.network_path(out_dir, nimg, best["sigma_rel"])
        ckpt.save_network(result["network"], best_state[0], cfg=best_state[1], nimg=nimg, ema_std=best["sigma_rel"])
    return result


def write_table(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write sweep rows as CSV (one line per sigma_rel)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_sweep(rows: Sequence[dict[str, Any]], path: Path, *, best: dict[str, Any] | None, tracked: Sequence[float],
               score_name: str, nimg: int) -> None:
    """PNG of score vs sigma_rel (log x), tracked stds as dashed lines, the best point starred."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, without touching pyplot's global state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r["sigma_rel"] for r in rows], [r["score"] for r in rows], "o-", label=score_name)
    for i, std in enumerate(tracked):
        ax.axvline(std, color="grey", linestyle="--", linewidth=0.8, label="tracked EMA" if i == 0 else None)
    if best is not None:
        ax.plot([best["sigma_rel"]], [best["score"]], "r*", markersize=14, label=f"best: {best['sigma_rel']:g}")
    ax.set_xscale("log")
    ax.set_xticks([r["sigma_rel"] for r in rows], [f"{r['sigma_rel']:g}" for r in rows])  # plain numbers, not 10^x
    ax.minorticks_off()
    ax.set_xlabel("sigma_rel (EMA length)")
    ax.set_ylabel(f"{score_name} (lower is better)")
    ax.set_title(f"post-hoc EMA sweep at {nimg} images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
