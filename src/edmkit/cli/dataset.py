"""``edmkit dataset``: convert a source to the checked zip format, or summarize one (logic in ``edmkit.data.convert``)."""

from __future__ import annotations

import click

from edmkit.cli._common import main, parse_int_list, user_errors
from edmkit.files import writer_lock


@main.group("dataset")
def dataset_group() -> None:
    """Prepare datasets: convert any source to the checked zip format, or summarize one.

    \b
      edmkit dataset convert cifar-10-python.tar.gz cifar-cat.zip --resolution 32 --classes 3
      edmkit dataset info cifar-cat.zip
    """


@dataset_group.command("convert")
@click.argument("source", metavar="SRC")
@click.argument("dest", metavar="DEST.zip|DEST.npz", type=click.Path(dir_okay=False))
@click.option("--resolution", type=int, default=None, help="Square image size to resize to (default: native, must be uniform).")
@click.option("--center-crop", is_flag=True, help="Crop non-square images to their central square first (else they are an error).")
@click.option("--classes", default=None, help="Keep only these class indices, e.g. 1,3 (relabelled 0, 1, ... in this order).")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="Convert to grayscale (1) or RGB (3) (default: native).")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable files in folders / zips (reported with a count) instead of failing.")
@click.option("--vae", default=None, type=click.Path(exists=True), help="Encode to latents (DEST.npz) with this autoencoder: a local diffusers VAE folder, or an edmkit autoencoder file (edmkit train-autoencoder).")
@click.option("--vae-input", type=click.Choice(["[-1,1]", "[0,1]"]), default="[-1,1]", show_default=True, help="With --vae: the pixel range the VAE takes (EDM2 feeds SD's VAE [0,1]).")
@click.option("--sigma-data", type=float, default=0.5, show_default=True, help="With --vae: per-channel std of the standardised latents (the network's sigma_data).")
@click.option("--batch", type=int, default=8, show_default=True, help="With --vae: images per VAE call.")
@click.option("--xflip", is_flag=True, help="With --vae: also encode the mirrored images; training takes either at random (flip augmentation).")
@user_errors
def dataset_convert(source, dest, resolution, center_crop, classes, channels, skip_bad, vae, vae_input, sigma_data, batch, xflip) -> None:
    """Convert SRC (folder, zip, npz, MNIST idx, CIFAR tarball, mnist5k) to DEST.zip: PNGs + dataset.json labels.

    The archive is read back and checked; a preview grid DEST-preview.png is written beside it. With --vae, DEST.npz
    holds latents instead: the VAE's posterior mean and std of every image, standardised per channel to std
    --sigma-data with constants measured on this data, and the encoder's spec (folder, weights sha256, constants).
    `edmkit train --data DEST.npz` then trains in that latent space (the VAE never runs in training) and every
    network file records the encoder, so `edmkit generate` decodes.

    \b
    Examples:
      edmkit dataset convert cifar-10-python.tar.gz cifar-cat.zip --resolution 32 --classes 3
      edmkit dataset convert mnist5k digits-latents.npz --channels 3 --resolution 32 --vae my-vae/
      edmkit train --data digits-latents.npz --preset tiny --run runs/latent
    """
    import warnings

    if xflip and vae is None:
        raise ValueError("--xflip encodes mirrored images for a latent dataset: it needs --vae")
    if vae is not None:
        from edmkit.latent.convert import convert_to_latents

        with writer_lock(dest, what="output file", file=True):
            info = convert_to_latents(source, dest, vae=vae, resolution=resolution, channels=None if channels is None else int(channels),
                                      classes=parse_int_list(classes, name="--classes"), center_crop=center_crop, skip_bad=skip_bad,
                                      input_range=vae_input, final_std=sigma_data, batch=batch, xflip=xflip, progress=True)
        click.echo(info)
        return

    from edmkit.data.convert import convert_dataset, format_summary

    with writer_lock(dest, what="output file", file=True), warnings.catch_warnings(record=True) as caught:  # one writer at a time
        warnings.simplefilter("always")
        info = convert_dataset(source, dest, resolution=resolution, channels=None if channels is None else int(channels),
                               classes=parse_int_list(classes, name="--classes"), center_crop=center_crop, skip_bad=skip_bad)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    click.echo(format_summary(info))
    click.echo(f"wrote {info['dest']} (checked); preview: {info['preview']}")


@dataset_group.command("info")
@click.argument("source", metavar="SRC")
@user_errors
def dataset_info(source) -> None:
    """Summarize SRC: image count, resolution, channels, classes (with counts) and the class names by index."""
    from edmkit.data.convert import dataset_summary, format_summary
    from edmkit.data.dataset import load_dataset

    data = load_dataset(source)
    click.echo(format_summary(dataset_summary(data)))
    if data.class_names and data.class_names != tuple(str(c) for c in range(data.num_classes)):
        # every class, index first: the indices are what --classes takes
        click.echo("names:      " + ", ".join(f"{c} {name}" for c, name in enumerate(data.class_names)))
