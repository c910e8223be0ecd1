"""Commands on a finished run folder: ``edmkit phema`` (post-hoc EMA) and ``edmkit report``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from edmkit.cli._common import NIMG, main, pick_device, user_errors
from edmkit.files import writer_lock

if TYPE_CHECKING:
    import torch

    from edmkit.config import ExperimentConfig
    from edmkit.diffusion.precond import Denoiser


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Training run folder holding the EMA snapshot files.")
@click.option("--sigma-rel", "sigma_rel", default=None, help="Comma-separated EMA lengths sigma_rel, e.g. 0.02,0.05,0.08 (with --sweep default: 0.01 to 0.25).")
@click.option("--at-nimg", type=NIMG, default=None, help="Reconstruct the EMA as it was after this many images (default: the last snapshot).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder for the network files (and the sweep table and plot).")
@click.option("--sweep", "do_sweep", is_flag=True, help="Score every sigma_rel (--score: denoising loss on fixed images and noise, or FID of images from fixed seeds; lower is better), write sweep.csv/.json/.png and the best network.")
@click.option("--score", "score_kind", type=click.Choice(["loss", "fid"]), default="loss", show_default=True, help="With --sweep: loss (denoising loss) or fid (FID against --ref, as EDM2 picks the EMA length).")
@click.option("--score-images", type=int, default=128, show_default=True, help="With --score loss: images in the denoising score.")
@click.option("--score-sigmas", type=int, default=8, show_default=True, help="With --score loss: noise levels per image in the denoising score.")
@click.option("--data", default=None, help="With --score loss: dataset for the score (default: the run's).")
@click.option("--ref", "ref_path", default=None, type=click.Path(dir_okay=False), help="With --score fid: reference statistics from `edmkit metrics ref` (required).")
@click.option("--score-n", type=int, default=1000, show_default=True, help="With --score fid: images per sigma_rel, seeds 0..N-1 (the same noise for every sigma_rel).")
@click.option("--score-steps", type=int, default=None, help="With --score fid: steps of the run's sampler (default: the run's sample_steps).")
@click.option("--detector", default=None, help="With --score fid: feature network name or TorchScript path (default: the reference's).")
@click.option("--batch", type=int, default=None, help="With --sweep: images per scoring batch (default 64 for fid, 256 for loss; does not change the results).")
@click.option("--device", default="auto", show_default=True, help="With --sweep: where networks are scored (cpu, cuda, cuda:N or auto).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def phema(run_dir, sigma_rel, at_nimg, out_dir, do_sweep, score_kind, score_images, score_sigmas, data, ref_path, score_n, score_steps, detector, batch,
          device, quiet) -> None:
    """Post-hoc EMA (EDM2 Sec. 3): choose the EMA length after training.

    \b
    Examples:
      edmkit phema --run runs/mnist --sigma-rel 0.02,0.05,0.08 --out runs/mnist/phema
      edmkit phema --run runs/mnist --sweep --out runs/mnist/sweep
      edmkit phema --run runs/mnist --sweep --score fid --ref refs/mnist.npz --score-n 1000 --out runs/mnist/sweep-fid
      edmkit generate --checkpoint runs/mnist/phema/network-000000080000-0.080.safetensors --out grid.png
    """
    import warnings

    from edmkit.training import phema as ph
    from edmkit.training import phema_sweep as phs

    sigma_rels = parse_float_list(sigma_rel, name="--sigma-rel") if sigma_rel else None
    if sigma_rels is None and not do_sweep:
        raise ValueError("give --sigma-rel (e.g. 0.02,0.05,0.08) or --sweep")
    if score_kind == "fid" and not do_sweep:
        raise ValueError("--score fid scores a sweep: add --sweep")
    if score_kind == "fid" and ref_path is None:
        raise ValueError("--score fid needs --ref REF.npz (reference statistics from `edmkit metrics ref`)")
    if score_kind == "loss" and (ref_path is not None or detector is not None):
        raise ValueError("--ref and --detector are for --score fid")
    with writer_lock(out_dir, what="output folder"):  # one writer at a time
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ph.PosthocEMAWarning)  # the same messages are printed from info below
            if not do_sweep:
                for path, info in ph.save_reconstructions(run_dir, sigma_rels=sigma_rels, at_nimg=at_nimg, out_dir=out_dir, progress=not quiet):
                    echo_reconstruction(info)
                    click.echo(f"  -> {path}")
                return
            snaps = ph.collect_snapshots(run_dir)
            ph.check_sigma_rels(sigma_rels or phs.DEFAULT_SWEEP)
            ph.resolve_at_nimg(snaps, at_nimg)
            dev = pick_device(device)
            if score_kind == "fid":  # reference and detector are checked before any reconstruction is written
                score = fid_score_of(snaps[-1].config, ref_path, detector=detector, n=score_n, steps=score_steps,
                                     batch=64 if batch is None else batch, device=dev)
            else:
                score = phs.denoising_score(snaps[-1].config, n_images=score_images, n_sigmas=score_sigmas, data=data, device=dev,
                                           batch=256 if batch is None else batch)
            result = phs.sweep(run_dir, out_dir=out_dir, sigma_rels=sigma_rels or phs.DEFAULT_SWEEP, score_fn=score, at_nimg=at_nimg,
                              device=dev, progress=not quiet)
    for row in result["rows"]:
        click.echo(f"sigma_rel {row['sigma_rel']:<6g} {result['score_name']} {row['score']:.5f}   cond(A) {row['cond']:.2e}  gain {row['gain']:.2f}  fit error {row['fit_error']:.2%}")
        if row["warnings"]:
            click.echo(f"  warning: {row['warnings']}")
    click.echo(f"table {result['table']}, plot {result['plot']}")
    if result["best"] is None:
        raise ValueError("no sigma_rel gave a finite score")
    click.echo(f"best: sigma_rel {result['best']['sigma_rel']:g} ({result['score_name']} {result['best']['score']:.5f}) -> {result['network']}")


def fid_score_of(cfg: ExperimentConfig, ref_path: str, *, detector: str | None, n: int, steps: int | None, batch: int,
                 device: torch.device) -> Callable[[Denoiser], float]:
    """``phema_sweep.fid_score`` for a run's network against the reference file ``ref_path`` (notices echoed once), sampled
    with the run's setting (``TrainConfig.sampling``; ``steps`` replaces its steps)."""
    from edmkit.metrics import reference as rf
    from edmkit.sampling.generate import run_sampling
    from edmkit.training import phema_sweep as phs

    ref = rf.load_reference(ref_path)
    det = rf.reference_detector(ref, detector, device=device, ref_path=ref_path, log=click.echo)
    c = cfg.network
    setting = run_sampling(cfg, None, steps)
    return phs.fid_score(ref, det, resolution=c.resolution, channels=c.channels, label_dim=c.label_dim, n=n, sampler=setting.pop("sampler"),
                         steps=setting.pop("steps"), options=setting, batch=batch, device=device, log=click.echo)


