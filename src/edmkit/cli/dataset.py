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
@click.argument("dest", metavar="DEST.zip", type=click.Path(dir_okay=False))
@click.option("--resolution", type=int, default=None, help="Square image size to resize to (default: native, must be uniform).")
@click.option("--center-crop", is_flag=True, help="Crop non-square images to their central square first (else they are an error).")
@click.option("--classes", default=None, help="Keep only these class indices, e.g. 1,3 (relabelled 0, 1, ... in this order).")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="Convert to grayscale (1) or RGB (3) (default: native).")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable files in folders / zips (reported with a count) instead of failing.")
@user_errors
def dataset_convert(source, dest, resolution, center_crop, classes, channels, skip_bad) -> None:
    """Convert SRC (folder, zip, npz, MNIST idx, CIFAR tarball, mnist5k) to DEST.zip: PNGs + dataset.json labels.

    The archive is read back and checked; a preview grid DEST-preview.png is written beside it.
    """
    import warnings

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
