"""``edmkit metrics``: FID / KID / precision-recall, memorization, linear probe (logic in ``edmkit.metrics``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from edmkit import dist
from edmkit.cli._common import check_output_target, main, pick_device, user_errors
from edmkit.cli.generate import classifier_generate_kw, load_generate_classifier
from edmkit.config import parse_metrics
from edmkit.files import writer_lock


def metrics_options(fn):
    """Options shared by the metrics commands."""
    for option in reversed([
        click.option("--detector", default=None, help="Feature network: inception (the standard FID network; default), dinov2, mnist (built-in digit classifier, no download; "
                     "its FIDs are not comparable to Inception FIDs), or a TorchScript file path. Looked up in $EDMKIT_CACHE or ~/.cache/edmkit."),
        click.option("--detector-sha256", default=None, help="Expected sha256 of the detector file (a mismatch is an error)."),
        click.option("--batch", type=int, default=64, show_default=True, help="Images per batch (does not change the results)."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--quiet", is_flag=True, help="No progress bar.")]):
        fn = option(fn)
    return fn


def score_options(fn):
    """--repeats, --metrics, --out of the scoring commands."""
    for option in reversed([
        click.option("--repeats", type=int, default=1, show_default=True, help="Disjoint seed ranges (or image chunks) to score; reports mean ± std, min and max."),
        click.option("--metrics", "metric_names", default="fid,kid,pr", show_default=True, help="Comma-separated: fid, kid, pr (precision/recall, k = 3), is (Inception Score from the detector's class head: 10 splits "
                     "of the images in order, mean ± std over splits; over repeats with --repeats). Example: --metrics fid,is"),
        click.option("--out", type=click.Path(dir_okay=False), default=None, help="Results JSON (default: beside the network file / image folder, *-metrics.json).")]):
        fn = option(fn)
    return fn


def metrics_echo():
    """click.echo on rank 0, silence on the other torchrun ranks."""

    return click.echo if dist.is_main() else (lambda *args, **kwargs: None)


def finish_metrics(result: dict, out: Path, echo) -> None:
    from edmkit.files import write_json
    from edmkit.metrics.evaluate import format_results

    if dist.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result)
    for line in format_results(result):
        echo(line)
    echo(f"wrote {out}")


@main.group("metrics")
def metrics_group() -> None:
    """Evaluate: FID, KID, precision/recall against reference statistics; memorization; linear probe.

    \b
    The standard detector is the FID Inception network (inception-2015-12-05.pt), looked up in
    $EDMKIT_CACHE or ~/.cache/edmkit and downloaded there on first use when the network allows.
    Examples:
      edmkit metrics ref --data cifar-10-python.tar.gz --out refs/cifar10.npz
      edmkit metrics gen --checkpoint runs/cifar10 --ref refs/cifar10.npz --n 50000 --repeats 3
      edmkit metrics folder --images samples/ --ref refs/cifar10.npz
      edmkit metrics video real.npz samples.npz --detector i3d_torchscript.pt   (FVD / KVD of clips)
      edmkit metrics probe --checkpoint runs/mnist --data mnist5k --sigma 0.5
      edmkit metrics memorization --checkpoint runs/mnist --n 1000 --out pairs.png
      torchrun --nproc_per_node 8 -m edmkit metrics gen --seeds 0-49999 ...   (each rank a slice; torchrun mistakes --n for its own options)
    """


@metrics_group.command("ref")
@click.option("--data", required=True, help='Dataset: "mnist5k" or a path (folder, zip, npz, MNIST idx, CIFAR tarball).')
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Reference file to write, e.g. ref.npz.")
@click.option("--max-features", type=int, default=10_000, show_default=True, help="Raw features kept (a random subset) for KID and precision/recall; 50000 for pr50k3-style numbers.")
@metrics_options
@user_errors
def metrics_ref(data, out, max_features, detector, detector_sha256, batch, device, quiet) -> None:
    """Reference statistics of a dataset: feature mean and covariance over all images, plus raw features."""
    from edmkit.data.dataset import load_dataset
    from edmkit.metrics import evaluate as ev
    from edmkit.metrics import reference as rf
    from edmkit.metrics.detectors import conversion_notice, load_detector

    if max_features < 0:
        raise ValueError("--max-features must be >= 0")
    check_output_target(Path(out))
    dev = dist.init(pick_device(device))
    with writer_lock(out, what="output file", file=True) if dist.is_main() else contextlib.nullcontext():  # one writer at a time
        echo = metrics_echo()
        ds = load_dataset(data)
        det = load_detector(detector or "inception", sha256=detector_sha256, device=dev, log=echo)
        for notice in (det.spec.note, conversion_notice(det.spec, channels=ds.images.shape[1], resolution=ds.images.shape[-1])):
            if notice:
                echo(notice)
        ref = ev.compute_reference(ds.images, detector=det, source=str(data), batch=batch, max_features=max_features, progress=not quiet)
        if ev.dist.is_main():
            rf.save_reference(out, ref)
        echo(f"wrote {out}: {ref.n} images of {ds.name}, {ref.features.shape[1]}-d {ref.detector} features ({len(ref.features)} kept), "
             f"detector sha256 {ref.detector_sha256}")


@metrics_group.command("gen")
@click.option("--checkpoint", required=True, help="A network .safetensors file or a run folder (the network its end-of-training EMA choice kept, else its newest network with the run's sampling EMA).")
@click.option("--ref", "ref_path", required=True, type=click.Path(dir_okay=False), help="Reference file from `edmkit metrics ref`.")
@click.option("--n", "n", type=int, default=None, help="Images per repeat, seeds 0..n-1 (default 50000, as behind published FIDs).")
@click.option("--seeds", default=None, help="Seeds of the first repeat, e.g. 0-49999 (instead of --n); repeat r shifts them by r times their span.")
@click.option("--ema", "ema_std", type=float, default=None, help="With a run folder: EMA sigma_rel of the network to use (0 = raw weights).")
@click.option("--steps", type=int, default=None, help="Sampler steps (Heun: 2*steps-1 network evaluations; default: the run's, else 18).")
@click.option("--sampler", default=None, help="heun, euler, ddim, ddpm, dpmpp-2m, dpmpp-3m (default: the run's sampler, train.sample_sampler; most presets: heun).")
@click.option("--schedule", default=None, help="Noise levels: karras, loglinear, vp (default: the run's).")
@click.option("--churn", "S_churn", type=float, default=None, help="Heun: stochasticity S_churn (default: the run's sampling setting; 0: deterministic).")
@click.option("--eta", type=float, default=None, help="ddim, dpmpp-2m/3m: stochasticity eta (default: the run's; 0: deterministic).")
@click.option("--guidance", type=float, default=1.0, show_default=True, help="Classifier-free guidance weight for class-conditional models (1 = none).")
@click.option("--class", "class_idx", type=int, default=None, help="Class of every image (default: drawn per seed for conditional models); the class kept with --reject-threshold.")
@click.option("--classifier", "classifier_path", default=None, type=click.Path(dir_okay=False), help="Noise-aware classifier file (from edmkit train-classifier) for --classifier-scale / --reject-threshold.")
@click.option("--classifier-scale", type=float, default=0.0, show_default=True, help="Classifier guidance scale s (needs --classifier; --class for unconditional models).")
@click.option("--reject-threshold", type=float, default=None, help="Rejection sampling: score only images the classifier assigns to --class with confidence >= this, in (0, 1] (one process).")
@click.option("--max-tries", type=int, default=None, help="With --reject-threshold: candidates per repeat (default 10 x the images asked for); too few accepted is an error.")
@click.option("--vae", default=None, type=click.Path(exists=True), help="Latent-space networks: their autoencoder (a local diffusers VAE folder or an edmkit autoencoder file) (default: the one the run recorded).")
@score_options
@metrics_options
@user_errors
def metrics_gen(checkpoint, ref_path, n, seeds, ema_std, steps, sampler, schedule, S_churn, eta, guidance, class_idx, classifier_path, classifier_scale, reject_threshold,
                max_tries, vae, repeats, metric_names, out, detector, detector_sha256, batch, device, quiet) -> None:
    """FID, KID and precision/recall of generated images (none written to disk) against a reference.

    \b
    --repeats 3 scores three disjoint seed ranges (0-49999, 50000-99999, 100000-149999 for --n 50000);
    papers commonly report the minimum FID over three. Under torchrun each rank generates a slice.
    With --reject-threshold the n images scored are the first n accepted among --max-tries consecutive
    candidate seeds from the first (repeat r: the next --max-tries seeds); the acceptance rate is reported.
    """
    import time

    from edmkit.checkpoint import find_network, load_network
    from edmkit.latent.encoder import encoder_from_spec
    from edmkit.metrics import evaluate as ev
    from edmkit.metrics import reference as rf
    from edmkit.sampling.generate import describe_sampling, parse_seeds, run_sampling

    names = parse_metrics(metric_names)
    seed_list = parse_seeds(seeds) if seeds else list(range(ev.PUBLISHED_N if n is None else max(n, 0)))
    if n is not None and len(seed_list) != n:
        raise ValueError(f"--n {n} but --seeds {seeds} gives {len(seed_list)} seeds")
    if len(seed_list) < 2 or repeats < 1:
        raise ValueError("need at least 2 images (--n >= 2) and --repeats >= 1")
    if max_tries is not None and reject_threshold is None:
        raise ValueError("--max-tries is for rejection sampling (--reject-threshold)")
    ref = rf.load_reference(ref_path)
    path = find_network(checkpoint, ema_std=ema_std)
    out_path = Path(out) if out else path.with_name(f"{path.stem}-metrics.json")
    check_output_target(out_path)
    dev = dist.init(pick_device(device))
    echo = metrics_echo()
    det = rf.reference_detector(ref, detector, sha256=detector_sha256, device=dev, ref_path=ref_path, log=echo)
    net, meta = load_network(path, device=dev, latent=True)
    c = meta["config"].network
    encoder = encoder_from_spec(meta["encoder"], vae=vae, channels=c.channels).to(dev)  # scores are of decoded images
    if encoder.kind != "pixels" and (classifier_path or reject_threshold is not None):
        raise ValueError("--classifier and --reject-threshold work on pixel-space networks only (this network samples latents)")
    setting = run_sampling(meta["config"], sampler, steps, {k: v for k, v in dict(S_churn=S_churn, eta=eta).items() if v is not None},
                           schedule=schedule)
    echo(f"{path.name}: {meta['nimg']} images, EMA {meta['ema_std']:g}; {repeats} x {len(seed_list)} images, {describe_sampling(setting)}"
         + ("" if encoder.kind == "pixels" else f", decoded by its {encoder.kind}"))
    for line in ev.evaluation_notices(ref, det, n=len(seed_list), resolution=c.resolution * encoder.factor,
                                      channels=encoder.image_channels):
        echo(line)
    clf = load_generate_classifier(classifier_path, c, class_idx=class_idx, scale=classifier_scale, reject_threshold=reject_threshold,
                                   gif=None, device=dev)
    gen_kw = dict(resolution=c.resolution, channels=c.channels, label_dim=c.label_dim, guidance=guidance, **setting,
                  **classifier_generate_kw(clf, c, class_idx=class_idx, scale=classifier_scale))
    rejection = None
    if reject_threshold is not None:
        from edmkit.sampling.rejection import Rejection

        rejection = Rejection(classifier=clf, class_idx=class_idx, threshold=reject_threshold, max_tries=max_tries)
    start = time.monotonic()
    result = ev.evaluate_generator(net, ref=ref, detector=det, seeds=seed_list, repeats=repeats, metrics=names, batch=batch, device=dev,
                                   generate_kw=gen_kw, progress=not quiet, rejection=rejection,
                                   decode=None if encoder.kind == "pixels" else encoder.decode)
    result.update(checkpoint=str(path), nimg=meta["nimg"], ema_std=meta["ema_std"], generate={k: v for k, v in gen_kw.items() if k != "classifier"},
                  time_sec=time.monotonic() - start, **ev.result_info(ref, ref_path, det))
    if clf is not None:
        result.update(classifier=str(classifier_path))
    if rejection is not None:
        from edmkit.sampling.rejection import resolve_max_tries

        result.update(rejection=dict(class_idx=class_idx, threshold=reject_threshold, max_tries=resolve_max_tries(len(seed_list), max_tries)))
    finish_metrics(result, out_path, echo)


@metrics_group.command("folder")
@click.option("--images", "source", required=True, help="Folder of images, or a zip / .npz (e.g. from edmkit generate --out images.npz).")
@click.option("--ref", "ref_path", required=True, type=click.Path(dir_okay=False), help="Reference file from `edmkit metrics ref`.")
@click.option("--n", "n", type=int, default=None, help="Images per repeat, in sorted order (default: all of them / --repeats).")
@click.option("--reconstruct-with", "autoencoder", default=None, type=click.Path(exists=True),
              help="Score the images' reconstructions by this autoencoder (a diffusers VAE folder or an edmkit autoencoder file): "
                   "given the reference's own images, the FID floor of a latent model in its space.")
@click.option("--vae-input", type=click.Choice(["[-1,1]", "[0,1]"]), default="[-1,1]", show_default=True, help="With --reconstruct-with: the pixel range the VAE takes.")
@score_options
@metrics_options
@user_errors
def metrics_folder(source, ref_path, n, autoencoder, vae_input, repeats, metric_names, out, detector, detector_sha256, batch, device, quiet) -> None:
    """FID, KID and precision/recall of a folder of images against a reference (repeat r: images r*n .. (r+1)*n-1).

    \b
    Examples:
      edmkit metrics folder --images samples.npz --ref refs/mnist.npz
      edmkit metrics folder --images mnist5k --ref refs/mnist.npz --reconstruct-with runs/ae/autoencoder.safetensors
    """
    from edmkit.data.dataset import load_dataset
    from edmkit.metrics import evaluate as ev
    from edmkit.metrics import reference as rf

    names = parse_metrics(metric_names)
    if repeats < 1:
        raise ValueError("--repeats must be >= 1")
    ref = rf.load_reference(ref_path)
    src = Path(source)
    out_path = Path(out) if out else src.with_name(f"{src.stem}-metrics.json")
    check_output_target(out_path)
    dev = dist.init(pick_device(device))
    echo = metrics_echo()
    det = rf.reference_detector(ref, detector, sha256=detector_sha256, device=dev, ref_path=ref_path, log=echo)
    images = load_dataset(source).images
    if autoencoder is not None:
        from edmkit.latent.encoder import reconstruct

        images = reconstruct(autoencoder, images, input_range=vae_input, progress=not quiet)
        echo(f"scoring the reconstructions of {len(images)} images by {autoencoder}: the FID floor of a latent model in its space")
    _, channels, resolution, _ = images.shape
    for line in ev.evaluation_notices(ref, det, n=n or len(images) // repeats, resolution=resolution, channels=channels):
        echo(line)
    result = ev.evaluate_images(images, ref=ref, detector=det, n=n, repeats=repeats, metrics=names, batch=batch, progress=not quiet)
    result.update(images=str(source), **ev.result_info(ref, ref_path, det))
    if autoencoder is not None:
        result.update(reconstructed_by=str(autoencoder))
    finish_metrics(result, out_path, echo)


@metrics_group.command("video")
@click.argument("real", type=click.Path(exists=True))
@click.argument("gen", type=click.Path(exists=True))
@click.option("--detector", default="i3d", show_default=True, help="FVD / KVD network: i3d (StyleGAN-V's i3d_torchscript.pt, from $EDMKIT_CACHE or "
              "~/.cache/edmkit, downloaded there when the network allows), a video TorchScript file path, or none (skip FVD).")
@click.option("--detector-sha256", default=None, help="Expected sha256 of the detector file (a mismatch is an error).")
@click.option("--frames", type=int, default=16, show_default=True, help="First frames of each clip scored (the protocol: 16).")
@click.option("--n", "n", type=int, default=None, help="Clips per set (default: min(2048, available)).")
@click.option("--frame-detector", default=None, help="Also per-frame FID / KID with this image detector (inception, dinov2, mnist or a path).")
@click.option("--motion", is_flag=True, help="Also the Moving-MNIST flicker checks (digit mass, blob count, centroid acceleration, digit identity).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Results JSON (default: beside GEN, *-video-metrics.json).")
@click.option("--batch", type=int, default=16, show_default=True, help="Clips per detector call (does not change the results).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def metrics_video(real, gen, detector, detector_sha256, frames, n, frame_detector, motion, out, batch, device, quiet) -> None:
    """FVD and KVD of generated clips GEN against real clips REAL (each an .npz with `videos` [N, T, H, W(, C)], a .gif or a folder of GIFs).

    \b
    The protocol (clips per set, frames per clip, frame size, detector sha256) is printed and saved with the scores.
    Examples:
      edmkit metrics video real.npz samples.npz --detector ~/Downloads/i3d_torchscript.pt
      edmkit metrics video real.npz samples/ --detector none --frame-detector mnist --motion
    """
    from edmkit.files import write_json
    from edmkit.metrics import video as mv
    from edmkit.metrics.detectors import load_detector

    if detector == "none" and frame_detector is None and not motion:
        raise ValueError("--detector none leaves nothing to compute: add --frame-detector and/or --motion")
    gen_path = Path(gen)
    out_path = Path(out) if out else gen_path.with_name(f"{gen_path.stem}-video-metrics.json")
    check_output_target(out_path)
    dev = pick_device(device)
    real_clips, gen_clips = mv.read_videos(real), mv.read_videos(gen)
    click.echo(f"real: {tuple(real_clips.shape)}, generated: {tuple(gen_clips.shape)} (N, C, T, H, W)")
    result: dict = dict(real=str(real), gen=str(gen))
    if detector != "none":
        det = load_detector(detector, sha256=detector_sha256, device=dev, log=click.echo, video=True)
        scores = mv.fvd_kvd(real_clips, gen_clips, detector=det, frames=frames, n=n, batch=batch, progress=not quiet)
        for line in scores.pop("notices"):
            click.echo(line)
        p = scores["protocol"]
        click.echo(f"FVD {scores['fvd']:.2f}, KVD {scores['kvd']:.4f} ± {scores['kvd_std']:.4f} ({p['gen_clips']} vs {p['real_clips']} clips of "
                   f"{p['frames']} frames at {p['size']}, {p['detector']} sha256 {p['detector_sha256']})")
        result.update(scores)
    if frame_detector is not None:
        fdet = load_detector(frame_detector, device=dev, log=click.echo)
        scores = mv.frame_fid_kid(real_clips, gen_clips, detector=fdet, batch=batch * 4, progress=not quiet)
        click.echo(f"per-frame FID {scores['frame_fid']:.2f}, KID {scores['frame_kid']:.4f} ({scores['gen_frames']} vs {scores['real_frames']} frames, "
                   f"{scores['frame_detector']})")
        result.update(scores)
    if motion:
        classifier = load_detector("mnist", device=dev)
        checks = {name: mv.motion_checks(clips, classifier=classifier) for name, clips in (("real", real_clips), ("gen", gen_clips))}
        for name, c in checks.items():
            failed = mv.flicker_failures(c)
            click.echo(f"motion {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in c.items())
                       + (f"; flicker: {', '.join(failed)} above {', '.join(str(mv.FLICKER_LIMITS[k]) for k in failed)}" if failed else "; no flicker"))
            checks[name] = dict(c, flicker=failed)
        result.update(motion=checks)
    write_json(out_path, result)
    click.echo(f"wrote {out_path}")


@metrics_group.command("memorization")
@click.option("--checkpoint", default=None, help="Generate the samples with this network file or run folder (seeds 0..n-1) ...")
@click.option("--images", "source", default=None, help="... or read them from a folder / zip / .npz (the first n).")
@click.option("--data", default=None, help="Training set to search (default: the checkpoint's).")
@click.option("--n", "n", type=int, default=1000, show_default=True, help="Samples to check.")
@click.option("--space", type=click.Choice(["pixels", "features"]), default="pixels", show_default=True, help="l2 distance of pixels, or cosine distance of detector features.")
@click.option("--top", type=int, default=16, show_default=True, help="Most copy-like pairs drawn in the PNG.")
@click.option("--steps", type=int, default=18, show_default=True, help="Sampler steps (with --checkpoint).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG of (sample | nearest training image) pairs; results JSON beside it.")
@metrics_options
@user_errors
def metrics_memorization(checkpoint, source, data, n, space, top, steps, out, detector, detector_sha256, batch, device, quiet) -> None:
    """Near-copies of training images: flagged when the nearest training image is closer than 1/3 of the next neighbours' mean distance."""
    from edmkit.checkpoint import find_network, load_network
    from edmkit.data.dataset import load_dataset
    from edmkit.data.images import float_to_images
    from edmkit.files import write_json
    from edmkit.metrics import evaluate as ev
    from edmkit.metrics.detectors import load_detector
    from edmkit.metrics.memorization import save_pairs
    from edmkit.sampling.generate import generate_images

    if (checkpoint is None) == (source is None):
        raise ValueError("give --checkpoint (generate samples) or --images (read them), not both or neither")
    if n < 1 or top < 1:
        raise ValueError("--n and --top must be >= 1")
    out = Path(out)
    check_output_target(out)
    dev = pick_device(device)
    if checkpoint:
        net, meta = load_network(find_network(checkpoint), device=dev)
        c, data = meta["config"].network, data or meta["config"].train.data
        samples = float_to_images(generate_images(net, seeds=range(n), resolution=c.resolution, channels=c.channels, label_dim=c.label_dim,
                                                  steps=steps, batch=batch, device=dev, progress=not quiet))
    else:
        samples = load_dataset(source).images
        if len(samples) < n:
            raise ValueError(f"--n {n} but {source} has only {len(samples)} images")
        samples = samples[:n]
    if data is None:
        raise ValueError("--images needs --data (the training set to search)")
    train = load_dataset(data)
    if train.images.shape[1:] != samples.shape[1:]:
        click.echo(f"note: training images {tuple(train.images.shape[1:])} converted to the samples' {tuple(samples.shape[1:])} (C, H, W)")
        train = load_dataset(data, resolution=samples.shape[-1], channels=samples.shape[1])
    det = load_detector(detector or "inception", sha256=detector_sha256, device=dev, log=click.echo) if space == "features" else None
    mem = ev.memorization_check(samples, train.images, space=space, detector=det, batch=batch, top=top, device=dev)
    save_pairs(out, samples, train.images, mem.pairs())
    write_json(out.with_suffix(".json"), dict(rate=mem.rate, flagged=int(mem.flagged.sum()), n=len(samples), space=space, data=str(data),
                                              pairs=[dict(sample=i, train=j, distance=float(mem.distance[i]), ratio=float(mem.ratio[i])) for i, j in mem.pairs()]))
    click.echo(f"near-copies: {int(mem.flagged.sum())} of {len(samples)} ({mem.rate:.2%}); most copy-like pairs in {out}, details in {out.with_suffix('.json')}")


