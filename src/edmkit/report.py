"""Reports: pictures of what a model does. For now, the reverse-diffusion process as an animated GIF.

Symbols (EDM Table 1): x_i is the sampler's noisy state at noise level σ_i (x = y + σ·n), and
D = D(x_i; σ_i) the denoised estimate of the clean image y. For display, x_i is scaled by
σ_d/√(σ² + σ_d²), which gives it roughly the data's standard deviation σ_d at every σ (it is σ_d
times EDM's c_in), so the pure noise of the first steps does not clip to black and white.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from edmkit.data import image_grid

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

    Pass it as ``callback`` to a sampler or to :func:`edmkit.generate.generate_images` (which adds
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
        step["x"].append(info["x"][:take].detach().to("cpu", torch.float32, copy=True))
        step["denoised"].append(info["denoised"][:take].detach().to("cpu", torch.float32, copy=True))

    def frames(self, *, scale: int | None = None) -> list[Image.Image]:
        """One frame per recorded step: x after the step (at σ_{i+1}) beside D at σ_i."""
        frames = []
        for i in sorted(self.steps):
            step = self.steps[i]
            x, denoised = torch.cat(step["x"]), torch.cat(step["denoised"])
            s = scale or max(1, 96 // x.shape[-1])  # small images upscaled to about 96 px
            title = f"step {i + 1}/{len(self.steps)} sigma {step['sigma']:.3g}"
            frames.append(reverse_process_frame(x, denoised, sigma=step["sigma_next"], title=title,
                                                sigma_data=self.sigma_data, scale=s))
        return frames

    def save(self, path: str | Path, *, duration_ms: int = 100, hold_ms: int = 1500) -> None:
        """Write the recorded reverse process as an animated GIF."""
        if not self.steps:
            raise ValueError("nothing recorded: the recorder was never called by a sampler")
        save_gif(self.frames(), path, duration_ms=duration_ms, hold_ms=hold_ms)
