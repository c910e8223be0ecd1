"""The end-of-training EMA choice: a post-hoc sweep (EDM2 Sec. 3.2, Fig. 5) that picks the EMA length ``generate`` uses.

When a run reaches its ``total_nimg`` it reconstructs ``ema.choose_stds`` from its snapshots (``phema_sweep.sweep``),
scores each and writes the table, the plot, the best network and a grid of it to ``<run>/ema-choice/``
(``checkpoint.EMA_CHOICE_DIR``). ``edmkit generate --checkpoint RUN`` then samples that network
(``checkpoint.find_network``). The score (``ema.choose``):

- ``fid``: FID of ``choose_n`` images from seeds 0..n-1 against the in-training evaluation's reference (``eval_ref``)
  or, for the embedded digits, against the training images through the built-in digit detector (``metrics.mnist_net``;
  its FIDs are not comparable with Inception's);
- ``loss``: the denoising loss on fixed images, sigmas and noise (``phema_sweep.denoising_score``);
- ``auto``: ``fid`` where one of those two references fits the data, else ``loss``; ``off``: keep ``ema.sample_std``.

A super-resolution stage and a video network keep ``ema.sample_std`` (their scores are not built yet).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edmkit import checkpoint as ckpt
from edmkit.config import ExperimentConfig
from edmkit.diffusion.precond import Denoiser
from edmkit.files import write_json
from edmkit.training import phema_sweep
from edmkit.training.phema import PosthocEMAWarning
from edmkit.training.run_state import RunError

DIGITS = "mnist5k"  # the data the built-in digit detector fits


def score_kind(cfg: ExperimentConfig) -> str:
    """``"fid"``, ``"loss"`` or ``"off"``: what the run's EMA choice scores by; RunError (one line) when ``fid`` has no reference."""
    choose, t = cfg.ema.choose, cfg.train
    if choose == "off" or t.task != "generate" or cfg.network.frames:  # an SR stage is not sampled from noise alone; clips: no score yet
        return "off"
    fits = bool(t.eval_ref) or (t.data == DIGITS and not t.encoder)
    if choose == "fid" and not fits:
        raise RunError("--ema-choice fid needs a reference: --eval-ref REF.npz (or the embedded digits, which the built-in "
                       "detector fits); --ema-choice loss scores by the denoising loss")
    return "fid" if choose == "fid" or (choose == "auto" and fits) else "loss"


def make_score(cfg: ExperimentConfig, *, device: torch.device | str) -> Callable[[Denoiser], float]:
    """The score function of the run's EMA choice (lower is better), as ``phema_sweep.sweep`` takes it."""
    if score_kind(cfg) == "loss":
        return phema_sweep.denoising_score(cfg, device=device)
    from edmkit.data.dataset import dataset_of
    from edmkit.metrics import reference as metrics_ref
    from edmkit.metrics.detectors import load_detector
    from edmkit.metrics.evaluate import compute_reference

    t, n = cfg.train, cfg.network
    if t.eval_ref:
        ref = metrics_ref.load_reference(t.eval_ref)
        detector = metrics_ref.reference_detector(ref, t.eval_detector or None, device=device, ref_path=t.eval_ref)
    else:  # the training images through the built-in digit detector: a few seconds
        detector = load_detector("mnist", device=device)
        ref = compute_reference(dataset_of(cfg).images, detector=detector, source=DIGITS)
    setting = t.sampling()
    return phema_sweep.fid_score(ref, detector, resolution=n.resolution, channels=n.channels, label_dim=n.label_dim, n=cfg.ema.choose_n,
                                 sampler=setting.pop("sampler"), steps=setting.pop("steps"), batch=max(t.batch, 64), device=device,
                                 options=setting)


def choose_ema(cfg: ExperimentConfig, run_dir: str | Path, *, device: torch.device | str = "cpu", log: Callable[[str], None] = print,
               progress: bool = False) -> dict[str, Any] | None:
    """Sweep ``cfg.ema.choose_stds`` at the run's last snapshot, keep the best in ``<run>/ema-choice/`` and return the sweep's
    result (``phema_sweep.sweep``'s dict plus ``"grid"`` and ``"sec"``); None when the choice is off or already made for
    the newest snapshot. The global RNG is left as it was."""
    kind = score_kind(cfg)
    run_dir = Path(run_dir)
    out_dir = run_dir / ckpt.EMA_CHOICE_DIR
    if kind == "off" or ckpt.chosen_network(run_dir) is not None:
        return None
    from edmkit.sampling.generate import describe_sampling

    start = time.perf_counter()
    log(f"choosing the sampling EMA length: sigma_rel {', '.join(f'{s:g}' for s in cfg.ema.choose_stds)} scored by "
        + (f"FID of {cfg.ema.choose_n} images ({describe_sampling(cfg.train.sampling())})" if kind == "fid" else "the denoising loss"))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", PosthocEMAWarning)  # logged below, once per sigma_rel
        result = phema_sweep.sweep(run_dir, out_dir=out_dir, sigma_rels=cfg.ema.choose_stds, score_fn=make_score(cfg, device=device),
                                   device=device, progress=progress)
        for row in result["rows"]:
            if row["warnings"]:
                log(f"  sigma_rel {row['sigma_rel']:g}: {row['warnings']}")
        if result["best"] is None:
            log("EMA choice: no sigma_rel gave a finite score; generate keeps the run's sampling EMA")
            return result
        from edmkit.data.images import save_image_grid
        from edmkit.sampling.generate import generate_images

        net, meta = ckpt.load_network(result["network"], device=device)
        n = cfg.network
        images = generate_images(net, seeds=list(range(cfg.train.grid_n)), resolution=n.resolution, channels=n.channels,
                                 label_dim=n.label_dim, device=device, **cfg.train.sampling())
        result["grid"] = out_dir / "grid.png"
        save_image_grid(images, result["grid"])
    result["sec"] = round(time.perf_counter() - start, 1)
    best = result["best"]
    summary = {"sigma_rel": best["sigma_rel"], "score": best["score"], "score_name": result["score_name"], "nimg": result["nimg"],
               "network": result["network"].name, "sec": result["sec"], "tracked_sample_std": cfg.ema.sample_std,
               "tracked_score": next((r["score"] for r in result["rows"] if abs(r["sigma_rel"] - cfg.ema.sample_std) < 1e-9), None)}
    write_json(out_dir / ckpt.EMA_CHOICE_FILE, summary)  # last: its presence means the choice is complete
    log(f"EMA choice: sigma_rel {best['sigma_rel']:g} ({result['score_name']} {best['score']:.4g}) in {result['sec']:.0f} s; "
        f"generate --checkpoint {run_dir} uses it ({out_dir})")
    return result
