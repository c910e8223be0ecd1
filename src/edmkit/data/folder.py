"""Image folders and ``.zip`` archives: images found recursively in sorted path order; labels from a root
``dataset.json`` {"labels": [[relpath, label], ...], "class_names": [...]} ("labels": null means unlabelled) or else
from class subfolders (the first folder below the deepest folder common to all images; class indices follow the
sorted folder names, numeric order when names are digits). An optional "context": [[relpath, [[...D floats], ... L tokens]],
...] in dataset.json gives every image its token sequence [L, D] for cross-attention conditioning (issue 27)."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from edmkit.data.raw import Raw, check_context, check_labels


def read_folder(root: Path, *, skip_bad: bool) -> Raw:
    """All files below ``root`` (recursive)."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return _read_collection(files, lambda name: (root / name).read_bytes(), where=str(root), skip_bad=skip_bad)


def read_zip(path: Path, *, skip_bad: bool) -> Raw:
    """All files in a zip archive, with the same rules as a folder."""
    try:
        with zipfile.ZipFile(path) as archive:
            files = sorted(info.filename for info in archive.infolist() if not info.is_dir())
            return _read_collection(files, archive.read, where=str(path), skip_bad=skip_bad)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ValueError(f"{path}: corrupt or truncated zip archive ({e})") from e


def _is_data_file(name: str) -> bool:
    """False for dataset.json, hidden files and OS metadata folders (.DS_Store, __MACOSX)."""
    parts = PurePosixPath(name).parts
    return name != "dataset.json" and not any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _decode_image(data: bytes, *, where: str) -> np.ndarray:
    """Image bytes -> uint8 [H, W, 1] (grayscale modes) or [H, W, 3] (everything else)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            gray = img.mode in ("1", "L", "LA", "I", "I;16", "F")
            array = np.asarray(img.convert("L" if gray else "RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}: not a readable image ({e}); skip_bad=True skips such files") from e
    return array[..., None] if array.ndim == 2 else array


def _read_collection(files: list[str], read: Callable[[str], bytes], *, where: str, skip_bad: bool) -> Raw:
    """Decode the image files of a folder or zip and attach their labels."""
    images, kept, bad = [], [], []
    for name in filter(_is_data_file, files):
        try:
            images.append(_decode_image(read(name), where=f"{where}/{name}"))
            kept.append(name)
        except ValueError:
            if not skip_bad:
                raise
            bad.append(name)
    if bad:
        warnings.warn(f"{where}: skipped {len(bad)} unreadable file(s), e.g. {bad[0]}", stacklevel=5)  # points at the caller of load_dataset
    if not kept:
        raise ValueError(f"{where}: no images found")
    context = None
    if "dataset.json" in files:
        meta = _json_meta(read("dataset.json"), where=f"{where}/dataset.json")
        labels, num_classes, names = _json_labels(kept, meta, where=f"{where}/dataset.json")
        context = _json_context(kept, meta, where=f"{where}/dataset.json")
    else:
        labels, num_classes, names = _subfolder_labels(kept)
    return Raw(images, labels, num_classes, names, [f"{where}/{n}" for n in kept], context)


def _json_meta(text: bytes, *, where: str) -> dict:
    """The parsed dataset.json: a JSON object."""
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f'{where}: expected a JSON object {{"labels": [[relpath, label], ...]}}, got {type(meta).__name__}')
    return meta


def _json_table(entries: list, *, where: str, key: str) -> dict:
    """dataset.json's [[relpath, value], ...] as {relpath: value} (backslashes as slashes)."""
    try:
        return {str(p).replace("\\", "/"): v for p, v in entries}
    except (ValueError, TypeError) as e:
        raise ValueError(f'{where}: expected "{key}": [[relpath, value], ...] ({e})') from e


def _json_labels(names: list[str], meta: dict, *, where: str) -> tuple[np.ndarray | None, int, tuple[str, ...]]:
    """Labels from dataset.json {"labels": [[relpath, label], ...] | null, "class_names": [...]} for each of ``names``.

    The optional "class_names" (one string per class, index order) also fixes the class count, so
    classes without images keep their index; an empty list means no names.
    """
    entries, class_names = meta.get("labels"), meta.get("class_names") or []
    try:
        table = None if entries is None else {p: int(c) for p, c in _json_table(entries, where=where, key="labels").items()}
    except (ValueError, TypeError) as e:
        raise ValueError(f'{where}: expected {{"labels": [[relpath, label], ...]}} ({e})') from e
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
        raise ValueError(f'{where}: "class_names" must be a list of strings, got {class_names!r:.80}')
    if table is None:
        return None, 0, ()
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"{where}: no label for {len(missing)} of {len(names)} images, e.g. {missing[0]}")
    labels, num_classes = check_labels(np.array([table[n] for n in names]), len(names), where=where,
                                        num_classes=len(class_names) or None)
    return labels, num_classes, tuple(class_names)


def _json_context(names: list[str], meta: dict, *, where: str) -> np.ndarray | None:
    """Per-image context tokens from dataset.json {"context": [[relpath, [[D floats] x L]], ...]}: float32 [N, L, D] in
    the order of ``names``, or None without a "context" entry. Every image needs one, all of the same [L, D]."""
    entries = meta.get("context")
    if entries is None:
        return None
    table = _json_table(entries, where=where, key="context")
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"{where}: no context for {len(missing)} of {len(names)} images, e.g. {missing[0]}")
    arrays = []
    for n in names:
        try:
            arrays.append(np.asarray(table[n], dtype=np.float64))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: the context of {n} is not an [L, D] list of numbers ({e})") from e
        if arrays[-1].ndim != 2 or arrays[-1].shape != arrays[0].shape or not arrays[-1].size:
            raise ValueError(f"{where}: the context of {n} has shape {arrays[-1].shape}, but every image needs one "
                             f"[L, D] list of L tokens of D numbers, the same for all (the first, {names[0]}, has {arrays[0].shape})")
    return check_context(np.stack(arrays), len(names), where=where)


def _natural_key(name: str) -> tuple[int, int, str]:
    """Sort key: digit-only names numerically ("2" < "10"), before the others alphabetically."""
    return (0, int(name), name) if name.isdigit() else (1, 0, name)


def _subfolder_labels(names: list[str]) -> tuple[np.ndarray | None, int, tuple[str, ...]]:
    """Class = first folder below the deepest folder common to all images; unlabelled if some lie in it."""
    folders = [PurePosixPath(n).parts[:-1] for n in names]
    depth = 0
    while all(len(f) > depth for f in folders) and len({f[depth] for f in folders}) == 1:
        depth += 1  # strip wrapper folders shared by every image (e.g. a zip's top folder)
    if not all(len(f) > depth for f in folders):
        return None, 0, ()
    class_names = sorted({f[depth] for f in folders}, key=_natural_key)
    index = {c: i for i, c in enumerate(class_names)}
    return np.array([index[f[depth]] for f in folders], dtype=np.int64), len(class_names), tuple(class_names)
