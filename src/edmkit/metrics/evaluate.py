"""Evaluation pipelines around the math of :mod:`edmkit.metrics.stats`.

- Features of generated images are computed batch by batch, straight from the sampler (no image
  is written to disk); the same code serves in-memory image sets (folders) and datasets
  (reference statistics, stored by :mod:`edmkit.metrics.reference`).
- Repeats use disjoint seed ranges (or disjoint image chunks); results report each repeat and the
  mean, std, min and max over them.
- Under torchrun each rank takes a slice of the seeds / images; the float64 sums are all-reduced,
  so μ, Σ and FID do not depend on the number of ranks beyond floating-point summation order. The
  raw features kept for KID / precision-recall are gathered in rank order and cut to the cap, so
  with more images than the cap they are a different (equally random) subset per rank count.
- Rejection sampling (``edmkit.sampling.rejection.Rejection``): the n images scored are the first n accepted
  candidates, tried in seed order; repeat r draws its candidates from its own range of max_tries seeds.
  It runs in one process (which candidates are scored depends on all earlier ones).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from edmkit import dist
from edmkit.data.images import float_to_images, images_to_float
from edmkit.metrics.detectors import Detector, conversion_notice
from edmkit.metrics.memorization import Memorization, memorization
from edmkit.metrics.reference import Reference, check_detector, shape_notice
from edmkit.metrics.stats import IS_SPLITS, ClassProbStats, FeatureStats, frechet_distance, kid, precision_recall
from edmkit.sampling.rejection import Rejection, RejectionTally, accepted_batches, candidate_seeds

PUBLISHED_N = 50_000  # generated images behind published FIDs (EDM, EDM2)


# ---------------------------------------------------------------------------------------------
# Distribution (torchrun): rank slices, reductions.


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the [n_r, D] CPU tensors of all ranks in rank order (this tensor alone without a process group)."""
    if dist.world_size() == 1:
        return x
    parts: list = [None] * dist.world_size()
    torch.distributed.all_gather_object(parts, x)
    return torch.cat(parts)


def sample_size_notice(n: int) -> str | None:
    """A warning line when n differs from the 50,000 images behind published FIDs (FID is biased at small n)."""
    if n == PUBLISHED_N:
        return None
    return (f"note: n = {n}; FID is biased upward at small n, so compare only with scores at the same n "
            f"(published FIDs use {PUBLISHED_N:,})")


def evaluation_notices(ref: Reference, detector: Detector, *, n: int, resolution: int, channels: int) -> list[str]:
    """The notices every evaluation prints once: the detector's own note (e.g. scores not comparable to Inception's), its
    input conversion, a reference of another image shape, and n differing from the published 50,000 (empty when none applies)."""
    lines = (detector.spec.note, conversion_notice(detector.spec, channels=channels, resolution=resolution),
             shape_notice(ref, resolution=resolution, channels=channels), sample_size_notice(n))
    return [line for line in lines if line]


# ---------------------------------------------------------------------------------------------
# Features of image streams.


def accumulate_features(
    batches: Iterable[torch.Tensor], *, detector: Detector, keep: int, total: int | None = None, progress: bool = False, desc: str = "features",
    classes: ClassProbStats | None = None,
) -> tuple[FeatureStats, np.ndarray]:
    """Detector features of a stream of uint8 image batches: float64 sums plus the first `keep` raw features.

    Under torch.distributed each rank passes its own slice; the sums are all-reduced and the kept
    features of all ranks gathered (rank order), then cut to `keep`.

    Args:
        batches: uint8 images [B, C, H, W] per batch.
        detector: the feature network.
        keep: raw features to keep (0 for FID only).
        total: number of images, for the progress bar.
        progress: show a progress bar (rank 0 only).
        desc: progress bar label.
        classes: when given, also accumulates the detector's class probabilities (for the Inception Score) into it,
            image j of this rank's stream counted as image rank + j·world of the scored set (the slices ``[rank::world]``).

    Returns:
        (stats over all images, float32 [min(keep, N), D]).
    """
    stats, kept, n_kept, seen = None, [], 0, 0
    with tqdm(total=total, unit="img", desc=desc, disable=not progress or (dist.rank(), dist.world_size())[0] != 0, dynamic_ncols=True) as bar:
        for images in batches:
            f = detector(images)  # [B, D]
            if stats is None:  # the feature dimension is known after the first batch
                stats = FeatureStats(f.shape[1], device=f.device)
            stats.update(f)
            if classes is not None:
                classes.update(detector.probs(images), dist.rank() + dist.world_size() * torch.arange(seen, seen + len(images)))
            seen += len(images)
            if n_kept < keep:
                kept.append(f[:keep - n_kept].cpu())
                n_kept += len(kept[-1])
            bar.update(len(images))
    if stats is None:
        raise ValueError("no images to evaluate")
    stats.all_reduce()
    if classes is not None:
        classes.all_reduce()
    features = gather_rows(torch.cat(kept) if kept else torch.zeros(0, stats.dim))[:keep]
    return stats, features.numpy()


