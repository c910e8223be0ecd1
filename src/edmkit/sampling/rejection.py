"""Rejection sampling: generate candidates, keep those a noise-aware classifier assigns to the requested class.

Each candidate image (one per seed) is generated as usual, then classified clean, at the smallest σ of the default
sampling grid (``edmkit.diffusion.classifier.CLEAN_SIGMA``, EDM σ_min), by a :class:`edmkit.diffusion.classifier.NoisyClassifier`. It is
accepted when the predicted class is the requested one and its probability p(class | x, σ) is at least τ
(:func:`accept`); the others are dropped. This is the seed notes' "reject generated samples if the provided
conditions can be estimated from the generated samples".

Candidates are consecutive seeds from the first one asked for (:func:`candidate_seeds`), at most `max_tries` of them
(default 10 n), tried in seed order, so which images are kept depends only on the seeds, not on the batch size.
:func:`accepted_batches` streams the accepted images (``edmkit generate`` via :func:`rejection_sample`, and
``edmkit metrics gen`` via ``edmkit.metrics.evaluate``, both draw from it).

Rate: acceptance rate = accepted / tried (``RejectionTally.rate``, ``RejectionResult.rate``). ``edmkit generate``
prints "accepted A of T candidates (rate R%)"; ``edmkit metrics gen`` records ``tried``, ``accepted`` and
``accept_rate`` per repeat in its JSON result. "accepted" counts every accepted candidate, which can exceed the
images kept when the last batch overshoots n.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Callable, Sequence

import torch

from edmkit.diffusion.classifier import CLEAN_SIGMA


def check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise ValueError(f"rejection threshold must be in (0, 1], got {threshold}")


@torch.no_grad()
def accept(classifier: Callable, x: torch.Tensor, *, class_idx: int, threshold: float, sigma: float = CLEAN_SIGMA) -> torch.Tensor:
    """Rejection test of clean samples x [N, C, H, W]: predicted class == `class_idx` and p(class | x, σ) ≥ τ. Returns bool [N]."""
    check_threshold(threshold)
    probs = classifier(x, torch.full([len(x)], sigma, device=x.device)).float().softmax(dim=1)  # [N, K]
    if not 0 <= class_idx < probs.shape[1]:
        raise ValueError(f"class {class_idx} out of range: the classifier has {probs.shape[1]} classes")
    return (probs.argmax(dim=1) == class_idx) & (probs[:, class_idx] >= threshold)


@dataclasses.dataclass(frozen=True)
class Rejection:
    """Rejection-sampling settings: keep candidates `classifier` assigns to `class_idx` with p ≥ `threshold` (:func:`accept`)."""

    classifier: Callable      # (x [N, C, H, W], sigma [N]) -> logits [N, K]
    class_idx: int            # the class to keep
    threshold: float          # confidence τ in (0, 1]
    max_tries: int | None = None  # candidates allowed per n images asked for (default 10 n)

    def __post_init__(self) -> None:
        check_threshold(self.threshold)


@dataclasses.dataclass
class RejectionTally:
    """Running counts of a rejection stream (:func:`accepted_batches`)."""

    tried: int = 0            # candidates generated and classified
    accepted: int = 0         # of those, accepted (can exceed `kept` when the last batch overshoots n)
    kept: int = 0             # accepted images passed on (at most n)

    @property
    def rate(self) -> float:
        """Acceptance rate: accepted / tried."""
        return self.accepted / max(self.tried, 1)


@dataclasses.dataclass(frozen=True)
class RejectionResult:
    images: torch.Tensor      # [accepted, C, H, W] the accepted samples, in seed order
    seeds: list[int]          # their seeds
    tried: int                # candidates generated and classified
    accepted: int             # candidates accepted (can exceed len(seeds) when the last batch overshoots n)

    @property
    def rate(self) -> float:
        """Acceptance rate: accepted / tried."""
        return self.accepted / max(self.tried, 1)


def resolve_max_tries(n: int, max_tries: int | None) -> int:
    """Candidates allowed for n accepted images: `max_tries` (default 10 n), which must be at least n."""
    if n < 1:
        raise ValueError(f"need at least one image, got n = {n}")
    max_tries = 10 * n if max_tries is None else max_tries
    if max_tries < n:
        raise ValueError(f"max_tries ({max_tries}) must be at least the number of images asked for ({n})")
    return max_tries


def candidate_seeds(seeds: Sequence[int], *, max_tries: int | None = None) -> range:
    """Rejection candidates for the len(seeds) images asked for: `max_tries` consecutive seeds from the first (default 10 n)."""
    return range(seeds[0], seeds[0] + resolve_max_tries(len(seeds), max_tries))


def accepted_batches(sample: Callable[[list[int]], torch.Tensor], classifier: Callable, *, n: int, class_idx: int, threshold: float,
                     candidates: Sequence[int], batch: int = 64, tally: RejectionTally | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Generate candidates batch by batch and yield the accepted ones (:func:`accept`), in seed order, until `n` are kept.

    Args:
        sample: seeds -> clean images [len(seeds), C, H, W] (e.g. a partial of ``generate_images``).
        classifier: (x, sigma) -> logits [N, K].
        n: accepted images wanted.
        candidates: candidate seeds, tried in order; the stream ends early when they run out.
        tally: updated in place with the counts (pass one to read them).

    Yields:
        (seeds of the batch's kept images, their images [b, C, H, W] on the CPU); b may be 0.
    """
    check_threshold(threshold)
    if n < 1 or batch < 1:
        raise ValueError(f"n and batch must be >= 1, got {n}, {batch}")
    tally = RejectionTally() if tally is None else tally
    for start in range(0, len(candidates), batch):
        if tally.kept >= n:
            return
        chunk = [int(s) for s in candidates[start:start + batch]]
        x = sample(chunk)  # [b, C, H, W]
        ok = accept(classifier, x, class_idx=class_idx, threshold=threshold).cpu()  # [b]
        take = min(int(ok.sum()), n - tally.kept)
        tally.tried, tally.accepted, tally.kept = tally.tried + len(chunk), tally.accepted + int(ok.sum()), tally.kept + take
        yield [s for s, k in zip(chunk, ok.tolist()) if k][:take], x.cpu()[ok][:take]


def rejection_sample(sample: Callable[[list[int]], torch.Tensor], classifier: Callable, *, n: int, class_idx: int, threshold: float,
                     seeds: Sequence[int] | None = None, batch: int = 64, max_tries: int | None = None) -> RejectionResult:
    """Generate candidates seed by seed and keep the accepted ones (see :func:`accept`) until `n` or `max_tries`.

    Args:
        sample: seeds -> clean images [len(seeds), C, H, W] (e.g. a partial of ``generate_images``).
        classifier: (x, sigma) -> logits [N, K].
        n: accepted images wanted.
        seeds: candidate seeds in order (default 0, 1, 2, ...).
        max_tries: at most this many candidates (default 10 n).

    Returns:
        RejectionResult with at most `n` images; fewer when the cap was reached (check ``len(result.seeds)``).
    """
    check_threshold(threshold)
    max_tries = resolve_max_tries(n, max_tries)
    candidates = (list(seeds) if seeds is not None else list(range(max_tries)))[:max_tries]
    tally = RejectionTally()
    parts = list(accepted_batches(sample, classifier, n=n, class_idx=class_idx, threshold=threshold, candidates=candidates,
                                  batch=batch, tally=tally))
    return RejectionResult(images=torch.cat([x for _, x in parts]), seeds=[s for seeds_, _ in parts for s in seeds_],
                           tried=tally.tried, accepted=tally.accepted)
