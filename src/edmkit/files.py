"""Atomic file writes, used by every module that writes a file a user keeps (networks, states, references, JSON).

Every write goes to a temporary file in the same folder, is flushed to disk and then renamed over the target, so a
crash or a full disk never leaves a damaged file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write a JSON file."""
    text = json.dumps(obj, indent=2, sort_keys=True).encode()
    atomic_write(path, lambda f: f.write(text))
