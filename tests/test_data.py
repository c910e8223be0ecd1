"""Tests for edmkit.data: every format is built here from one random array and must load identically."""

import gzip
import io
import json
import pickle
import struct
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from edmkit.data.dataset import ImageDataset, load_dataset, sample_order
from edmkit.data.images import float_to_images, image_grid, images_to_float, save_image_grid, save_images
from edmkit.presets import get_preset
from edmkit.training.loop import make_batch
from edmkit.training.step_inputs import Shard

N, K = 12, 3  # tiny datasets: 12 images, 3 classes


@pytest.fixture(scope="module")
def mnist5k() -> ImageDataset:
    return load_dataset()


def _random_set(channels: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, size, size, channels] and labels [N] with every class present."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (N, size, size, channels), dtype=np.uint8)
    return images, rng.permutation(np.arange(N) % K)


def _expected(images: np.ndarray, labels: np.ndarray, order=None) -> tuple[torch.Tensor, torch.Tensor]:
    order = np.arange(len(images)) if order is None else order
    return torch.from_numpy(images[order].transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels[order].astype(np.int64))


# --- format writers (laid out like the real distributions) ----------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(folder, images, labels, *, gz: bool):
    suffix = ".gz" if gz else ""
    paths = folder / f"train-images-idx3-ubyte{suffix}", folder / f"train-labels-idx1-ubyte{suffix}"
    for path, array in zip(paths, (images[..., 0], labels.astype(np.uint8))):
        data = _idx_bytes(array)
        path.write_bytes(gzip.compress(data) if gz else data)
    return paths[0]