def image_batches(images: torch.Tensor, *, batch: int, indices: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Batches of an in-memory uint8 image tensor [N, C, H, W], optionally in the order of `indices`."""
    order = torch.arange(len(images)) if indices is None else indices
    for start in range(0, len(order), batch):
        yield images[order[start:start + batch]]


def generated_batches(net: Callable, seeds: Sequence[int], *, batch: int, device: torch.device | str, generate_kw: dict,
                      rejection: Rejection | None = None, n: int | None = None, tally: RejectionTally | None = None,
                      decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """uint8 images [B, C, H, W] from ``generate_images``, one batch of seeds at a time (nothing written to disk);
    ``decode`` turns a latent network's samples into images in [-1, 1] first (``edmkit.latent.encoder``).

    With `rejection`, `seeds` are candidates tried in order, and only the first `n` accepted images are yielded
    (counts in `tally`); fewer than `n` accepted among all candidates raises ValueError once they are used up.
    """
    from edmkit.sampling.generate import generate_images  # the sampling stack only when generating

    def sample(chunk: Sequence[int]) -> torch.Tensor:
        x = generate_images(net, seeds=list(chunk), batch=batch, device=device, **generate_kw)
        return x if decode is None else decode(x)

    if rejection is None:
        for start in range(0, len(seeds), batch):
            yield float_to_images(sample(seeds[start:start + batch]))
        return
    if n is None:
        raise ValueError("rejection sampling needs n, the number of accepted images wanted")
    tally = RejectionTally() if tally is None else tally
    for _, x in accepted_batches(sample, rejection.classifier, n=n, class_idx=rejection.class_idx, threshold=rejection.threshold,
                                 candidates=seeds, batch=batch, tally=tally):
        if len(x):
            yield float_to_images(x)
    if tally.kept < n:
        raise ValueError(f"rejection sampling: only {tally.kept} of {n} images were of class {rejection.class_idx} with confidence "
                         f">= {rejection.threshold:g} among {tally.tried} candidates (seeds {describe_seeds(seeds)}); "
                         "lower the threshold or allow more tries (--max-tries)")


def compute_reference(
    images: torch.Tensor, *, detector: Detector, source: str, batch: int = 250, max_features: int = 10_000, seed: int = 0, progress: bool = False,
) -> Reference:
    """Reference statistics of a dataset: μ, Σ over all images and the raw features of a random subset.

    Args:
        images: uint8 [N, C, H, W] (all ranks pass the same tensor; each takes a slice).
        detector: the feature network.
        source: dataset name recorded in the file.
        batch: images per detector batch.
        max_features: raw features kept for KID / precision-recall (a seeded random subset).
        seed: seed of that subset.
        progress: show a progress bar.
    """
    if len(images) < 2:
        raise ValueError(f"{source}: need at least 2 images for reference statistics, got {len(images)}")
    rank, world = dist.rank(), dist.world_size()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))  # kept features: a random subset
    stats, features = accumulate_features(image_batches(images, batch=batch, indices=order[rank::world]), detector=detector,
                                          keep=max_features, total=len(order[rank::world]), progress=progress, desc="reference")
    mu, sigma = stats.mean_cov()
    return Reference(mu=mu, sigma=sigma, n=stats.n, features=features, detector=detector.spec.name, detector_sha256=detector.sha256,
                     source=source, resolution=int(images.shape[-1]), channels=int(images.shape[1]))


# ---------------------------------------------------------------------------------------------
# Scores, repeats, summaries.


def check_metrics(detector: Detector, metrics: Sequence[str], *, n: int) -> None:
    """ValueError before any sampling when a requested score cannot be computed (IS: a class head and >= 10 images)."""
    if "is" in metrics:
        if detector.spec.probs_kwargs is None:
            raise ValueError(f"the {detector.spec.name} detector has no class head, so no Inception Score: drop 'is' from --metrics "
                             "or use the inception detector")
        if n < IS_SPLITS:
            raise ValueError(f"the Inception Score splits the images into {IS_SPLITS}: need n >= {IS_SPLITS}, got {n}")


def class_stats(metrics: Sequence[str], *, n: int) -> ClassProbStats | None:
    """The class-probability accumulator of one repeat of n images when the Inception Score is requested."""
    return ClassProbStats(n=n, splits=IS_SPLITS) if "is" in metrics else None


def score(stats: FeatureStats, features: np.ndarray, ref: Reference, *, metrics: Sequence[str], kid_subsets: int = 100,
          kid_subset_size: int = 1000, pr_k: int = 3, device: torch.device | str = "cpu", classes: ClassProbStats | None = None) -> dict[str, float]:
    """FID, KID (mean and std over subsets), precision / recall of evaluated features against a reference, and the
    Inception Score (mean and std over its 10 splits; needs `classes`, which no reference enters)."""
    out: dict[str, float] = {}
    if {"kid", "pr"} & set(metrics) and min(len(features), len(ref.features)) <= pr_k:
        raise ValueError(f"KID and precision/recall need more than {pr_k} raw features, but the reference keeps {len(ref.features)} and "
                         f"{len(features)} images were evaluated: use more images, recompute the reference with a larger --max-features, "
                         "or --metrics fid")
    if "fid" in metrics:
        mu, sigma = stats.mean_cov()
        out["fid"] = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    if "kid" in metrics:
        out["kid"], out["kid_std"] = kid(features, ref.features, subsets=kid_subsets, subset_size=kid_subset_size, device=device)
    if "pr" in metrics:
        m = min(len(features), len(ref.features))  # equal set sizes: k-NN radii depend on them
        out["precision"], out["recall"] = precision_recall(ref.features[:m], features[:m], k=pr_k, device=device)
        out["pr_n"] = m
    if "is" in metrics:
        if classes is None:
            raise ValueError("the Inception Score needs the class probabilities of the evaluated images")
        out["is"], out["is_std"] = classes.score()
    return out


def seed_ranges(seeds: Sequence[int], repeats: int) -> list[list[int]]:
    """Disjoint copies of a seed list for repeats: repeat r adds r·(max − min + 1) to every seed."""
    if repeats < 1 or not seeds:
        raise ValueError(f"need repeats >= 1 and at least one seed, got {repeats} and {len(seeds)} seeds")
    span = max(seeds) - min(seeds) + 1
    return [[s + r * span for s in seeds] for r in range(repeats)]


def describe_seeds(seeds: Sequence[int]) -> str:
    """``"0-49999"`` for a contiguous range, else a short description."""
    s = list(seeds)
    if s == list(range(s[0], s[0] + len(s))):
        return f"{s[0]}-{s[-1]}"
    return f"{len(s)} seeds in {min(s)}-{max(s)}"


def summarize(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean, std (n − 1 divisor; 0 for one repeat), min and max of each numeric score over repeats."""
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    out = {}
    for k in keys:
        v = np.array([r[k] for r in rows], dtype=np.float64)
        out[k] = dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, min=float(v.min()), max=float(v.max()))
    return out


