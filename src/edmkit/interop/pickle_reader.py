"""Read NVIDIA's network pickles (EDM, EDM2) as data, executing nothing.

EDM and EDM2 save networks with ``pickle.dump`` of ``torch.nn.Module`` objects whose classes are "persistent": each
object pickles as a call ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` where ``meta`` is a plain dict
``{type: "class", version: 6, module_src: <the module's source text>, class_name, state: <the object's __dict__>}``.
Loading such a file with ``pickle`` executes ``module_src``, so a tampered file can run anything.

``read_pickle`` replaces every global a pickle may name by an allow-list (``SAFE_GLOBALS``):

- the persistence hook returns a :class:`PersistentRecord` holding the class name, the (never executed) source text and
  the state (parameters, buffers, submodules, constructor arguments) as data;
- tensors are rebuilt from their storages with ``torch.Tensor.set_``; a storage is read from its own nested ``torch.save``
  bytes by ``torch.load(weights_only=True)``, which is restricted in the same way;
- torch's container modules (``ModuleDict`` ...) and ``dnnlib.EasyDict`` become plain records / dicts; numpy scalars and
  dtypes are rebuilt from bytes (object dtypes refused).

Any other global (``os.system``, ``builtins.eval``, ``subprocess``, a class of the file's own source) is refused by name
with :class:`UnsafePickleError` before anything is called. Only data reach the caller.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

PERSISTENCE_VERSIONS = (6,)  # torch_utils.persistence._version of every EDM / EDM2 release


class UnsafePickleError(ValueError):
    """A pickle names a global outside the allow-list, or is not a readable pickle; nothing was executed."""


class PersistentRecord:
    """One persistent-class object of an EDM / EDM2 pickle, as data: ``class_name``, ``state`` (its ``__dict__``)."""

    def __init__(self, meta: dict) -> None:
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise UnsafePickleError(f"persistent object of unknown type {meta.get('type') if isinstance(meta, dict) else type(meta).__name__!r}")
        version = meta.get("version")
        if version not in PERSISTENCE_VERSIONS:
            raise UnsafePickleError(f"persistence format version {version!r}, this edmkit reads {', '.join(map(str, PERSISTENCE_VERSIONS))}")
        self.class_name: str = str(meta.get("class_name"))
        self.module_src: str = str(meta.get("module_src", ""))  # kept as text; never compiled or executed
        self.state: dict = dict(meta.get("state") or {})

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get("_init_kwargs") or {})

    @property
    def init_args(self) -> tuple:
        return tuple(self.state.get("_init_args") or ())

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name})"


class ModuleRecord:
    """A torch container module (``ModuleDict``, ``ModuleList``, ``Sequential``) of a pickle, as data."""

    class_name = "Module"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: dict = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"{self.class_name} with a state of type {type(state).__name__}")
        self.state = dict(state)

    def __repr__(self) -> str:
        return f"ModuleRecord({self.class_name})"


def _container(name: str) -> type:
    return type(name, (ModuleRecord,), {"class_name": name})


class EasyDict(dict):
    """``dnnlib.EasyDict`` (a dict with attribute access) read as a plain dict."""


def _rebuild_tensor(storage: Any, storage_offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                    backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 without hooks or metadata: a view of the storage (plain tensor)."""
    if isinstance(storage, torch.storage.TypedStorage):
        dtype, storage = storage.dtype, storage._untyped_storage
    elif isinstance(storage, torch.UntypedStorage):
        dtype = torch.uint8
    else:
        raise UnsafePickleError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    return torch.empty((0,), dtype=dtype).set_(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, requires_grad: bool = False, backward_hooks: Any = None, state: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f"parameter rebuilt from a {type(data).__name__}, not a tensor")
    return data


def _load_storage(data: bytes) -> Any:
    """torch.storage._load_from_bytes, restricted: the nested ``torch.save`` bytes are read with weights_only=True."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("storage bytes of a wrong type")
    try:
        with warnings.catch_warnings():  # torch notes the pickle protocol of storages pickled by newer torch; harmless here
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError ... for refused or damaged nested pickles
        raise UnsafePickleError(f"refused nested storage pickle ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _numpy_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dtype = np.dtype(spec)
    if dtype.hasobject:
        raise UnsafePickleError("numpy object dtype refused")
    return dtype


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("numpy scalar that is not plain bytes of a plain dtype")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0].item()


SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentRecord,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    **{("torch.nn.modules.container", name): _container(name) for name in ("ModuleDict", "ModuleList", "Sequential", "ParameterDict")},
    **{("torch", name): getattr(torch, name) for name in ("float16", "bfloat16", "float32", "float64", "int64", "int32", "uint8", "bool")},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refused global {module}.{name} (not part of an EDM / EDM2 network pickle)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused persistent id (a torch.save archive, not an EDM / EDM2 network pickle)")


def read_pickle(path: str | os.PathLike) -> Any:
    """The object of an EDM / EDM2 ``.pkl`` as data (see the module docstring); nothing in the file is executed.

    Raises:
        UnsafePickleError: naming the file, for a refused global, a truncated or non-pickle file.
        OSError: the file cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
        if head.startswith(b"PK"):
            raise UnsafePickleError(f"{path}: a torch.save archive, not an EDM / EDM2 network pickle (load it with torch.load(weights_only=True))")
        f.seek(0)
        try:
            return _RestrictedUnpickler(f).load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError,
                MemoryError, OverflowError, UnicodeDecodeError) as e:
            raise UnsafePickleError(f"{path}: not a readable network pickle (truncated or damaged: {type(e).__name__}: {e})") from None


def children(record: PersistentRecord | ModuleRecord) -> dict[str, Any]:
    """The submodules of a record (``_modules``), None entries dropped."""
    return {k: v for k, v in (record.state.get("_modules") or {}).items() if v is not None}


def named_tensors(record: PersistentRecord | ModuleRecord, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``state_dict()`` of a record: parameters and persistent buffers, recursively, in torch's order and naming."""
    state = record.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, t in (state.get(kind) or {}).items():
            if t is None or name in skip:
                continue
            if not isinstance(t, torch.Tensor):
                raise UnsafePickleError(f"{prefix}{name} is a {type(t).__name__}, not a tensor")
            yield prefix + name, t
    for name, child in children(record).items():
        if not isinstance(child, (PersistentRecord, ModuleRecord)):
            raise UnsafePickleError(f"submodule {prefix}{name} is a {type(child).__name__}")
        yield from named_tensors(child, prefix=f"{prefix}{name}.")
