"""``edmkit train-autoencoder``: edmkit's small KL autoencoder on any dataset edmkit reads, with the run-folder habits.

Loss per batch: reconstruction (L1 or L2, mean over pixels) of a posterior sample + kl_weight x KL(posterior || N(0, I))
(mean over latent elements); Adam. Batch order (``sample_order``) and posterior noise (``step_seed``) are pure functions
of (seed, images seen), so an interrupted run resumes bit-exactly from ``ae-state.pt``.

Run folder: ``config.json``, ``ae-state.pt`` (resumable), ``autoencoder.safetensors`` (the encoder file for
``edmkit dataset convert --vae``), ``recon.png`` (held-out images, top; reconstructions, bottom) and ``report.json``:
the held-out PSNR and, as the floor any autoencoder must beat, the PSNR of reconstructing every image as the mean image.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edmkit.checkpoint import FORMAT, load_state, save_state
from edmkit.data.dataset import load_dataset, sample_order
from edmkit.data.images import images_to_float, save_image_grid
from edmkit.files import write_json, writer_lock
from edmkit.latent.autoencoder import AEConfig, save_autoencoder
from edmkit.nn.autoencoder import KLAutoencoder, kl_divergence
from edmkit.training.step_inputs import step_seed

STATE = "ae-state.pt"


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak 2, i.e. the usual 1 on [0, 1])."""
    mse = F.mse_loss(x.clamp(-1, 1), y).item() / 4
    return 10 * math.log10(1 / max(mse, 1e-12))


def ae_loss(model: KLAutoencoder, x: torch.Tensor, noise: torch.Tensor, cfg: AEConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of images ``x`` [B, C, H, W] with posterior noise ``noise`` [B, c, h, w]."""
    mean, logvar = model.encode(x)
    recon = model.decode(mean + (0.5 * logvar).exp() * noise)
    rec = (recon - x).abs().mean() if cfg.loss == "l1" else (recon - x).square().mean()
    kl = kl_divergence(mean, logvar).mean()
    return rec + cfg.kl_weight * kl, {"rec": rec.item(), "kl": kl.item()}


def evaluate(model: KLAutoencoder, val: torch.Tensor, train_mean: torch.Tensor) -> dict[str, float]:
    """Held-out PSNR of the posterior-mean reconstruction, and of the mean-image baseline."""
    model.eval()
    with torch.no_grad():
        recon = torch.cat([model.decode(model.encode(b)[0]) for b in val.split(64)])
    model.train()
    return {"psnr": psnr(recon, val), "psnr_mean_image": psnr(train_mean.expand_as(val), val)}


def train_autoencoder(cfg: AEConfig, run_dir: str | Path, *, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) an autoencoder run; returns the final report. A run folder holding another config is refused."""
    run_dir = Path(run_dir)
    with writer_lock(run_dir):
        cfg_file = run_dir / "config.json"
        if cfg_file.is_file() and dataclasses.replace(AEConfig.from_json(cfg_file.read_text()), total_nimg=cfg.total_nimg) != cfg:
            raise ValueError(f"{run_dir} holds an autoencoder run with another config: use another --run (only --duration may change)")
        data = load_dataset(cfg.data, resolution=cfg.resolution, channels=cfg.channels, classes=cfg.classes or None)
        if len(data) <= cfg.val_n:
            raise ValueError(f"{data.name}: {len(data)} images, need more than val_n = {cfg.val_n} (held out for the PSNR)")
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))
        val, train = images_to_float(data.images[order[:cfg.val_n]]), data.images[order[cfg.val_n:]]
        train_mean = images_to_float(train).mean(dim=0, keepdim=True)

        torch.manual_seed(cfg.seed)
        model = cfg.build()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        nimg = 0
        if (run_dir / STATE).is_file():
            state = load_state(run_dir / STATE)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            nimg = int(state["nimg"])
            log(f"resuming {run_dir} at {nimg} images")
        write_json(cfg_file, json.loads(cfg.to_json()))

        def save(report: dict[str, Any]) -> None:
            save_state(run_dir / STATE, {"format": FORMAT, "format_version": 1, "model": model.state_dict(), "optimizer": opt.state_dict(), "nimg": nimg})
            save_autoencoder(run_dir / "autoencoder.safetensors", model, cfg, nimg=nimg)
            with torch.no_grad():
                model.eval()
                shown = val[:16]
                recon = model.decode(model.encode(shown)[0]).clamp(-1, 1)
                model.train()
            save_image_grid(torch.cat([shown, recon]), run_dir / "recon.png", nrow=len(shown))
            write_json(run_dir / "report.json", report)

        report: dict[str, Any] = {}
        model.train()
        h = cfg.resolution // model.factor
        shape = {"latent_shape": [cfg.latent_channels, h, h], "factor": model.factor, "parameters": sum(p.numel() for p in model.parameters())}
        with tqdm(total=cfg.total_nimg, initial=nimg, desc="autoencoder", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            try:
                while nimg < cfg.total_nimg:
                    idx = sample_order(num_items=len(train), seed=cfg.seed, start=nimg, count=cfg.batch)
                    x = images_to_float(train[idx])
                    g = torch.Generator().manual_seed(step_seed(cfg.seed, nimg))
                    noise = torch.randn(len(x), cfg.latent_channels, h, h, generator=g)
                    loss, parts = ae_loss(model, x, noise, cfg)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    nimg += cfg.batch
                    bar.update(cfg.batch)
                    bar.set_postfix(rec=f"{parts['rec']:.4f}", kl=f"{parts['kl']:.3g}")
                    if nimg % cfg.state_nimg < cfg.batch or nimg >= cfg.total_nimg:
                        report = {"nimg": nimg, **evaluate(model, val, train_mean), **parts, **shape}
                        save(report)
            except KeyboardInterrupt:
                save({**report, "nimg": nimg, "interrupted": True})
                log(f"interrupted at {nimg} images: state saved; run the same command to resume")
                raise
        if not report:  # already trained this long: report the weights as they are
            report = {"nimg": nimg, **evaluate(model, val, train_mean), **shape}
        return report