@metrics_group.command("probe")
@click.option("--checkpoint", required=True, help="A network .safetensors file or a run folder (the network its end-of-training EMA choice kept, else its newest network with the run's sampling EMA).")
@click.option("--data", required=True, help='Labelled dataset: "mnist5k" or a path (converted to the network\'s resolution and channels).')
@click.option("--sigma", type=float, default=0.5, show_default=True, help="Noise level the features are taken at.")
@click.option("--block", default=None, help="U-Net block whose pooled output is probed, e.g. dec.7x7_in0 (default: the first decoder block).")
@click.option("--test-fraction", type=float, default=0.2, show_default=True, help="Fraction of the images held out for the test accuracy.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/test split and the fixed noise.")
@click.option("--n", "n", type=int, default=None, help="Use only n images, a random subset drawn with --seed (default: all).")
@click.option("--ema", "ema_std", type=float, default=None, help="With a run folder: EMA sigma_rel of the network to use (0 = raw weights).")
@click.option("--batch", type=int, default=256, show_default=True, help="Images per forward pass (does not change the result).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@user_errors
def metrics_probe(checkpoint, data, sigma, block, test_fraction, seed, n, ema_std, batch, device) -> None:
    """Linear probe: test accuracy of a ridge classifier on frozen, pooled denoiser features at a fixed sigma.

    \b
    Example:
      edmkit metrics probe --checkpoint runs/mnist --data mnist5k --sigma 0.5 --block dec.7x7_in0
    """
    from edmkit.checkpoint import find_network, load_network
    from edmkit.data.dataset import load_dataset
    from edmkit.metrics.probe import linear_probe, resolve_block

    dev = pick_device(device)
    net, meta = load_network(find_network(checkpoint, ema_std=ema_std), device=dev)
    resolve_block(net, block)  # an unknown block fails before the dataset is read
    c = meta["config"].network
    ds = load_dataset(data, resolution=c.resolution, channels=c.channels)
    r = linear_probe(net, ds, block=block, sigma=sigma, test_fraction=test_fraction, seed=seed, max_images=n, label_dim=c.label_dim, batch=batch)
    click.echo(f"linear probe {r.block} at sigma {r.sigma:g} ({r.feature_dim} features): test accuracy {r.test_accuracy:.2%} "
               f"on {r.n_test} images (train {r.train_accuracy:.2%} on {r.n_train}; chance {r.chance:.2%})")
