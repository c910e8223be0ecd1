"""``edmkit import``: NVIDIA's published EDM / EDM2 networks as edmkit network files (logic in ``edmkit.interop``)."""

from __future__ import annotations

from pathlib import Path

import click

from edmkit.cli._common import main, user_errors


@main.command("import")
@click.argument("source", metavar="SRC", type=click.Path(exists=True))
@click.option("--out", "out", default=None, type=click.Path(),
              help="Network file to write (default: SRC's name with .safetensors); for a folder of snapshots, the output folder.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def import_(source, out, force, quiet) -> None:
    """Import an NVIDIA EDM / EDM2 network pickle (or a folder of EDM2 EMA snapshots) without running its code.

    The .pkl is read as data through an allow-list: the Python source it carries is never executed, and any other
    global is refused by name. The network is mapped onto edmkit's own backbone (EDM2 -> edm2-unet; EDM's DDPM++ /
    NCSN++ / ADM -> ddpmpp / ncsnpp / adm with their edm / vp / ve / iddpm preconditioning) and written as safetensors
    with edmkit's config, so generate, restore, metrics and phema take it like a trained run's file.

    \b
    Examples:
      edmkit import edm2-img64-s-1073741-0.075.pkl --out img64-s.safetensors
      edmkit generate --checkpoint img64-s.safetensors --class 207 --n 16 --out grid.png
      edmkit import edm-cifar10-32x32-cond-vp.pkl --out cifar-vp.safetensors
      edmkit import snapshots/edm2-img64-s/ --out img64-s-snapshots/   # EDM2 EMA snapshot series
      edmkit phema --run img64-s-snapshots --sigma-rel 0.05,0.1 --out img64-s-phema
    """
    from tqdm.auto import tqdm

    from edmkit.checkpoint import network_path, save_network
    from edmkit.interop.nvidia import read_network, snapshot_series

    source = Path(source)
    if source.is_dir():
        out_dir = Path(out) if out else Path(source.name + "-edmkit")
        plan = snapshot_series(source)  # [(file, nimg, std)], checked before anything is written
        targets = [network_path(out_dir, nimg, std) for _, nimg, std in plan]
        _refuse_existing(targets, force)
        out_dir.mkdir(parents=True, exist_ok=True)
        stds = tuple(sorted({std for _, _, std in plan}))
        first = None
        for (path, nimg, std), target in zip(plan, tqdm(targets, desc="import", unit="snapshot", disable=quiet, dynamic_ncols=True)):
            imp = read_network(path, stds=stds)
            if first is None:
                first = imp
            elif imp.cfg.network != first.cfg.network:
                raise ValueError(f"{path}: a different network than {plan[0][0].name}: one folder must hold one run's snapshots")
            save_network(target, imp.state, cfg=imp.cfg, nimg=nimg, ema_std=std, source=f"{path.name} ({imp.source})")
        _print_summary(first, f"{len(plan)} snapshots ({len(stds)} EMA lengths: {', '.join(f'{s:g}' for s in stds)}) -> {out_dir}")
        return
    target = Path(out) if out else Path(source.with_suffix(".safetensors").name)
    _refuse_existing([target], force)
    imp = read_network(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_network(target, imp.state, cfg=imp.cfg, nimg=imp.nimg, ema_std=imp.ema_std, source=f"{source.name} ({imp.source})")
    _print_summary(imp, f"-> {target}")


def _refuse_existing(targets: list[Path], force: bool) -> None:
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        raise ValueError(f"{existing[0]} exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}; pass --force to overwrite")


def _print_summary(imp, where: str) -> None:
    s = imp.summary()
    click.echo(f"imported {s['source']}: {s['arch']} ({s['formulation']} preconditioning, sigma_data {s['sigma_data']:g}), "
               f"{s['parameters'] / 1e6:.2f}M parameters, {s['resolution']}x{s['resolution']}x{s['channels']} {s['space']}, "
               f"label_dim {s['label_dim']}" + (f", EMA sigma_rel {s['ema_std']:g} at {s['nimg']} images" if s["ema_std"] else "")
               + f" {where}")
    for note in imp.notes:
        click.echo(f"note: {note}")
