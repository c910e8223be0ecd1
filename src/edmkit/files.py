"""Atomic file writes and one-writer locks, used by every module that writes files a user keeps.

Every write goes to a temporary file in the same folder, is flushed to disk and then renamed over the target, so a
crash or a full disk never leaves a damaged file under the final name.

``writer_lock`` makes one process the only writer of a run or output folder: an exclusive ``flock`` on the folder's
``.edmkit.lock`` (or, for a single output file, on ``.<name>.lock`` beside it), removed again on release. The
operating system releases the lock when the process ends, however it ends, so a killed run never leaves a stale
lock (only, possibly, its harmless file); the file records the holder's PID and host for the message a second
writer gets. Readers take no lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

try:
    import fcntl
except ImportError:  # Windows: no flock; writer_lock then only creates its folder (README: "Not guaranteed")
    fcntl = None

LOCK_NAME = ".edmkit.lock"


class LockedError(OSError):
    """Another process is writing the same run or output folder."""


def _write_error(path: Path, e: BaseException) -> OSError:
    """``OSError`` with ``e``'s errno and the one-line message "cannot write PATH: cause"."""
    error = OSError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}")
    error.errno = getattr(e, "errno", None)
    return error


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, then rename it over ``path``.

    The file gets the usual permissions (0666 less the umask). A failed write (full disk, file-size limit, no
    permission) removes the temp file, leaves any existing ``path`` as it was, and raises ``OSError`` with the same
    errno and a message naming ``path`` and the cause.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files: give the final file the permissions open() would
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write a JSON file."""
    text = json.dumps(obj, indent=2, sort_keys=True).encode()
    atomic_write(path, lambda f: f.write(text))


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike, *, what: str = "run folder", file: bool = False) -> Iterator[None]:
    """Hold the exclusive writer lock of a folder (created if missing) or, with ``file``, of one output file.

    Args:
        target: the run or output folder, or (``file=True``) an output file, whose lock file sits beside it and is
            removed on release.
        what: how messages name the target ("run folder", "output folder", ...).

    Raises:
        LockedError: another live process holds it; the message names the target and the holder's PID and host.
        OSError: the folder cannot be created or written (the message names it).
    """
    target = Path(target)
    path = target.parent / f".{target.name}.lock" if file else target / LOCK_NAME
    created = not path.parent.exists()  # a folder made only for the lock is removed again if nothing else was written
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, target=target, what=what) if fcntl is not None else None
    except LockedError:
        raise
    except OSError as e:
        raise OSError(f"cannot write to {what} {path.parent}: {e.strerror or e}") from None
    try:
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # leave no trace (a process that opened the old file sees it gone and retries)
            os.close(fd)
        if created and not file and not any(path.parent.iterdir()):
            path.parent.rmdir()  # a folder made only for the lock: the command wrote nothing


def _acquire(path: Path, *, target: Path, what: str) -> int:
    """An fd holding an exclusive non-blocking flock on ``path`` (the file there now); LockedError when another holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockedError(f"{target} is in use: its {what} is locked by {holder}; wait for it to finish or stop it") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd  # locked the file that is there now, not one its previous holder has just removed
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