def result_info(ref: Reference, ref_path: str | os.PathLike, detector: Detector) -> dict:
    """What a results file records about the reference and the detector."""
    info = dict(ref=str(ref_path), ref_n=ref.n, ref_source=ref.source, detector=detector.spec.name, detector_path=str(detector.path),
                detector_sha256=detector.sha256)
    return info | ({"detector_note": detector.spec.note} if detector.spec.note else {})


def format_results(result: dict) -> list[str]:
    """Human-readable lines: one per score, mean ± std with min / max over repeats."""
    rows, lines = result["repeats"], []
    for key, s in result["summary"].items():
        if key in ("kid_std", "is_std", "accept_rate"):
            continue
        if len(rows) == 1:
            extra = {"kid": f" ± {rows[0].get('kid_std', 0.0):.6f} (std over KID subsets)",
                     "is": f" ± {rows[0].get('is_std', 0.0):.6f} (std over {IS_SPLITS} splits)"}.get(key, "")
            lines.append(f"{key:<10} {s['mean']:.6f}{extra}")
        else:
            lines.append(f"{key:<10} {s['mean']:.6f} ± {s['std']:.6f}  (min {s['min']:.6f}, max {s['max']:.6f}; std over {len(rows)} repeats)")
    if "tried" in rows[0]:
        tried, accepted = sum(r["tried"] for r in rows), sum(r["accepted"] for r in rows)
        per = "".join(f"; repeat {i + 1}: {r['accepted']} of {r['tried']}" for i, r in enumerate(rows)) if len(rows) > 1 else ""
        lines.append(f"rejection  accepted {accepted} of {tried} candidates (rate {accepted / max(tried, 1):.1%}{per}); "
                     f"scored the first {rows[0]['n']} accepted per repeat")
    if result.get("detector_note"):
        lines.append(f"note: {result['detector_note']}")
    return lines


