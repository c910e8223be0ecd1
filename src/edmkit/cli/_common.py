"""Shared pieces of the ``edmkit`` command line: the click group ``main`` and the helpers every command uses.

Library code raises ValueError / OSError; ``user_errors`` alone turns them into one-line errors with a non-zero
exit code, and ``pick_device`` alone sets ``torch.backends`` flags. The command modules import from here (not from
``edmkit.cli``), so the package has no import cycle.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click
import torch

from edmkit.config import parse_nimg
from edmkit.runtime import tune_cpu_allocator


def user_errors(fn):
    """Report user mistakes (ValueError, OSError) as ``error: ...`` with exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def pick_device(name: str) -> torch.device:
    """The torch device of ``--device`` (auto: CUDA when available), with the process settings that make it fast:
    TF32 and cuDNN autotuning on CUDA, the glibc allocator thresholds for CPU work (``edmkit.runtime``)."""
    tune_cpu_allocator()  # results unchanged; fewer page faults in CPU steps (host-side buffers on CUDA too)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but CUDA is not available")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return torch.device(name)


class NimgType(click.ParamType):
    name = "nimg"

    def convert(self, value, param, ctx):
        try:
            return parse_nimg(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


NIMG = NimgType()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edmkit")
def main() -> None:
    """edmkit: train, sample and evaluate EDM / EDM2 diffusion models (pixel or latent space).

    \b
    Quick start (embedded MNIST digits, CPU, about 15 minutes):
      edmkit train                       # writes runs/mnist/
      edmkit generate --checkpoint runs/mnist --n 64 --out grid.png
    """


def parse_int_list(text: str | None, *, name: str) -> list[int] | None:
    """``"1,3"`` -> [1, 3] (None stays None); a malformed entry raises ValueError naming the option."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{name} expects comma-separated integers, e.g. 1,3; got {text!r}") from None


def check_output_target(out: Path) -> None:
    """Fail before sampling if the output cannot be written."""
    parent = out if not out.suffix else out.parent
    parent = parent if parent != Path("") else Path(".")
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"cannot write output {out}: {existing} is not a writable folder")
