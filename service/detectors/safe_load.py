"""`torch.load` without arbitrary code execution, for checkpoints that pickle mmengine objects.

Loading always goes through torch's `weights_only=True` unpickler, which only resolves allowlisted
globals. On top of torch's own allowlist we add:
- numpy arrays, dtypes and scalars (mmengine's `HistoryBuffer` and log scalars hold them), including
  the `numpy.core.*` names that numpy 1.x wrote;
- inert stand-in classes for every `mmengine.*` global the pickle names, so 2022 MMDetection files
  load with no mmengine installed. A stand-in only records the state it is given; it runs no code.
Anything else (os.system, builtins.eval, subprocess, ...) is refused.
"""
from __future__ import annotations

import io
import pickle
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._weights_only_unpickler as _wo  # its allowlist, to name refusals up front

STUB_PREFIXES = ("mmengine.",)

_stubs: dict[str, type] = {}
# safe_globals edits a process-wide set; serialise loads so concurrent threads don't drop each other's entries
_lock = threading.Lock()


class PickledStandIn:
    """Base of the inert stand-ins: keeps constructor args and pickled state for inspection, nothing more."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in for {type(self).__module__}.{type(self).__qualname__}>"


def stand_in(full_name: str) -> type:
    """The (cached) inert class standing in for `module.QualName`, with matching __module__/__qualname__."""
    if full_name not in _stubs:
        module, _, qualname = full_name.rpartition(".")
        cls = type(qualname.rsplit(".", 1)[-1], (PickledStandIn,), {"__module__": module})
        cls.__qualname__ = qualname
        _stubs[full_name] = cls
    return _stubs[full_name]


def _numpy_globals() -> list[Any]:
    core = np._core if hasattr(np, "_core") else np.core
    entries: list[Any] = [np.ndarray, np.dtype]
    for name in ("scalar", "_reconstruct"):
        fn = getattr(core.multiarray, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            entries.append((fn, f"{module}.{name}"))
    # BUILD on a dtype needs its concrete class allowlisted; object arrays stay refused
    for name in dir(np.dtypes):
        if name.endswith("DType") and name != "ObjectDType":
            entries.append(getattr(np.dtypes, name))
    return entries


def globals_in_checkpoint(path: str | Path) -> set[str]:
    """Statically list the `module.name` globals a torch.save file's pickle refers to (zip or legacy)."""
    names: set[str] = set()
    with open(path, "rb") as f:
        if zipfile.is_zipfile(f):
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                for name in pickles:
                    names |= _scan_pickle(io.BytesIO(archive.read(name)))
            return names
        f.seek(0)
        # legacy format: magic number, protocol version, sys_info, then the object itself; a foreign
        # pickle may end after the first, so keep what was found before a scan fails
        for _ in range(4):
            try:
                names |= _scan_pickle(f)
            except Exception:
                break
    return names


def _scan_pickle(stream) -> set[str]:
    # torch's scanner applies the same python2 -> 3 name mapping as its unpickler (`__builtin__.set` -> `builtins.set`)
    return set(_wo.get_globals_in_pkl(stream))


class UnsafeCheckpoint(pickle.UnpicklingError):
    """The pickle names globals outside the allowlist; nothing from it was executed."""

    def __init__(self, names: list[str]):
        super().__init__(f"disallowed globals: {', '.join(names)}")
        self.names = names


class InflatingCheckpoint(pickle.UnpicklingError):
    """A zip checkpoint whose entries expand far beyond the file: torch.save stores them uncompressed."""


# Room for a few compressed bytes (some tools deflate data.pkl), never a zip bomb: a 2 MB file whose
# tensor entry was deflated expanded to 2 GiB in torch.load.
INFLATE_SLACK_BYTES = 16 << 20


def check_not_inflating(path: str | Path) -> None:
    """Raise InflatingCheckpoint when a zip checkpoint's entries add up to more than the file plus
    INFLATE_SLACK_BYTES; a legacy (non-zip) checkpoint cannot inflate."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        if not zipfile.is_zipfile(f):
            return
        f.seek(0)
        with zipfile.ZipFile(f) as archive:
            expanded = sum(info.file_size for info in archive.infolist())
    if expanded > size + INFLATE_SLACK_BYTES:
        raise InflatingCheckpoint(f"its entries expand to {expanded} bytes from a file of {size} bytes "
                                  "(torch.save stores tensors uncompressed; this looks like a zip bomb)")


def safe_torch_load(path: str | Path) -> Any:
    """torch.load(weights_only=True) with numpy and mmengine stand-ins allowed.

    Raises UnsafeCheckpoint when a static scan finds disallowed globals, else whatever torch.load raises
    (pickle.UnpicklingError for anything its unpickler refuses at run time).
    """
    try:
        check_not_inflating(path)
    except (OSError, zipfile.BadZipFile, ValueError):
        pass  # not a readable zip: torch.load below produces the real error
    try:
        referenced = globals_in_checkpoint(path)
    except Exception:  # not a pickle we can scan: torch.load below produces the real error
        referenced = set()
    stubs = [(stand_in(n), n) for n in sorted(referenced) if n.startswith(STUB_PREFIXES)]
    with _lock, torch.serialization.safe_globals(_numpy_globals() + stubs):
        allowed = set(_wo._get_allowed_globals()) | set(_wo._get_user_allowed_globals())
        disallowed = sorted(n for n in referenced if n not in allowed)
        if disallowed:
            raise UnsafeCheckpoint(disallowed)
        return torch.load(path, map_location="cpu", weights_only=True)
