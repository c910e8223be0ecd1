"""Optional dashboards fed from the same records as ``stats.jsonl``: TensorBoard and Weights & Biases.

Neither package is a dependency of edmkit: each is imported only when its sink is asked for, and a
missing one raises ValueError naming the pip package (the CLI prints it as a one-line error).
Records are flattened by ``flatten_record`` into ``<kind>/<field>`` scalars, with image count
(``nimg``) as the x axis, so the dashboards plot exactly what ``stats.jsonl`` holds.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

# sink name -> (module imported, pip package that provides it)
SINK_PACKAGES: dict[str, tuple[str, str]] = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


class Sink(Protocol):
    """Receives every stats record (a JSON-able dict with ``kind`` and ``nimg``)."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def flatten_record(record: dict[str, Any]) -> dict[str, float]:
    """Numeric fields of a stats record as ``{"<kind>/<field>": value}``; lists become one scalar per entry.

    A list as long as the record's ``sigma`` list is named by noise level (``val/loss_per_sigma/sigma=0.42``),
    other lists by position (``train/ema_std/0``). ``kind``, ``nimg`` (the x axis) and ``sigma`` itself are left out.
    """
    kind = record.get("kind", "train")
    sigmas = record.get("sigma")
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("kind", "nimg", "sigma"):
            continue
        if isinstance(value, (bool, int, float)):
            out[f"{kind}/{key}"] = float(value)
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            names = [f"sigma={s:.3g}" for s in sigmas] if isinstance(sigmas, list) and len(sigmas) == len(value) else range(len(value))
            out.update({f"{kind}/{key}/{name}": float(v) for name, v in zip(names, value)})
    return out


def import_optional(name: str) -> Any:
    """The module behind sink ``name``; ValueError naming the pip package when it is not installed."""
    if name not in SINK_PACKAGES:
        raise ValueError(f"unknown logger {name!r}; valid: {', '.join(SINK_PACKAGES)}")
    module, package = SINK_PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"--log {name} needs the '{package}' package, which is not installed: pip install {package}") from None


class TensorBoardSink:
    """Scalars into a TensorBoard event file in ``log_dir`` (step = images seen)."""

    def __init__(self, log_dir: Path) -> None:
        self.writer = import_optional("tensorboard").SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        for tag, value in flatten_record(record).items():
            self.writer.add_scalar(tag, value, global_step=int(record["nimg"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One Weights & Biases run per training run folder (resumed with it), x axis ``nimg``."""

    def __init__(self, run_dir: Path, *, config: dict[str, Any]) -> None:
        self.wandb = import_optional("wandb")
        run_id = "edmkit-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]  # stable: a resumed run continues its wandb run
        self.run = self.wandb.init(project="edmkit", name=run_dir.name, dir=str(run_dir), config=config, resume="allow", id=run_id)
        self.run.define_metric("*", step_metric="nimg")

    def write(self, record: dict[str, Any]) -> None:
        self.run.log({"nimg": int(record["nimg"]), **flatten_record(record)})

    def close(self) -> None:
        self.run.finish()


def make_sinks(names: Sequence[str], *, run_dir: str | Path, config: dict[str, Any]) -> list[Sink]:
    """The sinks named (``tensorboard``, ``wandb``), created now so a missing package fails before training starts."""
    run_dir = Path(run_dir)
    for name in names:
        import_optional(name)  # every name checked before any sink opens files or network connections
    sinks: list[Sink] = []
    for name in dict.fromkeys(names):
        sinks.append(TensorBoardSink(run_dir / "tensorboard") if name == "tensorboard" else WandbSink(run_dir, config=config))
    return sinks
