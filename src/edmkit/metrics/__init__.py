"""Evaluation: FID, KID, precision / recall, memorization, and the detectors behind them.

Modules:
    stats         pure math: FeatureStats, frechet_distance, kid, precision_recall
    memorization  nearest training neighbours, near-copy rate, PNG of the worst pairs
    detectors     TorchScript feature networks (registry DETECTORS), cache folder, sha256 checks
    reference     reference files (ref.npz): statistics, raw features, detector hash checks
    evaluate      features of generators / image sets, scores, repeats, torchrun reduction
    probe         linear probe: ridge classifier on frozen, pooled denoiser block features at a fixed σ
"""

from edmkit.metrics.detectors import DETECTORS, Detector, DetectorError, cache_dir, load_detector
from edmkit.metrics.memorization import Memorization, memorization, save_pairs
from edmkit.metrics.stats import FeatureStats, feature_stats, frechet_distance, kid, precision_recall

__all__ = ["DETECTORS", "Detector", "DetectorError", "FeatureStats", "Memorization", "cache_dir", "feature_stats", "frechet_distance", "kid",
           "load_detector", "memorization", "precision_recall", "save_pairs"]
