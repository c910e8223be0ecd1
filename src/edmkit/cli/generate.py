"""``edmkit generate`` (with its classifier guidance and rejection sampling) and ``edmkit restore``."""

from __future__ import annotations

import functools
from pathlib import Path

import click
import torch

from edmkit.cli._common import check_output_target, main, pick_device, user_errors


@main.command()
@click.option("--checkpoint", required=True, help="A network .safetensors file or a run folder (the network its end-of-training EMA choice kept, else its newest network with the run's sampling EMA).")
@click.option("--out", required=True, type=click.Path(), help="grid.png (one grid), images.npz (uint8 array) or a folder (one PNG per seed). Video networks: clips.gif (a grid of playing clips), clips.npz ('videos' uint8 [N, T, H, W(, C)]) or strip.png (a row of frames per clip).")
@click.option("--frames", type=int, default=None, help="Video networks: frames per clip (default: the length it was trained on; any length works).")
@click.option("--n", "n", type=int, default=None, help="Number of images (seeds 0..n-1). Default 64.")
@click.option("--seeds", default=None, help="Explicit seeds, e.g. 0-63 or 1,5,9 (instead of --n).")
@click.option("--steps", type=int, default=None, help="Sampler steps (Heun: 2*steps-1 network evaluations; default: the run's, else 18).")
@click.option("--sampler", default=None, help="heun, euler, ddim, ddpm, dpmpp-2m, dpmpp-3m (default: the run's sampler, train.sample_sampler; most presets: heun).")
@click.option("--schedule", default=None, help="Noise levels: karras (EDM rho=7), loglinear, vp (DDPM timesteps) (default: the run's; most presets: karras).")
@click.option("--churn", "S_churn", type=float, default=None, help="Heun: stochasticity S_churn (EDM Alg. 2), e.g. 40.")
@click.option("--s-tmin", "S_tmin", type=float, default=None, help="Heun: churn only for sigma >= S_tmin.")
@click.option("--s-tmax", "S_tmax", type=float, default=None, help="Heun: churn only for sigma <= S_tmax.")
@click.option("--s-noise", "S_noise", type=float, default=None, help="Heun: scale of the churn noise S_noise, e.g. 1.003; dpmpp with --eta: of its fresh noise.")
@click.option("--eta", type=float, default=None, help="DDIM and dpmpp-2m/3m: stochasticity eta (0 deterministic; DDIM 1 = DDPM, dpmpp 1 = the SDE solver).")
@click.option("--class", "class_idx", type=int, default=None, help="Class label for conditional models (default: drawn per seed).")
@click.option("--context", "context_path", type=click.Path(dir_okay=False, exists=True), default=None, help="Cross-attention models: context tokens, a .npy (or an .npz's 'context' array) of [L, D] for every image or [N, L, D] one per seed; with --guidance, CFG against the null context.")
@click.option("--guidance", type=float, default=None, help="Guidance weight w (1 = none): CFG with the model's unconditional branch, or autoguidance with --guide-checkpoint.")
@click.option("--guide-checkpoint", default=None, help="Autoguidance: a weaker network file or run folder of the same images and classes.")
@click.option("--guide-ema", type=float, default=None, help="With a guide run folder: EMA sigma_rel of its network (0 = raw weights).")
@click.option("--interval", default=None, help="Guidance interval: guide only for sigma in (LO, HI], e.g. 0.3,5.")
@click.option("--oscillate", default=None, help="Oscillating guidance HIGH,LOW: alternate the two weights per step (instead of --guidance).")
@click.option("--oscillate-warmup", type=int, default=0, show_default=True, help="Steps at the HIGH weight before oscillating.")
@click.option("--threshold", type=float, default=None, help="Dynamic thresholding percentile of the denoised image, e.g. 0.995.")
@click.option("--gif", type=click.Path(dir_okay=False), default=None, help="Also write the reverse process (noisy state | denoised) of the first seeds as an animated GIF (clips: a strip of their frames).")
@click.option("--gif-n", type=int, default=4, show_default=True, help="Number of seeds shown in the --gif.")
@click.option("--ema", "ema_std", type=float, default=None, help="With a run folder: EMA sigma_rel of the network to use (0 = raw weights).")
@click.option("--classifier", "classifier_path", default=None, type=click.Path(dir_okay=False), help="Noise-aware classifier file (from edmkit train-classifier) for --classifier-scale / --reject-threshold.")
@click.option("--classifier-scale", type=float, default=0.0, show_default=True, help="Classifier guidance scale s: D + s*sigma^2*grad log p(class | x, sigma) (needs --classifier; --class for unconditional models).")
@click.option("--reject-threshold", type=float, default=None, help="Rejection sampling: keep only images the classifier assigns to --class with confidence >= this, in (0, 1].")
@click.option("--max-tries", type=int, default=None, help="With --reject-threshold: at most this many candidates (default 10 x the images asked for).")
@click.option("--batch", type=int, default=64, show_default=True, help="Images per batch (does not change the images).")
@click.option("--vae", default=None, type=click.Path(exists=True), help="Latent-space networks: their autoencoder (a local diffusers VAE folder or an edmkit autoencoder file) (default: the folder the network file records).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@user_errors
def generate(checkpoint, out, n, seeds, steps, sampler, schedule, S_churn, S_tmin, S_tmax, S_noise, eta, class_idx, guidance,
             guide_checkpoint, guide_ema, interval, oscillate, oscillate_warmup, threshold, gif, gif_n, ema_std,
             classifier_path, classifier_scale, reject_threshold, max_tries, batch, vae, device, context_path, frames) -> None:
    """Sample images; image k depends only on its seed, whatever the batch size.

    \b
    Examples:
      edmkit generate --checkpoint runs/mnist --out grid.png --sampler heun --steps 18 --churn 10
      edmkit generate --checkpoint runs/cond --out grid.png --class 3 --guidance 2 --interval 0.3,5
      edmkit generate --checkpoint runs/big --guide-checkpoint runs/small --guidance 1.5 --out grid.png --gif reverse.gif
      edmkit generate --checkpoint runs/mnist --classifier clf.safetensors --class 7 --classifier-scale 2 --reject-threshold 0.9 --out grid.png
      edmkit generate --checkpoint img512-xs.safetensors --vae sd-vae-ft-mse/ --class 88 --out grid.png   # latent space
      edmkit generate --checkpoint runs/xattn --context tokens.npy --guidance 2 --out grid.png   # cross-attention context
      edmkit generate --checkpoint runs/movingmnist --out clips.gif --n 16 --frames 12   # a video network: a GIF of clips
    """
    from edmkit.checkpoint import find_network, load_network
    from edmkit.latent.encoder import encoder_from_spec
    from edmkit.report import ReverseProcessRecorder
    from edmkit.sampling.generate import (
        describe_sampling,
        generate_images,
        load_context,
        load_guide,
        parse_pair,
        parse_seeds,
        run_sampling,
    )

    if n is not None and seeds is not None:
        raise ValueError("give --n or --seeds, not both")
    seed_list = parse_seeds(seeds) if seeds else list(range(64 if n is None else n))
    if n is not None and n < 1:
        raise ValueError("--n must be >= 1")
    if gif_n < 1:
        raise ValueError("--gif-n must be >= 1")
    guidance_kw = dict(guidance=1.0 if guidance is None else guidance, oscillate_warmup=oscillate_warmup, threshold=threshold,
                       interval=parse_pair(interval, name="--interval") if interval else None,
                       oscillate=parse_pair(oscillate, name="--oscillate") if oscillate else None)
    if guidance is not None and oscillate:
        raise ValueError("give --guidance or --oscillate, not both")
    sampler_kw = {k: v for k, v in dict(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise, eta=eta).items() if v is not None}
    for target in [Path(out)] + ([Path(gif)] if gif else []):
        check_output_target(target)
    dev = pick_device(device)
    path = find_network(checkpoint, ema_std=ema_std)
    net, meta = load_network(path, device=dev, latent=True)
    cfg = meta["config"]
    c = cfg.network
    encoder = encoder_from_spec(meta["encoder"], vae=vae, channels=c.channels).to(dev)
    space = "" if encoder.kind == "pixels" else f" latents ({encoder.kind}, {encoder.factor}x downsampling)"
    click.echo(f"{path.name}: {meta['nimg']} images, EMA {meta['ema_std']:g}, {c.resolution}x{c.resolution}x{c.channels}{space}")
    frames = check_video_options(c, frames=frames, out=Path(out), gif=gif, classifier=classifier_path)
    setting = run_sampling(cfg, sampler, steps, sampler_kw, schedule=schedule)
    if setting != dict(sampler="heun", steps=18, schedule="karras", **sampler_kw):  # say where a setting nobody typed comes from
        click.echo(f"sampling: {describe_sampling(setting)} (the run's setting where not given; --sampler/--steps/--schedule/--churn/--eta change it)")
    if encoder.kind != "pixels" and (gif or classifier_path):
        raise ValueError("--gif and --classifier work on pixel-space networks only (this network samples latents)")
    guide = load_guide(guide_checkpoint, like=c, ema_std=guide_ema, device=dev, encoder=meta["encoder"]) if guide_checkpoint else None
    if guide is None and (guidance not in (None, 1) or oscillate) and c.label_dim and cfg.loss.p_uncond == 0:
        click.echo("warning: this model was trained without label dropout (p_uncond = 0): its unconditional branch is untrained", err=True)
    clf = load_generate_classifier(classifier_path, c, class_idx=class_idx, scale=classifier_scale, reject_threshold=reject_threshold,
                                   gif=gif, device=dev)
    if clf is not None:
        guidance_kw.update(classifier_generate_kw(clf, c, class_idx=class_idx, scale=classifier_scale))
        class_idx = guidance_kw.pop("class_idx")
    context = load_context(context_path, num_images=len(seed_list), context_dim=c.context_dim) if context_path else None
    if context is not None and context.ndim == 3 and reject_threshold is not None:
        raise ValueError("--reject-threshold draws seeds beyond --n/--seeds: give one [L, D] --context for all images")
    recorder = ReverseProcessRecorder(num=min(gif_n, len(seed_list)), sigma_data=c.sigma_data) if gif else None
    sample = functools.partial(generate_images, net, resolution=c.resolution, channels=c.channels, label_dim=c.label_dim,
                               class_idx=class_idx, guide=guide, batch=batch,
                               device=dev, context=context, frames=frames, **guidance_kw, **setting)
    if reject_threshold is not None:
        seed_list, x = rejection_generate(sample, clf, seed_list=seed_list, class_idx=guidance_kw["classifier_class"],
                                          threshold=reject_threshold, batch=batch, max_tries=max_tries)
    else:
        x = sample(seeds=seed_list, progress=True, callback=recorder)
    if frames:
        write_clips(x, Path(out), seeds=seed_list)
    else:
        write_images(encoder.decode(x), Path(out), seeds=seed_list)
    click.echo(f"wrote {len(seed_list)} {f'clips of {frames} frames' if frames else 'images'} to {out}")
    if recorder is not None:
        recorder.save(gif)
        click.echo(f"wrote the reverse process of {recorder.num} images ({len(recorder.steps)} steps) to {gif}")


def check_video_options(network, *, frames, out: Path, gif, classifier) -> int:
    """Frames per clip of a video network's samples (0: an image network), after checking the options that take images."""
    if not network.frames:
        if frames is not None:
            raise ValueError("--frames is for video networks; this one makes images")
        return 0
    if frames is not None and frames < 1:
        raise ValueError(f"--frames must be >= 1, got {frames}")
    if out.suffix.lower() not in (".gif", ".npz", ".png"):
        raise ValueError(f"a video network writes clips: --out clips.gif, clips.npz or strip.png, not {out.name!r}")
    if classifier:
        raise ValueError("--classifier works on image networks only (this one makes clips)")
    return frames or network.frames


def write_clips(x: torch.Tensor, out: Path, *, seeds: list[int]) -> None:
    """Clips [N, C, T, H, W]: a GIF grid, an npz of ``videos`` uint8 (and ``seeds``), or a PNG with a row of frames per clip."""
    import numpy as np

    from edmkit.data.videos import save_clip_grid_gif, save_clip_npz, save_clip_strip

    {".gif": save_clip_grid_gif, ".png": save_clip_strip}.get(out.suffix.lower(), functools.partial(save_clip_npz, seeds=np.asarray(seeds)))(x, out)


def load_generate_classifier(path, model, *, class_idx, scale, reject_threshold, gif, device):
    """The classifier of ``generate`` (or None), checked against the model and the classifier options."""
    from edmkit.checkpoint import check_classifier, load_classifier
    from edmkit.sampling.rejection import check_threshold

    if scale < 0:
        raise ValueError(f"--classifier-scale must be >= 0, got {scale}")
    if reject_threshold is not None:
        check_threshold(reject_threshold)
        if class_idx is None:
            raise ValueError("--reject-threshold needs --class (the class to keep)")
        if gif:
            raise ValueError("--gif is not available with --reject-threshold")
    if path is None:
        if scale > 0 or reject_threshold is not None:
            raise ValueError("--classifier-scale and --reject-threshold need --classifier")
        return None
    if scale > 0 and class_idx is None and not model.label_dim:
        raise ValueError("classifier guidance of an unconditional model needs --class")
    clf, meta = load_classifier(path, device=device)
    check_classifier(model, meta["config"].network, class_idx=class_idx)
    return clf


def classifier_generate_kw(clf, model, *, class_idx, scale) -> dict:
    """``generate_images`` options for a classifier (None: just ``class_idx``): the class is the classifier's, and an
    unconditional model takes none itself."""
    if clf is None:
        return {} if class_idx is None else dict(class_idx=class_idx)
    return dict(classifier=clf, classifier_scale=scale, classifier_class=class_idx, class_idx=class_idx if model.label_dim else None)


def rejection_generate(sample, clf, *, seed_list, class_idx, threshold, batch, max_tries):
    """Rejection sampling for ``generate``: consecutive seeds from the first asked for, until len(seed_list) are accepted."""
    from edmkit.sampling.rejection import candidate_seeds, rejection_sample

    n = len(seed_list)
    candidates = candidate_seeds(seed_list, max_tries=max_tries)
    max_tries = len(candidates)
    result = rejection_sample(lambda s: sample(seeds=s), clf, n=n, class_idx=class_idx, threshold=threshold,
                              seeds=candidates, batch=batch, max_tries=max_tries)
    click.echo(f"rejection sampling: accepted {result.accepted} of {result.tried} candidates (rate {result.rate:.1%})")
    if not result.seeds:
        raise ValueError(f"no image of class {class_idx} reached confidence {threshold} in {result.tried} candidates; "
                         "lower --reject-threshold or raise --max-tries")
    if len(result.seeds) < n:
        click.echo(f"warning: only {len(result.seeds)} of {n} images accepted within --max-tries {max_tries}; "
                   "lower --reject-threshold or raise --max-tries", err=True)
    return result.seeds, result.images


def write_images(x: torch.Tensor, out: Path, *, seeds: list[int]) -> None:
    from edmkit.data.images import float_to_images, save_image_grid, save_images

    if out.suffix.lower() == ".png":
        save_image_grid(x, out)
    elif out.suffix.lower() == ".npz":
        import numpy as np

        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, images=float_to_images(x).numpy(), seeds=np.asarray(seeds))
    elif out.suffix:
        raise ValueError(f"unknown output type {out.suffix!r}: use .png, .npz or a folder name")
    else:
        save_images(x, out)