def evaluate_generator(
    net: Callable, *, ref: Reference, detector: Detector, seeds: Sequence[int], repeats: int = 1, metrics: Sequence[str] = ("fid", "kid", "pr"),
    batch: int = 64, device: torch.device | str = "cpu", generate_kw: dict | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
    pr_k: int = 3, progress: bool = False, rejection: Rejection | None = None, decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Score a generator against a reference over `repeats` disjoint seed ranges.

    Args:
        net: the denoiser.
        ref: reference statistics (same detector file as `detector`; see :func:`check_detector`).
        detector: the feature network.
        seeds: seeds of the first repeat; repeat r shifts them by r·(max − min + 1).
        repeats: number of disjoint seed ranges.
        metrics: subset of ``config.EVAL_METRICS``: "fid", "kid", "pr", "is" (Inception Score: 10 splits, mean ± std over them).
        batch: images per sampling / detector batch.
        device: where sampling runs.
        generate_kw: keyword arguments of ``generate_images`` (resolution, channels, label_dim, sampler, steps, ...).
        kid_subsets, kid_subset_size, pr_k: KID and precision/recall settings.
        progress: show a progress bar per repeat.
        rejection: score only accepted images: the first len(`seeds`) accepted of ``candidate_seeds(seeds, max_tries)``
            (repeat r: those shifted by r·max_tries). One process only.
        decode: latent networks: their samples -> images in [-1, 1] (``Encoder.decode``), scored in pixel space.

    Returns:
        ``{"repeats": [{"seeds", "n", scores...}, ...], "summary": {score: {mean, std, min, max}}}``; with rejection each
        repeat also has ``tried``, ``accepted`` and ``accept_rate`` (accepted / tried), and ``seeds`` names the candidates tried.
    """

    check_detector(ref, detector)
    check_metrics(detector, metrics, n=len(seeds))
    rank, world = dist.rank(), dist.world_size()
    if rejection is not None and world > 1:
        raise ValueError(f"rejection sampling runs in one process (which candidates are scored depends on all earlier ones), "
                         f"not {world}: run edmkit metrics gen without torchrun")
    keep = len(ref.features) if {"kid", "pr"} & set(metrics) else 0
    n = len(seeds)
    rows = []
    for r, rseeds in enumerate(seed_ranges(seeds if rejection is None else candidate_seeds(seeds, max_tries=rejection.max_tries), repeats)):
        mine = rseeds[rank::world]
        if not mine:
            raise ValueError(f"{len(rseeds)} seeds cannot be split over {world} ranks")
        tally = RejectionTally()
        batches = generated_batches(net, mine, batch=batch, device=device, generate_kw=generate_kw or {}, rejection=rejection, n=n, tally=tally,
                                    decode=decode)
        classes = class_stats(metrics, n=n)
        stats, features = accumulate_features(batches, detector=detector, keep=keep, total=len(mine) if rejection is None else n, progress=progress,
                                              desc=f"repeat {r + 1}/{repeats}" if repeats > 1 else "evaluate", classes=classes)
        row = dict(seeds=describe_seeds(rseeds), n=n)
        if rejection is not None:
            row.update(seeds=describe_seeds(rseeds[:tally.tried]), tried=tally.tried, accepted=tally.accepted, accept_rate=tally.rate)
        rows.append(dict(row, **score(stats, features, ref, metrics=metrics, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                                      pr_k=pr_k, device=detector.device, classes=classes)))
    return {"repeats": rows, "summary": summarize(rows)}


def memorization_check(samples: torch.Tensor, train: torch.Tensor, *, space: str = "pixels", detector: Detector | None = None, batch: int = 250,
                       ratio: float = 1 / 3, top: int = 16, device: torch.device | str = "cpu") -> Memorization:
    """Near-copies among generated images: ℓ2 in pixels ([-1, 1]) or cosine distance of detector features.

    Args:
        samples: uint8 [N, C, H, W] generated images.
        train: uint8 [M, C, H, W] training images of the same size and channels.
        space: "pixels" or "features" (needs `detector`).
        Others: as :func:`edmkit.metrics.memorization.memorization`.
    """
    if space == "pixels":
        return memorization(images_to_float(samples), images_to_float(train), metric="l2", ratio=ratio, top=top, device=device)
    if space != "features" or detector is None:
        raise ValueError(f"space must be 'pixels' or 'features' (with a detector), got {space!r}")
    a, b = (torch.cat([detector(x) for x in image_batches(images, batch=batch)]) for images in (samples, train))
    return memorization(a, b, metric="cosine", ratio=ratio, top=top, device=device)


def evaluate_images(
    images: torch.Tensor, *, ref: Reference, detector: Detector, n: int | None = None, repeats: int = 1, metrics: Sequence[str] = ("fid", "kid", "pr"),
    batch: int = 250, kid_subsets: int = 100, kid_subset_size: int = 1000, pr_k: int = 3, progress: bool = False,
) -> dict:
    """Score an in-memory image set (e.g. a folder) against a reference; repeat r uses images [r·n, (r+1)·n).

    Args:
        images: uint8 [N, C, H, W], N >= n · repeats.
        n: images per repeat (default: all of them / repeats).
        Others: as :func:`evaluate_generator`.
    """
    check_detector(ref, detector)
    n = len(images) // repeats if n is None else n
    if n < 2 or n * repeats > len(images):
        raise ValueError(f"need {n * repeats} images ({repeats} repeats of n = {n}, n >= 2), but only {len(images)} were found")
    check_metrics(detector, metrics, n=n)
    rank, world = dist.rank(), dist.world_size()
    keep = len(ref.features) if {"kid", "pr"} & set(metrics) else 0
    rows = []
    for r in range(repeats):
        mine = torch.arange(r * n, (r + 1) * n)[rank::world]
        classes = class_stats(metrics, n=n)
        stats, features = accumulate_features(image_batches(images, batch=batch, indices=mine), detector=detector, keep=keep, total=len(mine),
                                              progress=progress, desc=f"repeat {r + 1}/{repeats}" if repeats > 1 else "evaluate", classes=classes)
        rows.append(dict(images=f"{r * n}-{(r + 1) * n - 1}", n=n, **score(stats, features, ref, metrics=metrics, kid_subsets=kid_subsets,
                                                                           kid_subset_size=kid_subset_size, pr_k=pr_k, device=detector.device,
                                                                           classes=classes)))
    return {"repeats": rows, "summary": summarize(rows)}
