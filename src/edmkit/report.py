"""Reports: the reverse-diffusion process as an animated GIF, and ``edmkit report RUN`` (HTML + PNG plots of a run).

Symbols (EDM Table 1): x_i is the sampler's noisy state at noise level σ_i (x = y + σ·n), and
D = D(x_i; σ_i) the denoised estimate of the clean image y. For display, x_i is scaled by
σ_d/√(σ² + σ_d²), which gives it roughly the data's standard deviation σ_d at every σ (it is σ_d
times EDM's c_in), so the pure noise of the first steps does not clip to black and white.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, ImageDraw

from edmkit.data.images import image_grid
from edmkit.files import atomic_write

HEADER_PX = 12  # height of the text strip above each frame (PIL's default bitmap font is ~11 px)


def display_noisy(x: torch.Tensor, *, sigma: float, sigma_data: float = 0.5) -> torch.Tensor:
    """Scale a noisy state to data-like magnitude for viewing: x·σ_d/√(σ² + σ_d²) (σ_d·c_in, EDM Table 1).

    Args:
        x: [N, C, H, W] noisy images at noise level `sigma`.
        sigma: their noise level σ >= 0.
        sigma_data: data standard deviation σ_d.

    Returns:
        [N, C, H, W] float32, equal to `x` at σ = 0.
    """
    return x.to(torch.float32) * (sigma_data / math.sqrt(sigma**2 + sigma_data**2))


def reverse_process_frame(
    x: torch.Tensor, denoised: torch.Tensor, *, sigma: float, title: str = "", sigma_data: float = 0.5, scale: int = 1
) -> Image.Image:
    """One frame of the reverse process: per sample a row [noisy state x_i | denoised estimate D].

    Args:
        x: [N, C, H, W] noisy states at noise level `sigma` (C = 1 or 3).
        denoised: [N, C, H, W] denoised estimates, in [-1, 1].
        sigma: noise level of `x` (for the display scaling).
        title: text written in a strip above the images (ASCII; empty for none).
        sigma_data: data standard deviation σ_d.
        scale: integer upscaling factor (nearest neighbour) for small images.

    Returns:
        PIL image ("L" or "RGB").
    """
    if x.shape != denoised.shape or x.ndim != 4:
        raise ValueError(f"x and denoised must both be [N, C, H, W], got {tuple(x.shape)} and {tuple(denoised.shape)}")
    pairs = torch.stack([display_noisy(x, sigma=sigma, sigma_data=sigma_data), denoised.to(torch.float32)], dim=1)
    grid = image_grid(pairs.flatten(0, 1).cpu(), nrow=2)  # uint8 [C, N*(H+1)+1, 2*(W+1)+1]
    array = grid.permute(1, 2, 0).numpy()  # [H', W', C]
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    if not title:
        return image
    framed = Image.new(image.mode, (image.width, image.height + HEADER_PX))
    framed.paste(image, (0, HEADER_PX))
    ImageDraw.Draw(framed).text((1, 0), title, fill=255 if image.mode == "L" else (255, 255, 255))
    return framed


def save_gif(frames: Sequence[Image.Image], path: str | Path, *, duration_ms: int = 100, hold_ms: int = 1500) -> None:
    """Write frames as an endlessly looping animated GIF; the last frame stays `hold_ms` milliseconds."""
    if not frames:
        raise ValueError("no frames to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    durations = [duration_ms] * (len(frames) - 1) + [hold_ms]
    frames[0].save(path, format="GIF", save_all=True, append_images=list(frames[1:]), duration=durations, loop=0)


class ReverseProcessRecorder:
    """Sampler callback that keeps x_i and D(x_i; σ_i) of the first `num` images at every step.

    Clips [N, C, T, H, W] are kept as film strips [N, C, H, T·W] (frame t at columns t·W..), so each GIF frame shows
    every frame of the clip at that step.

    Pass it as ``callback`` to a sampler or to :func:`edmkit.sampling.generate.generate_images` (which adds
    the batch's first index as ``start``, so images split over several batches are kept in order),
    then call :meth:`frames` or :meth:`save`.
    """

    def __init__(self, *, num: int = 4, sigma_data: float = 0.5) -> None:
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        self.num = num
        self.sigma_data = sigma_data
        self.steps: dict[int, dict] = {}  # step i -> sigma, sigma_next, lists of x / denoised row blocks

    def __call__(self, info: dict) -> None:
        start = int(info.get("start", 0))
        take = self.num - start
        if take <= 0:
            return
        step = self.steps.setdefault(info["i"], dict(sigma=info["sigma"], sigma_next=info["sigma_next"], x=[], denoised=[]))
        for key in ("x", "denoised"):
            v = info[key][:take].detach().to("cpu", torch.float32, copy=True)
            step[key].append(v.permute(0, 1, 3, 2, 4).flatten(3) if v.ndim == 5 else v)  # clips: film strips

    def frames(self, *, scale: int | None = None) -> list[Image.Image]:
        """One frame per recorded step: x after the step (at σ_{i+1}) beside D at σ_i."""
        frames = []
        for i in sorted(self.steps):
            step = self.steps[i]
            x, denoised = torch.cat(step["x"]), torch.cat(step["denoised"])
            s = scale or max(1, 96 // x.shape[-2])  # small images (and strips of small frames) upscaled to about 96 px high
            title = f"step {i + 1}/{len(self.steps)} sigma {step['sigma']:.3g}"
            frames.append(reverse_process_frame(x, denoised, sigma=step["sigma_next"], title=title,
                                                sigma_data=self.sigma_data, scale=s))
        return frames

    def save(self, path: str | Path, *, duration_ms: int = 100, hold_ms: int = 1500) -> None:
        """Write the recorded reverse process as an animated GIF."""
        if not self.steps:
            raise ValueError("nothing recorded: the recorder was never called by a sampler")
        save_gif(self.frames(), path, duration_ms=duration_ms, hold_ms=hold_ms)


# ---------------------------------------------------------------------------------------------
# `edmkit report RUN`: a self-contained HTML page (relative links) with PNG plots of stats.jsonl,
# the run's sample grids over time and a reverse-process GIF of its newest network.

RUN_FILES = ("stats.jsonl", "config.json", "grid-*.png", "network-*.safetensors")


def read_stats(path: str | Path, *, notice: Callable[[str], None] | None = None) -> list[dict]:
    """Records of a ``stats.jsonl`` that carry an image count; an unreadable (torn) line is dropped with a ``notice``."""
    from edmkit.training.monitor import read_records

    return [rec for _, rec in read_records(Path(path), notice=notice) if isinstance(rec.get("nimg"), (int, float))]


def plot_series(path: Path, series: dict[str, tuple[list, list]], *, title: str, ylabel: str, log_y: bool = False,
                marks: tuple[list, list] | None = None, marks_label: str = "") -> None:
    """Write a line plot PNG of named (nimg, value) series (None values dropped); optional red markers."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no pyplot global state

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if isinstance(y, (int, float)) and math.isfinite(y)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, marker="." if len(pts) < 50 else None)
    if marks and marks[0]:
        ax.scatter(marks[0], marks[1], color="red", marker="x", s=60, zorder=3, label=marks_label)
    if log_y and all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
        ax.set_yscale("log")
    ax.set(title=title, xlabel="training images (nimg)", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1 or marks_label:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _column(records: list[dict], key: str) -> tuple[list, list]:
    return [r["nimg"] for r in records], [r.get(key) for r in records]


def _stats_plots(records: list[dict], out: Path) -> list[tuple[str, str]]:
    """Plot every available curve into `out`; returns (caption, file name) pairs."""
    plots: list[tuple[str, str]] = []

    def add(name: str, caption: str, **kw) -> None:
        plot_series(out / name, **kw)
        plots.append((caption, name))

    train = [r for r in records if r.get("kind", "train") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    if any(r.get("mse") is not None or r.get("loss") is not None for r in train):
        add("loss.png", "Training loss", series={"mse (λ-weighted)": _column(train, "mse"), "loss (optimized)": _column(train, "loss")},
            title="training loss", ylabel="loss", log_y=True)
    if any(r.get("lr") is not None for r in train):
        add("lr.png", "Learning rate", series={"lr": _column(train, "lr")}, title="learning rate", ylabel="lr")
    if any(r.get("grad_norm") is not None for r in train):
        add("grad_norm.png", "Gradient norm (before clipping)", series={"mean": _column(train, "grad_norm"), "max": _column(train, "grad_norm_max")},
            title="global gradient norm", ylabel="L2 norm", log_y=True)
    if val:
        flagged = [r for r in val if r.get("memorization")]
        add("val_loss.png", "Validation loss (held-out vs training images; red x: memorization flag)",
            series={"held-out": _column(val, "loss"), "training images": _column(val, "train_loss")}, title="validation loss", ylabel="loss",
            log_y=True, marks=([r["nimg"] for r in flagged], [r.get("loss") for r in flagged]), marks_label="memorization" if flagged else "")
        sigmas = next((r["sigma"] for r in reversed(val) if isinstance(r.get("sigma"), list) and isinstance(r.get("loss_per_sigma"), list)), None)
        if sigmas:
            rows = [r for r in val if len(r.get("loss_per_sigma") or []) == len(sigmas)]  # same σ bins as the newest record
            per = {f"σ={s:.3g}": ([r["nimg"] for r in rows], [r["loss_per_sigma"][i] for r in rows]) for i, s in enumerate(sigmas)}
            add("val_loss_per_sigma.png", "Held-out loss per σ bin", series=per, title="held-out loss per σ bin", ylabel="loss", log_y=True)
    for kind in sorted({str(r.get("kind")) for r in records} - {"train", "val", "None"}):
        rows = [r for r in records if str(r.get("kind")) == kind]
        labelled = sorted({k for r in rows if isinstance(r.get("labels"), dict) for k in r["labels"]})
        keys = labelled or sorted({k for r in rows for k, v in r.items() if k not in ("nimg", "step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool)})
        for key in keys:
            safe = "".join(c if c.isalnum() else "_" for c in f"{kind}_{key}")
            series = _labelled_series(rows, key)
            title = f"{kind}: {next(iter(series))}" if len(series) == 1 else f"{kind}: {key}"
            add(f"metric_{safe}.png", title, series=series, title=title, ylabel=key)
    return plots


def _labelled_series(rows: list[dict], key: str) -> dict[str, tuple[list, list]]:
    """(nimg, value) series of ``key``, one per label the records give it in their ``labels`` ({score: label}; in-training
    ``"metric"`` records: "fid (n=1000, small-n estimate, ...)"), so scores of different sample sizes are never one curve;
    records without labels are named ``key``."""
    series: dict[str, tuple[list, list]] = {}
    for r in rows:
        if key in r:
            label = str(r["labels"].get(key, key)) if isinstance(r.get("labels"), dict) else key
            xs, ys = series.setdefault(label, ([], []))
            xs.append(r["nimg"])
            ys.append(r[key])
    return series or {key: ([], [])}


def _reverse_gif(run_dir: Path, out: Path, *, num: int, steps: int | None, device: torch.device | str) -> tuple[str, bool]:
    """Sample `num` images from the run's newest network, recording the reverse process; returns (a note, whether written)."""
    from edmkit.checkpoint import find_network, load_network, read_network_metadata
    from edmkit.sampling.generate import describe_sampling, generate_images, run_sampling

    path = find_network(run_dir)
    if read_network_metadata(path)["encoder"] is not None:
        return f"{path.name}: a latent-space network; its reverse process is not drawn (edmkit generate decodes its samples)", False
    net, meta = load_network(path, device=device)
    c, setting = meta["config"].network, run_sampling(meta["config"], None, steps or None)
    recorder = ReverseProcessRecorder(num=num, sigma_data=c.sigma_data)
    generate_images(net, seeds=range(num), resolution=c.resolution, channels=c.channels, label_dim=c.label_dim, device=device,
                    frames=c.frames, callback=recorder, **setting)
    recorder.save(out)
    return f"{path.name} (nimg {meta['nimg']}, EMA {meta['ema_std']:g}), {describe_sampling(setting)}, seeds 0-{num - 1}", True


def write_report(run_dir: str | Path, out: str | Path | None = None, *, gif_n: int = 4, gif_steps: int | None = None,
                 device: torch.device | str = "cpu", log: Callable[[str], None] | None = None) -> Path:
    """Write ``index.html`` and its PNG/GIF files for a training run folder; returns the page's path.

    Args:
        run_dir: a run folder of ``edmkit train`` (stats.jsonl, grid-*.png, network-*.safetensors;
            each is optional, at least one must be there).
        out: output folder (default ``RUN/report``); self-contained, links are relative.
        gif_n: images in the reverse-process GIF (0: no GIF).
        gif_steps: sampler steps of the GIF (default: the run's ``sample_steps``).
        device: where the GIF is sampled.
        log: where notices go (a torn line of ``stats.jsonl`` dropped).
    """
    import html
    import shutil

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run folder")
    if not any(any(run_dir.glob(pattern)) for pattern in RUN_FILES):
        raise ValueError(f"{run_dir}: not a run folder (no {', '.join(RUN_FILES)})")
    out = run_dir / "report" if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = run_dir / "stats.jsonl"
    records = read_stats(stats, notice=log) if stats.is_file() else []
    parts = [f"<h1>Training report: {html.escape(run_dir.resolve().name)}</h1>",
             f"<p>{len(records)} stats records" + (f", up to {max(r['nimg'] for r in records)} training images" if records else "") + "</p>"]
    plots = _stats_plots(records, out)
    parts.append("<h2>Curves</h2>" + ("".join(f'<figure><img src="{n}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
                                               for c, n in plots) or "<p>no stats.jsonl records</p>"))
    grids = sorted(run_dir.glob("grid-*.png"))
    if grids:
        (out / "grids").mkdir(exist_ok=True)
    for grid in grids:
        shutil.copyfile(grid, out / "grids" / grid.name)
    parts.append("<h2>Sample grids over time</h2>" + ("".join(
        f'<figure><img src="grids/{g.name}" alt="{g.stem}"><figcaption>{int(g.stem.split("-")[-1]) if g.stem.split("-")[-1].isdigit() else g.stem} images</figcaption></figure>'
        for g in grids) or "<p>no grid-*.png files</p>"))
    note = "no network-*.safetensors files" if not any(run_dir.glob("network-*.safetensors")) else "not requested"
    written = False
    if gif_n > 0 and note != "no network-*.safetensors files":
        note, written = _reverse_gif(run_dir, out / "reverse.gif", num=gif_n, steps=gif_steps, device=device)
    if written:
        parts.append(f'<h2>Reverse diffusion (noisy state | denoised)</h2><figure><img src="reverse.gif" alt="reverse process"><figcaption>{html.escape(note)}</figcaption></figure>')
    else:
        parts.append(f"<h2>Reverse diffusion</h2><p>{html.escape(note)}</p>")
    style = "body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:0.5em}img{image-rendering:pixelated;max-width:640px}"
    page = f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(run_dir.name)}</title><style>{style}</style></head><body>\n'
    text = (page + "\n".join(parts) + "\n</body></html>\n").encode()
    atomic_write(out / "index.html", lambda f: f.write(text))
    return out / "index.html"