@main.command()
@click.option("--checkpoint", required=True, help="A network .safetensors file or a run folder (the network its end-of-training EMA choice kept, else its newest network with the run's sampling EMA).")
@click.option("--task", required=True, type=click.Choice(["inpaint", "sr"]), help="inpaint (needs --mask) or sr (super-resolution by --scale).")
@click.option("--image", required=True, type=click.Path(exists=True, dir_okay=False), help="inpaint: the image (model size); sr: the low-res image (model size / scale).")
@click.option("--mask", type=click.Path(exists=True, dir_okay=False), default=None, help="inpaint: PNG of the image's size, white (nonzero) = known pixel; 1 channel or the image's.")
@click.option("--scale", type=int, default=2, show_default=True, help="sr: upsampling factor (must divide the model's image size).")
@click.option("--method", default=None, help="inpaint: replace (default), dps or mcg; sr: ilvr (default), ccdf, dps, mcg, or cascade (a model trained with --task sr). mcg: replace / ilvr plus the manifold-constrained gradient (step --zeta).")
@click.option("--sr-aug", "sr_aug", type=float, default=None, help="cascade: fixed noise level of the conditioning image (default: the model's train.sr_aug_sample).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Result PNG; the side-by-side (input | result | truth) goes to <out>-compare.png.")
@click.option("--truth", type=click.Path(exists=True, dir_okay=False), default=None, help="Ground-truth image to show in the side-by-side.")
@click.option("--steps", type=int, default=18, show_default=True, help="Sampler steps (ccdf: only those below --sigma-start are taken).")
@click.option("--sampler", default="heun", show_default=True, help="heun, euler, ddim, ddpm, dpmpp-2m, dpmpp-3m.")
@click.option("--schedule", default="karras", show_default=True, help="Noise levels: karras, loglinear, vp.")
@click.option("--resample", type=int, default=1, show_default=True, help="RePaint resampling: repeats per step (replace, ilvr, ccdf).")
@click.option("--zeta", type=float, default=1.0, show_default=True, help="dps: step size of the reconstruction-guidance gradient; mcg: its gradient step alpha (0 = plain replace / ilvr).")
@click.option("--sigma-start", type=float, default=1.0, show_default=True, help="ccdf: noise level the reverse process starts from.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed.")
@click.option("--class", "class_idx", type=int, default=None, help="Class label for conditional models (default: drawn from the seed).")
@click.option("--ema", "ema_std", type=float, default=None, help="With a run folder: EMA sigma_rel of the network to use.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@user_errors
def restore(checkpoint, task, image, mask, scale, method, sr_aug, out, truth, steps, sampler, schedule, resample, zeta, sigma_start, seed, class_idx, ema_std, device) -> None:
    """Inpaint or super-resolve an image zero-shot with any trained model and sampler.

    \b
    Examples:
      edmkit restore --checkpoint runs/mnist --task inpaint --image in.png --mask mask.png --out out.png --resample 5
      edmkit restore --checkpoint runs/mnist --task sr --scale 2 --image low.png --method ccdf --out out.png
      edmkit restore --checkpoint runs/mnist --task inpaint --image in.png --mask mask.png --method mcg --zeta 0.5 --out out.png
    """
    from edmkit.checkpoint import find_network, load_network
    from edmkit.data.images import images_to_float, read_image_file, save_image_grid, write_image_file
    from edmkit.diffusion.inverse import restore as restore_images
    from edmkit.diffusion.operators import check_mask, check_scale, upsample
    from edmkit.diffusion.samplers import SeededRandn, get_sampler
    from edmkit.sampling.generate import class_labels, sampling_sigmas

    if (task == "inpaint") != (mask is not None):
        raise ValueError("--task inpaint needs --mask" if mask is None else "--mask is only for --task inpaint")
    out = Path(out)
    check_output_target(out)
    sample = get_sampler(sampler)
    dev = pick_device(device)
    net, meta = load_network(find_network(checkpoint, ema_std=ema_std), device=dev)
    c = meta["config"].network
    if task == "sr":
        check_scale(c.resolution, scale)
    y = images_to_float(read_image_file(image, channels=c.channels)).to(dev)
    m = read_image_file(mask).to(dev) if task == "inpaint" else None
    rnd = SeededRandn([seed], device=dev)
    labels = class_labels([seed], label_dim=c.label_dim, class_idx=class_idx, device=dev) if c.label_dim else None
    if method == "cascade":  # a trained SR stage (edmkit.sampling.cascade), not a zero-shot method
        from edmkit.sampling.cascade import super_resolve

        if task != "sr" or scale != meta["config"].train.sr_scale:
            raise ValueError(f"--method cascade is for --task sr with the model's --scale {meta['config'].train.sr_scale}")
        x = super_resolve(net, y, cfg=meta["config"], sample=sample, sigmas=sampling_sigmas(schedule, steps, device=dev),
                          noise=rnd.randn([c.channels, c.resolution, c.resolution]), sigma_aug=sr_aug, labels=labels, randn=rnd)
    else:
        x = restore_images(net, y, task=task, sample=sample, sigmas=sampling_sigmas(schedule, steps, device=dev), noise=rnd.randn([c.channels, c.resolution, c.resolution]),
                           mask=m, scale=scale, method=method, labels=labels, randn=rnd, resample=resample, zeta=zeta, sigma_start=sigma_start)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_image_file(x, out)
    shown = [check_mask(m, y) * y if task == "inpaint" else upsample(y, scale=scale), x]
    if truth:
        t = images_to_float(read_image_file(truth, channels=c.channels)).to(dev)
        if t.shape != x.shape:
            raise ValueError(f"--truth is {t.shape[-1]}x{t.shape[-2]}; the result is {x.shape[-1]}x{x.shape[-2]}")
        shown.append(t)
    compare = out.with_name(f"{out.stem}-compare.png")
    save_image_grid(torch.cat(shown), compare, nrow=len(shown))
    click.echo(f"wrote {out} and {compare} (input | result{' | truth' if truth else ''})")
