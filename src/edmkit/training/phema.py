"""Post-hoc EMA of a training run: pick the EMA length after training (EDM2 Sec. 3.2, App. C.2).

The math (profiles, the least-squares solve, the weighted sum of snapshots) lives in ema.py. This
module is the I/O around it:

- ``collect_snapshots``: read the EMA snapshot files of a run folder from their *metadata* (config,
  ``nimg``, ``ema_std``; file names are never parsed) and check that they form one run.
- ``reconstruct_run`` / ``save_reconstructions``: synthesise the EMA with any sigma_rel at any time
  (default: the last snapshot) and write ordinary network files (``load_network``,
  ``edmkit generate --checkpoint FILE``).
- the sweep over sigma_rel and its scores live in :mod:`edmkit.training.phema_sweep`.

Diagnostics per reconstruction (``info``): ``cond`` = condition number of the Gram matrix A of the
used snapshot profiles; ``gain`` = sum_i |x_i|, the factor by which rounding noise in the snapshots
(fp16: ~5e-4 relative) can be amplified; ``fit_error`` = relative L2 distance between the
reconstructed and the requested profile, i.e. how well the snapshots can represent that sigma_rel.
A large cond alone is harmless (the solve is minimum-norm float64 least squares); gain and
fit_error say whether the result can be trusted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from edmkit import checkpoint as ckpt
from edmkit.config import ExperimentConfig, config_diff
from edmkit.training.ema import STD_MAX, power_function_inner, reconstruct, std_to_exp

if TYPE_CHECKING:  # the metrics stack is imported only when an FID score is built
    pass


COND_WARN = 1e10  # cond(A) above this: float64 least squares starts to lose digits


GAIN_WARN = 50.0  # sum |x_i| above this: snapshot rounding noise amplified 50x (fp16: ~2.5% relative)


FIT_WARN = 0.05  # relative L2 profile error above this: the snapshots cannot represent the target well


class PosthocEMAWarning(UserWarning):
    """A reconstruction is possible but may be poor (extrapolation, ill-conditioning, large coefficients)."""


@dataclass(frozen=True)
class SnapshotInfo:
    """One EMA snapshot file of a run, described by its metadata."""

    path: Path
    nimg: int                                   # images seen when it was written (t)
    std: float                                  # tracked sigma_rel of this EMA (> 0)
    config: ExperimentConfig                    # the run's resolved config stored in the file


def collect_snapshots(run_dir: str | Path) -> list[SnapshotInfo]:
    """The EMA snapshots of one run folder, oldest first (sorted by nimg, then std).

    Reads every ``*.safetensors`` file's metadata; raw-weight files (``ema_std == 0``) are skipped.

    Raises:
        ValueError: missing or empty folder, no EMA snapshots, a file that is not an edmkit network,
            snapshots with different network configs, or files from more than one run (different
            seeds, two files for the same (nimg, std), or a std its config does not track).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run folder")
    files = sorted(run_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{run_dir}: empty run folder (no .safetensors snapshot files)")
    snaps = []
    for path in files:
        meta = ckpt.read_network_metadata(path)
        if meta["ema_std"] > 0:  # 0: raw training weights, not an average
            snaps.append(SnapshotInfo(path, meta["nimg"], meta["ema_std"], meta["config"]))
    if not snaps:
        raise ValueError(f"{run_dir}: no EMA snapshots (only raw-weight files)")
    check_one_run(snaps)
    return sorted(snaps, key=lambda s: (s.nimg, s.std))


def check_one_run(snaps: Sequence[SnapshotInfo]) -> None:
    """Raise ValueError unless all snapshots can come from one training run (see ``collect_snapshots``)."""
    ref, seen = snaps[0], {}
    for s in snaps:
        diff = [d for d in config_diff(ref.config, s.config) if d.startswith("network.")]
        if diff:
            raise ValueError(f"mixed run folder: {s.path.name} and {ref.path.name} have different network configs ({'; '.join(diff)})")
        if s.config.train.seed != ref.config.train.seed:
            raise ValueError(f"mixed run folder: {s.path.name} and {ref.path.name} come from runs with different seeds")
        if s.std not in s.config.ema.stds:
            raise ValueError(f"{s.path.name}: EMA std {s.std:g} is not tracked by its run ({s.config.ema.stds}); not a training snapshot")
        key = (s.nimg, s.std)
        if key in seen:
            raise ValueError(f"mixed run folder: {seen[key].name} and {s.path.name} are both the std {s.std:g} snapshot at {s.nimg} images")
        seen[key] = s.path


def check_sigma_rels(sigma_rels: Sequence[float]) -> tuple[float, ...]:
    """Validate requested sigma_rel values (each in (0, STD_MAX]); duplicates removed, order kept."""
    values = tuple(dict.fromkeys(float(s) for s in sigma_rels))
    if not values:
        raise ValueError("no sigma_rel given")
    for s in values:
        if not (math.isfinite(s) and 0 < s <= STD_MAX):
            raise ValueError(f"sigma_rel {s:g} is out of range: it must be in (0, {STD_MAX:.4f}] (sqrt(1/12), the longest power-function EMA)")
    return values


def profile_fit_error(in_nimg: np.ndarray, in_std: np.ndarray, x: np.ndarray, *, out_nimg: float, out_std: float) -> float:
    """Relative L2 error ||sum_i x_i p_i - p_r|| / ||p_r|| of a post-hoc profile fit (EDM2 App. C.2).

    ||r||^2 = <p_r, p_r> - 2 x.b + x.A.x with A_ij = <p_i, p_j>, b_i = <p_i, p_r>.

    Args:
        in_nimg, in_std, x: [n] snapshot times, sigma_rel and their coefficients.
        out_nimg, out_std: the target profile.
    """
    t, g = np.asarray(in_nimg, np.float64) / out_nimg, np.asarray(std_to_exp(np.asarray(in_std, np.float64)))
    g_r = float(std_to_exp(out_std))
    A = power_function_inner(t[:, None], g[:, None], t[None, :], g[None, :])  # [n, n]
    b = power_function_inner(t, g, 1.0, g_r)  # [n]
    c = float(power_function_inner(1.0, g_r, 1.0, g_r))
    return math.sqrt(max(c - 2 * x @ b + x @ A @ x, 0.0) / c)


def _loader(path: Path, bar: tqdm | None) -> Callable[[], dict[str, torch.Tensor]]:
    def load() -> dict[str, torch.Tensor]:
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ckpt.CheckpointError(f"{path}: truncated or corrupt weights ({e})") from None
        if bar is not None:
            bar.update(1)
        return state

    return load


def resolve_at_nimg(snaps: Sequence[SnapshotInfo], at_nimg: int | None) -> int:
    """The reconstruction time: ``at_nimg``, or the last snapshot's when None; ValueError outside the snapshots' span."""
    first, last = min(s.nimg for s in snaps), max(s.nimg for s in snaps)
    at_nimg = last if at_nimg is None else int(at_nimg)
    if at_nimg < first:
        raise ValueError(f"at_nimg {at_nimg} is before the first snapshot ({first} images)")
    if at_nimg > last:  # the weights after the last snapshot were never recorded
        raise ValueError(f"at_nimg {at_nimg} is after the last snapshot ({last} images)")
    return at_nimg


def _diagnose(snaps: Sequence[SnapshotInfo], x: np.ndarray, cond: float, *, at_nimg: int, sigma_rel: float) -> dict[str, Any]:
    """gain, fit_error and warning messages for one reconstruction (x aligned with snaps)."""
    used = [i for i, s in enumerate(snaps) if s.nimg <= at_nimg]
    t_in, std_in = np.array([snaps[i].nimg for i in used], np.float64), np.array([snaps[i].std for i in used])
    gain = float(np.abs(x).sum())
    fit = profile_fit_error(t_in, std_in, x[used], out_nimg=at_nimg, out_std=sigma_rel)
    msgs = []
    if not std_in.min() <= sigma_rel <= std_in.max():
        msgs.append(f"sigma_rel {sigma_rel:g} is outside the tracked range [{std_in.min():g}, {std_in.max():g}]: extrapolated (profile fit error {fit:.1%})")
    elif fit > FIT_WARN:
        msgs.append(f"sigma_rel {sigma_rel:g}: the snapshots represent this profile poorly (fit error {fit:.1%}); more snapshots would help")
    if cond > COND_WARN:
        msgs.append(f"sigma_rel {sigma_rel:g}: cond(A) = {cond:.1e} is large; the solve may lose precision")
    if gain > GAIN_WARN:
        msgs.append(f"sigma_rel {sigma_rel:g}: coefficients sum to {gain:.0f} in absolute value, amplifying snapshot rounding noise that much")
    return {"gain": gain, "fit_error": fit, "warnings": msgs}


def iter_reconstructions(snaps: Sequence[SnapshotInfo], *, sigma_rels: Sequence[float], at_nimg: int | None = None,
                         progress: bool = False) -> Iterator[tuple[float, dict[str, torch.Tensor], dict[str, Any]]]:
    """Reconstruct each sigma_rel at ``at_nimg`` (default: the last snapshot), one at a time.

    Only one reconstruction and one snapshot are in memory at once; snapshots after ``at_nimg``
    are never read. Issues a PosthocEMAWarning for each message in ``info["warnings"]``.

    Yields:
        (sigma_rel, state_dict (float32), info) with info keys ``sigma_rel``, ``nimg``, ``cond``,
        ``gain``, ``fit_error``, ``used`` (snapshots used), ``coefficients`` (float64 [len(snaps)]),
        ``config`` (of the latest used snapshot) and ``warnings`` (list of str).

    Raises:
        ValueError: a sigma_rel out of (0, STD_MAX], or at_nimg before the first or after the last snapshot.
    """
    sigma_rels = check_sigma_rels(sigma_rels)
    at_nimg = resolve_at_nimg(snaps, at_nimg)
    n_used = sum(s.nimg <= at_nimg for s in snaps)
    config = max((s for s in snaps if s.nimg <= at_nimg), key=lambda s: s.nimg).config
    with tqdm(total=n_used * len(sigma_rels), desc="phema", unit="snapshot", disable=not progress, dynamic_ncols=True) as bar:
        triples = [(s.nimg, s.std, _loader(s.path, bar)) for s in snaps]
        for sigma_rel in sigma_rels:
            state, info = reconstruct(triples, out_nimg=at_nimg, out_std=sigma_rel)
            info.update(_diagnose(snaps, info["coefficients"], info["cond"], at_nimg=at_nimg, sigma_rel=sigma_rel),
                        sigma_rel=sigma_rel, nimg=at_nimg, config=config)
            for msg in info["warnings"]:
                warnings.warn(msg, PosthocEMAWarning, stacklevel=2)
            yield sigma_rel, state, info


def reconstruct_run(run_dir: str | Path, *, sigma_rels: Sequence[float], at_nimg: int | None = None,
                    progress: bool = False) -> list[tuple[float, dict[str, torch.Tensor], dict[str, Any]]]:
    """Post-hoc EMA of a run folder: ``(sigma_rel, state_dict, info)`` per requested sigma_rel.

    See ``iter_reconstructions`` for ``info`` and the errors; ``collect_snapshots`` for the folder checks.
    """
    return list(iter_reconstructions(collect_snapshots(run_dir), sigma_rels=sigma_rels, at_nimg=at_nimg, progress=progress))


def check_out_dir(run_dir: Path, out_dir: Path) -> None:
    # Outputs carry the same metadata as snapshots; inside the run folder they would pollute it.
    if out_dir.resolve() == run_dir.resolve():
        raise ValueError(f"output folder {out_dir} is the run folder; choose another one")
    out_dir.mkdir(parents=True, exist_ok=True)


def save_reconstructions(run_dir: str | Path, *, sigma_rels: Sequence[float], out_dir: str | Path, at_nimg: int | None = None,
                         progress: bool = False) -> list[tuple[Path, dict[str, Any]]]:
    """Reconstruct each sigma_rel and write it as a normal network file ``network-<nimg>-<sigma_rel>.safetensors``.

    The files carry the run's config, ``nimg = at_nimg`` and ``ema_std = sigma_rel``, so ``load_network``
    and ``edmkit generate --checkpoint`` read them like any snapshot.

    Returns:
        (path, info) per sigma_rel, info as in ``iter_reconstructions``.

    Raises:
        ValueError: as ``reconstruct_run``; also out_dir equal to run_dir, or two sigma_rel that
            round to the same file name (3 decimals).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    snaps = collect_snapshots(run_dir)
    sigma_rels = check_sigma_rels(sigma_rels)
    at = resolve_at_nimg(snaps, at_nimg)
    names = [ckpt.network_path(out_dir, at, s).name for s in sigma_rels]
    if len(set(names)) != len(names):
        raise ValueError(f"sigma_rel values {list(sigma_rels)} round to the same file name (3 decimals); drop one")
    check_out_dir(run_dir, out_dir)
    written = []
    for sigma_rel, state, info in iter_reconstructions(snaps, sigma_rels=sigma_rels, at_nimg=at, progress=progress):
        path = ckpt.network_path(out_dir, at, sigma_rel)
        ckpt.save_network(path, state, cfg=info["config"], nimg=at, ema_std=sigma_rel)
        written.append((path, info))
    return written