def echo_reconstruction(info: dict) -> None:
    click.echo(f"sigma_rel {info['sigma_rel']:g} at {info['nimg']} images: {info['used']} snapshots, cond(A) {info['cond']:.2e}, "
               f"gain {info['gain']:.2f}, fit error {info['fit_error']:.2%}")
    for msg in info["warnings"]:
        click.echo(f"  warning: {msg}")


def parse_float_list(text: str, *, name: str) -> list[float]:
    """``"0.02,0.05"`` -> [0.02, 0.05]; a malformed entry raises ValueError naming the option."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"cannot parse {name} {text!r}: use comma-separated numbers, e.g. 0.02,0.05,0.08") from None


@main.command()
@click.argument("run_dir", metavar="RUN", type=click.Path())
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Output folder (default RUN/report): index.html with its PNGs and GIF.")
@click.option("--gif-n", type=int, default=4, show_default=True, help="Images in the reverse-diffusion GIF (0: none).")
@click.option("--gif-steps", type=int, default=None, help="Sampler steps of the GIF (default: the run's sample_steps).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto (for the GIF).")
@user_errors
def report(run_dir, out, gif_n, gif_steps, device) -> None:
    """HTML report of a training run: loss, learning rate, gradient norm, validation and metric curves, sample grids, reverse-diffusion GIF.

    \b
    Example:
      edmkit report runs/mnist            # writes runs/mnist/report/index.html
    """
    from edmkit.report import write_report

    if gif_n < 0:
        raise ValueError("--gif-n must be >= 0")
    page = write_report(run_dir, out, gif_n=gif_n, gif_steps=gif_steps, device=pick_device(device), log=click.echo)
    click.echo(f"wrote {page}")