def _add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _py2_pickle(obj) -> bytes:
    """Protocol-2 pickle naming numpy.core.multiarray, as the distributed (Python 2) CIFAR files do."""
    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar10(folder, images, labels):
    """cifar-10-batches-py/data_batch_1..2 + test_batch + batches.meta, rows = R, G, B planes."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    path = folder / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for b, part in enumerate(np.array_split(np.arange(len(images)), 2), start=1):
            batch = {b"batch_label": b"training batch", b"labels": labels[part].tolist(), b"data": rows[part]}
            _add_to_tar(tar, f"cifar-10-batches-py/data_batch_{b}", _py2_pickle(batch))
        test = {b"labels": [9], b"data": np.full((1, 3072), 7, np.uint8)}  # must be ignored
        _add_to_tar(tar, "cifar-10-batches-py/test_batch", pickle.dumps(test, protocol=2))
        meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
        _add_to_tar(tar, "cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=2))
    return path


def write_cifar100(folder, images, labels):
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    path = folder / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        train = {b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 2).tolist(), b"data": rows}
        _add_to_tar(tar, "cifar-100-python/train", pickle.dumps(train, protocol=2))
        meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)]}
        _add_to_tar(tar, "cifar-100-python/meta", pickle.dumps(meta, protocol=2))
    return path


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def _class_files(images, labels, prefix=""):
    return {f"{prefix}{c}/{i:03d}.png": _png(img) for i, (img, c) in enumerate(zip(images, labels))}


def write_folder(folder, files: dict):
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def write_zip(path, files: dict):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def write_npz(path, images, labels=None, layout="nhwc"):
    array = {"nhw": images[..., 0], "nhwc": images, "nchw": images.transpose(0, 3, 1, 2)}[layout]
    np.savez(path, images=array, **({} if labels is None else {"labels": labels}))
    return path


# --- essential API ---------------------------------------------------------------------------


def test_embedded_mnist5k(mnist5k):
    assert mnist5k.images.shape == (5000, 1, 28, 28) and mnist5k.images.dtype == torch.uint8
    assert mnist5k.images.is_contiguous()
    assert mnist5k.labels.dtype == torch.int64 and mnist5k.num_classes == 10
    assert torch.bincount(mnist5k.labels).tolist() == [500] * 10
    assert (mnist5k.resolution, mnist5k.channels, len(mnist5k)) == (28, 1, 5000)
    assert mnist5k.images.float().std() > 50  # real digits, not a blank array


def test_subset(mnist5k):
    index = [4999, 0, 2500]
    sub = mnist5k.subset(index)
    assert torch.equal(sub.images, mnist5k.images[index]) and torch.equal(sub.labels, mnist5k.labels[index])
    assert sub.num_classes == 10 and len(sub) == 3


def test_sample_order_deterministic_and_sliceable():
    a = sample_order(num_items=7, seed=3, start=0, count=30)
    assert torch.equal(a, sample_order(num_items=7, seed=3, start=0, count=30))
    assert not torch.equal(a, sample_order(num_items=7, seed=4, start=0, count=30))
    for lo, mid, hi in [(0, 5, 30), (3, 7, 22), (6, 6, 15), (13, 20, 21)]:
        parts = [sample_order(num_items=7, seed=3, start=s, count=e - s) for s, e in [(lo, mid), (mid, hi)]]
        assert torch.equal(torch.cat(parts), a[lo:hi])


def test_sample_order_covers_each_index_once_per_epoch():
    n = 11
    stream = sample_order(num_items=n, seed=0, start=0, count=4 * n).view(4, n)
    for epoch in stream:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not all(torch.equal(stream[0], e) for e in stream[1:])  # epochs are reshuffled
    assert sample_order(num_items=n, seed=0, start=5, count=0).shape == (0,)


@pytest.mark.parametrize("size, world", [(4, 1), (2, 2), (1, 2)])
def test_make_batch_visits_every_image_once_per_epoch_in_a_new_order(size, world):
    """Over two epochs of the training stream (10 images, batches of 4 that straddle the epoch boundary), the images
    make_batch hands the ranks (shards, accumulation rounds) are each epoch a permutation of the dataset, with their
    own labels, and epoch 2 is reshuffled rather than a replay of epoch 1 (every short test run stays inside one epoch)."""
    n, batch = 10, 4
    data = ImageDataset(images=torch.arange(n, dtype=torch.uint8).mul(20).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous(),
                        labels=torch.arange(n), num_classes=n, name="numbered")  # image i: every pixel 20 i, label i
    cfg = get_preset("tiny").override("network", label_dim=n).override("train", batch=batch)
    stream = []
    for nimg in range(0, 2 * n, batch):
        step = torch.full((batch,), -1)
        for rank in range(world):
            rows = Shard(batch=batch, size=size, rank=rank, world=world).rows()
            y, labels, _ = make_batch(data, cfg, nimg, "cpu", rows=rows)
            index = float_to_images(y)[:, 0, 0, 0].long() // 20
            assert torch.equal(labels.argmax(1), index) and torch.equal(labels.sum(1), torch.ones(len(rows)))
            step[rows] = index
        stream.append(step)
    epochs = torch.cat(stream).view(2, n)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not torch.equal(epochs[0], epochs[1])
    assert torch.equal(torch.cat(stream), sample_order(num_items=n, seed=cfg.train.seed, start=0, count=2 * n))


def test_float_round_trip():
    images = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = images_to_float(images)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(float_to_images(x), images)
    assert float_to_images(torch.tensor([-3.0, 5.0]).view(1, 1, 1, 2)).tolist() == [[[[0, 255]]]]
    with pytest.raises(ValueError):
        images_to_float(x)


def test_save_image_grid_size(tmp_path):
    x = torch.rand(5, 3, 8, 6) * 2 - 1
    path = tmp_path / "sub" / "grid.png"
    save_image_grid(x, path, nrow=2)
    with Image.open(path) as img:
        assert img.size == (2 * 7 + 1, 3 * 9 + 1) and img.mode == "RGB"
        pixels = np.asarray(img)
    assert np.array_equal(pixels[1:9, 1:7].transpose(2, 0, 1), float_to_images(x)[0].numpy())
    assert pixels[0].max() == 0  # padding row
    grid = image_grid(torch.zeros(4, 1, 5, 5, dtype=torch.uint8) + 9)  # default nrow = ceil(sqrt(4)) = 2
    assert grid.shape == (1, 13, 13)


def test_save_images(tmp_path):
    x = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    save_images(x, tmp_path / "out", start_index=7)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000007.png", "000008.png", "000009.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "000008.png")), x[1, 0].numpy())


# --- formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["idx", "idx.gz", "npz-nhw", "npz-nhwc", "folder-json", "zip-json"])
def test_grayscale_formats_load_identically(tmp_path, fmt):
    images, labels = _random_set(1, 10)
    flat = {f"img{i:03d}.png": _png(img) for i, img in enumerate(images)}
    json_labels = json.dumps({"labels": [[f"img{i:03d}.png", int(c)] for i, c in enumerate(labels)]}).encode()
    source = {
        "idx": lambda: write_idx(tmp_path, images, labels, gz=False),
        "idx.gz": lambda: write_idx(tmp_path, images, labels, gz=True),
        "npz-nhw": lambda: write_npz(tmp_path / "d.npz", images, labels, "nhw"),
        "npz-nhwc": lambda: write_npz(tmp_path / "d.npz", images, labels, "nhwc"),
        "folder-json": lambda: write_folder(tmp_path / "d", {**flat, "dataset.json": json_labels}),
        "zip-json": lambda: write_zip(tmp_path / "d.zip", {**flat, "dataset.json": json_labels}),
    }[fmt]()
    data = load_dataset(str(source))
    expected_images, expected_labels = _expected(images, labels)
    assert torch.equal(data.images, expected_images) and torch.equal(data.labels, expected_labels)
    assert data.num_classes == K and str(source) in data.name


@pytest.mark.parametrize("fmt", ["cifar10", "cifar100", "npz-nchw", "folder-classes", "zip-classes"])
def test_rgb_formats_load_identically(tmp_path, fmt):
    images, labels = _random_set(3, 32)
    order = None
    if fmt in ("folder-classes", "zip-classes"):
        order = np.lexsort((np.arange(N), labels))  # files sort by class folder, then by name
    source = {
        "cifar10": lambda: write_cifar10(tmp_path, images, labels),
        "cifar100": lambda: write_cifar100(tmp_path, images, labels),
        "npz-nchw": lambda: write_npz(tmp_path / "d.npz", images, labels, "nchw"),
        "folder-classes": lambda: write_folder(tmp_path / "d", _class_files(images, labels)),
        "zip-classes": lambda: write_zip(tmp_path / "d.zip", _class_files(images, labels, prefix="wrapper/")),
    }[fmt]()
    data = load_dataset(str(source))
    expected_images, expected_labels = _expected(images, labels, order)
    assert torch.equal(data.images, expected_images) and torch.equal(data.labels, expected_labels)
    assert data.num_classes == {"cifar10": 10, "cifar100": 100}.get(fmt, K)
    if fmt == "cifar10":
        assert data.class_names[3] == "class3"
    if fmt.endswith("classes"):
        assert data.class_names == ("0", "1", "2")


def test_unlabelled_sources(tmp_path):
    images, _ = _random_set(3, 8)
    assert load_dataset(str(write_npz(tmp_path / "u.npz", images))).labels is None
    flat = {f"{i}.png": _png(img) for i, img in enumerate(images)}
    data = load_dataset(str(write_folder(tmp_path / "flat", flat)))
    assert data.labels is None and data.num_classes == 0 and len(data) == N
    one_wrapper = {f"only/{i}.png": _png(img) for i, img in enumerate(images)}
    assert load_dataset(str(write_zip(tmp_path / "w.zip", one_wrapper))).labels is None
    nulls = {**flat, "dataset.json": b'{"labels": null}'}
    assert load_dataset(str(write_folder(tmp_path / "nulls", nulls))).labels is None


def test_class_folders_sort_numerically(tmp_path):
    images, _ = _random_set(1, 4)
    files = {f"{c}/x.png": _png(images[c]) for c in range(11)}  # folders 0..10: "10" sorts after "9"
    data = load_dataset(str(write_folder(tmp_path / "d", files)))
    assert data.class_names == tuple(str(c) for c in range(11))
    for c in (2, 10):  # files load in path order ("10/" before "2/"); the labels follow the classes
        assert torch.equal(data.images[data.labels == c][0, 0], torch.from_numpy(images[c, ..., 0]))


def test_classes_filter_and_remap(mnist5k):
    data = load_dataset(classes=[7, 3])
    assert len(data) == 1000 and data.num_classes == 2
    assert torch.equal(data.images[data.labels == 0], mnist5k.images[mnist5k.labels == 7])
    assert torch.equal(data.images[data.labels == 1], mnist5k.images[mnist5k.labels == 3])


def test_classes_filter_cifar_keeps_names(tmp_path):
    images, labels = _random_set(3, 32)
    data = load_dataset(str(write_cifar10(tmp_path, images, labels)), classes=[2])
    assert torch.equal(data.labels, torch.zeros(int((labels == 2).sum()), dtype=torch.int64))
    assert data.class_names == ("class2",)
    assert torch.equal(data.images, _expected(images, labels)[0][torch.from_numpy(labels == 2)])


def test_resolution_and_channels(mnist5k):
    data = load_dataset(resolution=14, channels=3)
    assert data.images.shape == (5000, 3, 14, 14)
    assert torch.equal(data.images[:, 0], data.images[:, 2])
    box = mnist5k.images[:2].float().view(2, 1, 14, 2, 14, 2).mean(dim=(3, 5))  # 2x2 box average
    assert (data.images[:2, :1].float() - box).abs().max() <= 1  # PIL's fixed-point rounding
    assert load_dataset(resolution=32).images.shape == (5000, 1, 32, 32)


def test_rgb_to_gray_matches_pil(tmp_path):
    images, labels = _random_set(3, 8)
    data = load_dataset(str(write_npz(tmp_path / "d.npz", images, labels)), channels=1)
    pil = np.stack([np.asarray(Image.fromarray(img).convert("L")) for img in images])
    assert torch.equal(data.images[:, 0], torch.from_numpy(pil))


def test_center_crop_and_mixed_sizes(tmp_path):
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    square = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    write_folder(tmp_path / "wide", {"a.png": _png(wide)})
    with pytest.raises(ValueError, match=r"a\.png.*center-crop"):
        load_dataset(str(tmp_path / "wide"))
    cropped = load_dataset(str(tmp_path / "wide"), center_crop=True)
    assert torch.equal(cropped.images[0], torch.from_numpy(wide[:, 2:8]).permute(2, 0, 1))
    write_folder(tmp_path / "mixed", {"a.png": _png(wide), "b.png": _png(square)})
    with pytest.raises(ValueError, match=r"mixed image sizes.*b\.png"):
        load_dataset(str(tmp_path / "mixed"), center_crop=True)
    assert load_dataset(str(tmp_path / "mixed"), center_crop=True, resolution=4).images.shape == (2, 3, 4, 4)


def test_mixed_gray_and_rgb_folder_promotes_to_rgb(tmp_path):
    images, _ = _random_set(3, 8)
    write_folder(tmp_path / "d", {"a.png": _png(images[0]), "b.png": _png(images[1, ..., :1])})
    data = load_dataset(str(tmp_path / "d"))
    assert data.channels == 3 and torch.equal(data.images[1, 0], data.images[1, 2])


# --- bad inputs ----------------------------------------------------------------------------------


def _write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("fmt", ["zip", "cifar", "idx", "idx.gz", "npz", "npz-garbage"])
def test_corrupt_archives_raise(tmp_path, fmt):
    images, labels = _random_set(3, 32)
    path = {
        "zip": lambda: _truncate(write_zip(tmp_path / "bad.zip", _class_files(images, labels))),
        "cifar": lambda: _truncate(write_cifar10(tmp_path, images, labels)),
        "idx": lambda: _truncate(write_idx(tmp_path, images[..., :1], labels, gz=False)),
        "idx.gz": lambda: _truncate(write_idx(tmp_path, images[..., :1], labels, gz=True)),
        "npz": lambda: _truncate(write_npz(tmp_path / "bad.npz", images, labels)),
        "npz-garbage": lambda: _write_bytes(tmp_path / "bad.npz", b"\x93NUMPY garbage"),
    }[fmt]()
    with pytest.raises(ValueError, match=path.name):
        load_dataset(str(path))


def test_non_image_file_raises_or_is_skipped(tmp_path):
    images, labels = _random_set(1, 8)
    files = {**_class_files(images, labels), "1/notes.txt": b"hello"}
    write_folder(tmp_path / "d", files)
    with pytest.raises(ValueError, match=r"notes\.txt"):
        load_dataset(str(tmp_path / "d"))
    with pytest.warns(UserWarning, match="skipped 1"):
        data = load_dataset(str(tmp_path / "d"), skip_bad=True)
    assert len(data) == N
    write_zip(tmp_path / "d.zip", files)
    with pytest.raises(ValueError, match=r"d\.zip/1/notes\.txt"):
        load_dataset(str(tmp_path / "d.zip"))


def test_empty_folder_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*no images"):
        load_dataset(str(tmp_path / "empty"))


def test_missing_labels_raise(tmp_path):
    images, labels = _random_set(1, 8)
    flat = {f"{i}.png": _png(img) for i, img in enumerate(images)}
    partial = json.dumps({"labels": [[f"{i}.png", 0] for i in range(N - 1)]}).encode()
    write_folder(tmp_path / "d", {**flat, "dataset.json": partial})
    with pytest.raises(ValueError, match=r"dataset\.json.*no label for 1 of"):
        load_dataset(str(tmp_path / "d"))
    np.savez(tmp_path / "short.npz", images=images, labels=labels[:-1])
    with pytest.raises(ValueError, match=r"short\.npz"):
        load_dataset(str(tmp_path / "short.npz"))
    write_idx(tmp_path, images, labels[:-1], gz=False)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte"):
        load_dataset(str(tmp_path / "train-images-idx3-ubyte"))


def test_class_index_out_of_range_raises(tmp_path):
    images, labels = _random_set(1, 8)
    with pytest.raises(ValueError, match=r"mnist5k.*class index 10 out of range"):
        load_dataset(classes=[10])
    negative = labels.astype(np.int64) - 1
    write_npz(tmp_path / "neg.npz", images, negative)
    with pytest.raises(ValueError, match=r"neg\.npz.*out of range"):
        load_dataset(str(tmp_path / "neg.npz"))
    with pytest.raises(ValueError, match=r"unlabelled\.npz.*no labels"):
        load_dataset(str(write_npz(tmp_path / "unlabelled.npz", images)), classes=[0])


def test_unknown_source_raises(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        load_dataset("nope")
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(ValueError, match=r"data\.csv.*unrecognised"):
        load_dataset(str(tmp_path / "data.csv"))


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add_to_tar(tar, "cifar-10-batches-py/data_batch_1", pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match=r"refusing to load \S*builtins?__\.print"):
        load_dataset(str(path))


def test_dataset_validates_fields():
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="out of range"):
        ImageDataset(images, torch.tensor([0, 2]), 2, "t")
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(images.float(), None, 0, "t")
    with pytest.raises(ValueError, match="contiguous"):
        ImageDataset(images.transpose(2, 3), None, 0, "t")


# --- edmkit dataset convert: the checked zip format ------------------------------------------


def test_convert_npz_round_trips(tmp_path):
    from edmkit.data.convert import convert_dataset

    images, labels = _random_set(3, 8)
    src = write_npz(tmp_path / "src.npz", images, labels)
    info = convert_dataset(src, tmp_path / "out.zip")
    back, original = load_dataset(str(tmp_path / "out.zip")), load_dataset(str(src))
    assert torch.equal(back.images, original.images) and torch.equal(back.labels, original.labels)
    assert (info["count"], info["resolution"], info["channels"], info["num_classes"]) == (N, 8, 3, K)
    assert sum(info["class_counts"].values()) == N
    with Image.open(info["preview"]) as preview:
        assert preview.size == image_grid(original.images).shape[:0:-1]  # (W, H) of the grid
    with zipfile.ZipFile(tmp_path / "out.zip") as archive:
        assert sorted(archive.namelist())[-1] == "dataset.json" and len(archive.namelist()) == N + 1


def test_convert_folder_with_options_matches_load(tmp_path):
    from edmkit.data.convert import convert_dataset

    images, labels = _random_set(3, 12)
    src = write_folder(tmp_path / "src", _class_files(images, labels))
    options = dict(resolution=6, channels=1, classes=[2, 0])
    convert_dataset(src, tmp_path / "out.zip", **options)
    expected, back = load_dataset(str(src), **options), load_dataset(str(tmp_path / "out.zip"))
    assert back.images.shape[1:] == (1, 6, 6)
    assert torch.equal(back.images, expected.images) and torch.equal(back.labels, expected.labels)


def test_convert_unlabelled_stays_unlabelled(tmp_path):
    from edmkit.data.convert import convert_dataset

    images, _ = _random_set(1, 8)
    info = convert_dataset(write_npz(tmp_path / "src.npz", images), tmp_path / "out.zip")
    back = load_dataset(str(tmp_path / "out.zip"))
    assert back.labels is None and info["num_classes"] == 0
    assert torch.equal(back.images, torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))


def test_convert_rejects_bad_destination(tmp_path):
    from edmkit.data.convert import convert_dataset

    src = write_npz(tmp_path / "src.npz", *_random_set(1, 8))
    with pytest.raises(ValueError, match=r"must be a \.zip"):
        convert_dataset(src, tmp_path / "out.npz")
    with pytest.raises(ValueError, match="does not exist"):
        convert_dataset(src, tmp_path / "missing" / "out.zip")
    zipped = write_zip(tmp_path / "in.zip", _class_files(*_random_set(1, 8)))
    with pytest.raises(ValueError, match="is the source"):
        convert_dataset(zipped, zipped)


def test_dataset_cli_summary_preview_and_one_line_errors(tmp_path):
    from click.testing import CliRunner

    from edmkit.cli import main

    images, labels = _random_set(3, 8)
    src = write_folder(tmp_path / "src", _class_files(images, labels))
    run = lambda *args: CliRunner().invoke(main, [str(a) for a in args])  # noqa: E731
    res = run("dataset", "convert", src, tmp_path / "out.zip", "--resolution", 4, "--classes", "1,2", "--channels", 3, "--center-crop")
    assert res.exit_code == 0, res.output
    n = int((labels == 1).sum() + (labels == 2).sum())
    assert f"images:     {n}" in res.output and "4x4" in res.output and "channels:   3" in res.output and "classes:    2" in res.output
    assert (tmp_path / "out-preview.png").is_file()
    info = run("dataset", "info", tmp_path / "out.zip")
    assert info.exit_code == 0 and f"images:     {n}" in info.output
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.png").write_bytes(_png(images[0]))
    (tmp_path / "mixed" / "notes.txt").write_text("not an image")
    for args, expect in [(("convert", tmp_path / "nope", tmp_path / "x.zip"), "unknown dataset"),
                         (("convert", tmp_path / "bad.zip", tmp_path / "x.zip"), "corrupt or truncated"),
                         (("convert", tmp_path / "mixed", tmp_path / "x.zip"), "notes.txt"),
                         (("convert", src, tmp_path / "x.zip", "--classes", "1,x"), "--classes"),
                         (("convert", src, tmp_path / "x.zip", "--classes", "7"), "out of range"),
                         (("info", tmp_path / "bad.zip"), "corrupt or truncated")]:
        res = run("dataset", *args)
        assert res.exit_code != 0 and expect in res.output and len(res.output.strip().splitlines()) == 1, (args, res.output)
    assert not (tmp_path / "x.zip").exists()  # nothing half-written
