"""Train every EDM2 config-ladder rung (A-G, EDM2 Table 1) for the same budget on the embedded digits; print a table.

Each rung is the chosen preset with ``resolve_ladder`` applied (its network switches, uncertainty weighting,
learning rate and lr decay), trained with ``edmkit.training.train`` for ``--nimg`` images. Columns:

- ``train mse``: the formulation's weighted denoising error (no uncertainty weighting) averaged over the last
  quarter of training, as logged in stats.jsonl;
- ``eval mse``: the same error of the final raw weights on 128 fixed images with fixed sigmas and noise
  (identical for every rung, so rungs are compared on exactly the same problem);
- ``img/s``: training throughput (at tiny budgets dominated by first-step setup); ``params``: parameter count (incl. the uncertainty head).

A short budget shows early training speed, not the converged FID ordering of the paper.

    python benchmarks/ladder.py [--nimg 2k] [--preset mnist] [--formulation edm] [--rungs ABCDEFG] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from edmkit.config import ExperimentConfig, parse_nimg
from edmkit.data.dataset import load_dataset
from edmkit.data.images import images_to_float
from edmkit.diffusion.loss import make_loss
from edmkit.presets import get_preset, resolve_formulation, resolve_ladder
from edmkit.training.loop import train


def rung_config(preset: str, rung: str, formulation: str, nimg: int) -> ExperimentConfig:
    """The preset at ``rung``, shortened to ``nimg`` images, with one cheap grid and snapshot at the end."""
    cfg = resolve_formulation(resolve_ladder(get_preset(preset), rung), formulation)
    batch = cfg.train.batch
    nimg = max(nimg // batch, 1) * batch
    return (cfg.override("train", total_nimg=nimg, status_nimg=max(nimg // 4 // batch, 1) * batch, grid_nimg=nimg, state_nimg=nimg,
                         grid_n=4, sample_steps=2)
               .override("ema", snapshot_nimg=nimg))


@torch.no_grad()
def eval_mse(net: torch.nn.Module, cfg: ExperimentConfig, *, n: int = 128) -> float:
    """Weighted denoising error on fixed images, sigmas and noise (seed 0), without uncertainty weighting."""
    data = load_dataset(cfg.train.data, resolution=cfg.network.resolution, channels=cfg.network.channels)
    y = images_to_float(data.images[:n])
    loss_fn = make_loss(cfg.override("loss", uncertainty=False))
    g = torch.Generator().manual_seed(0)
    sigma = loss_fn.sample_sigma(y.shape[0], generator=g)
    noise = torch.randn(y.shape, generator=g)
    was_training = net.training
    _, mse = loss_fn(net.eval(), y, None, sigma=sigma, noise=noise)
    net.train(was_training)
    return mse.mean().item()


def run_rung(preset: str, rung: str, formulation: str, nimg: int, out: Path) -> dict:
    cfg = rung_config(preset, rung, formulation, nimg)
    state = train(cfg, out / rung, progress=False, log=lambda s: None)
    stats = [json.loads(line) for line in (out / rung / "stats.jsonl").read_text().splitlines()]
    return {"rung": rung, "nimg": state.nimg, "train_mse": stats[-1]["mse"], "eval_mse": eval_mse(state.net, cfg),
            "img_per_sec": stats[-1]["img_per_sec"], "params": sum(p.numel() for p in state.net.parameters()),
            "lr": cfg.optim.lr, "decay": cfg.optim.lr_ref_nimg > 0, "uncertainty": cfg.loss.uncertainty}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nimg", default="2k", help="training images per rung, e.g. 2k, 64k")
    parser.add_argument("--preset", default="mnist")
    parser.add_argument("--formulation", default="edm", help="edm, ddpm or flow")
    parser.add_argument("--rungs", default="ABCDEFG")
    parser.add_argument("--out", default=None, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    nimg = parse_nimg(args.nimg)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        print(f"preset {args.preset}, formulation {args.formulation}, {nimg} images per rung")
        print(f"{'rung':4} {'train mse':>10} {'eval mse':>9} {'img/s':>7} {'params':>9} {'lr':>7} {'decay':>5} {'uncert':>6}")
        for rung in args.rungs:
            r = run_rung(args.preset, rung, args.formulation, nimg, out)
            print(f"{r['rung']:4} {r['train_mse']:10.4f} {r['eval_mse']:9.4f} {r['img_per_sec']:7.1f} {r['params']:9,d} "
                  f"{r['lr']:7.4f} {'yes' if r['decay'] else 'no':>5} {'yes' if r['uncertainty'] else 'no':>6}", flush=True)


if __name__ == "__main__":
    main()
