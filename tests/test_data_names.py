"""Class names: read back from dataset.json and class folders, kept through --classes, shown by `dataset info`;
and the `--sigma-sampling` training flag."""

import io
import json
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edmkit.cli import main
from edmkit.data.cifar import CIFAR10_CLASS_NAMES
from edmkit.data.convert import convert_dataset
from edmkit.data.dataset import load_dataset
from edmkit.presets import get_preset, load_config_file, resolve_config

NAMES = ("cat", "dog", "zebra")  # sorted, so folder order = index order


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _class_folder(root, names=NAMES, per_class=2):
    """root/<name>/<i>.png; every image of class c has the pixel value 10 * c + i, so labels can be checked."""
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(_png(10 * c + i))
    return root


def _class_of_pixels(data):
    """The class each image was written for (pixel value // 10)."""
    return data.images[:, 0, 0, 0].long() // 10


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_names_from_class_folders(tmp_path):
    data = load_dataset(_class_folder(tmp_path / "d"))
    assert data.class_names == NAMES and data.num_classes == 3
    assert torch.equal(data.labels, _class_of_pixels(data))


def test_names_round_trip_through_converted_zip(tmp_path):
    convert_dataset(_class_folder(tmp_path / "d"), tmp_path / "out.zip")
    with zipfile.ZipFile(tmp_path / "out.zip") as archive:
        assert json.loads(archive.read("dataset.json"))["class_names"] == list(NAMES)
    back = load_dataset(tmp_path / "out.zip")  # no class folders in the zip: names come from dataset.json only
    assert back.class_names == NAMES
    assert torch.equal(back.labels, _class_of_pixels(back))


def test_names_from_dataset_json_in_folder(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    labels = [2, 0, 1, 2]
    for i, c in enumerate(labels):
        (root / f"{i}.png").write_bytes(_png(10 * c))
    names = ["plane", "car", "bird", "unused"]  # the names fix the class count: class 3 has no images
    (root / "dataset.json").write_text(json.dumps({"labels": [[f"{i}.png", c] for i, c in enumerate(labels)], "class_names": names}))
    data = load_dataset(root)
    assert data.class_names == tuple(names) and data.num_classes == 4
    assert data.labels.tolist() == labels


def test_dataset_json_without_names_has_none(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    (root / "0.png").write_bytes(_png(0))
    (root / "1.png").write_bytes(_png(10))
    (root / "dataset.json").write_text(json.dumps({"labels": [["0.png", 0], ["1.png", 1]]}))
    data = load_dataset(root)
    assert data.class_names == () and data.num_classes == 2


@pytest.mark.parametrize("meta, match", [({"class_names": "cat"}, "list of strings"), ({"class_names": [1, 2]}, "list of strings"),
                                         ({"class_names": ["only"]}, "out of range")])
def test_bad_class_names_are_errors(tmp_path, meta, match):
    root = tmp_path / "flat"
    root.mkdir()
    (root / "0.png").write_bytes(_png(0))
    (root / "1.png").write_bytes(_png(10))
    (root / "dataset.json").write_text(json.dumps({"labels": [["0.png", 0], ["1.png", 1]], **meta}))
    with pytest.raises(ValueError, match=match):
        load_dataset(root)


def test_classes_subset_reorders_names(tmp_path):
    src = _class_folder(tmp_path / "d")
    data = load_dataset(src, classes=[2, 0])
    assert data.class_names == ("zebra", "cat") and data.num_classes == 2
    assert sorted(_class_of_pixels(data).tolist()) == [0, 0, 2, 2]  # class 1 (dog) is gone
    assert data.labels.tolist() == [{2: 0, 0: 1}[c] for c in _class_of_pixels(data).tolist()]  # relabelled in list order
    convert_dataset(src, tmp_path / "sub.zip", classes=[2, 0])
    back = load_dataset(tmp_path / "sub.zip")
    assert back.class_names == ("zebra", "cat") and torch.equal(back.labels, data.labels)


def test_mnist_names_are_digits(tmp_path):
    images, labels = np.zeros((3, 4, 4), np.uint8), np.array([0, 9, 4], np.uint8)
    (tmp_path / "t-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + np.array([3, 4, 4], ">u4").tobytes() + images.tobytes())
    (tmp_path / "t-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + np.array([3], ">u4").tobytes() + labels.tobytes())
    assert load_dataset(tmp_path / "t-images-idx3-ubyte").class_names == tuple("0123456789")
    assert load_dataset(classes=[7, 3]).class_names == ("7", "3")  # the embedded MNIST subset


def _cifar10(path, *, meta):
    rows, labels = np.zeros((4, 3072), np.uint8), [3, 0, 9, 3]
    with tarfile.open(path, "w:gz") as tar:
        files = {"data_batch_1": {b"data": rows, b"labels": labels}}
        if meta:
            files["batches.meta"] = {b"label_names": [f"n{c}".encode() for c in range(10)]}
        for name, obj in files.items():
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def test_cifar10_names_from_meta_or_published(tmp_path):
    assert load_dataset(_cifar10(tmp_path / "a.tar.gz", meta=True), classes=[9, 3]).class_names == ("n9", "n3")
    data = load_dataset(_cifar10(tmp_path / "b.tar.gz", meta=False))
    assert data.class_names == CIFAR10_CLASS_NAMES and data.class_names[3] == "cat"


def test_dataset_info_shows_names(tmp_path):
    convert_dataset(_class_folder(tmp_path / "d"), tmp_path / "out.zip", classes=[1, 2])
    res = run("dataset", "info", tmp_path / "out.zip")
    assert res.exit_code == 0, res.output
    assert "names:      0 dog, 1 zebra" in res.output and "dog: 2" in res.output
    flat = tmp_path / "unnamed"
    flat.mkdir()
    (flat / "0.png").write_bytes(_png(0))
    (flat / "dataset.json").write_text(json.dumps({"labels": [["0.png", 0]]}))
    res = run("dataset", "info", flat)
    assert res.exit_code == 0 and "names:" not in res.output


# --- edmkit train --sigma-sampling ---------------------------------------------------------------


def _dry_run_loss(*flags):
    res = run("train", "--preset", "tiny", *flags, "--dry-run")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)["loss"]


def test_sigma_sampling_flag_sets_the_loss_field():
    assert _dry_run_loss()["sigma_sampling"] == get_preset("tiny").loss.sigma_sampling == "lognormal"
    for mode in ("stratified", "importance", "lognormal"):
        assert _dry_run_loss("--sigma-sampling", mode)["sigma_sampling"] == mode
    assert "--sigma-sampling[lognormal|stratified|importance|adaptive]" in "".join(run("train", "--help").output.split())


@pytest.mark.parametrize("preset_value", ["lognormal", "stratified"])
def test_sigma_sampling_none_keeps_the_presets_value(preset_value):
    cfg = get_preset("tiny").override("loss", sigma_sampling=preset_value)
    assert resolve_config(cfg, sigma_sampling=None).loss.sigma_sampling == preset_value
    assert resolve_config(cfg, sigma_sampling="importance").loss.sigma_sampling == "importance"


@pytest.mark.parametrize("old, mode", [(True, "stratified"), (False, "lognormal")])
def test_config_files_with_the_old_stratified_bool_still_load(tmp_path, old, mode):
    d = get_preset("tiny").to_dict()
    del d["loss"]["sigma_sampling"]
    d["loss"]["stratified"] = old
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert load_config_file(tmp_path / "old.json").loss.sigma_sampling == mode