"""Evaluation: FID, KID, precision / recall, memorization, and the detectors behind them.

Modules:
    stats         pure math: FeatureStats, frechet_distance, kid, precision_recall
    memorization  nearest training neighbours, near-copy rate, PNG of the worst pairs
    detectors     feature networks (registry DETECTORS: TorchScript files, the built-in mnist one), cache folder, sha256 checks
    mnist_net     the built-in digit detector's network (DigitNet) and its shipped weights file
    reference     reference files (ref.npz): statistics, raw features, detector hash checks
    evaluate      features of generators / image sets, scores, repeats, torchrun reduction
    probe         linear probe: ridge classifier on frozen, pooled denoiser block features at a fixed σ
"""
