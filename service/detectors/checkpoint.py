"""Checkpoint files: official MMDetection .pth, plain state_dicts and detserve's own format.

`load_checkpoint` never executes code from the file (see `safe_load`); `load_weights` puts the
weights into a built detector with readable errors.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.errors import ConfigError

from .base import get_detector, list_archs
from .safe_load import InflatingCheckpoint, UnsafeCheckpoint, safe_torch_load

FORMAT = "detserve-v1"
MMYOLO_PREFIX = "bbox_head.head_module."
# present in some non-mmdet exports; mean/std live in our pipeline, so these are dropped
IGNORED_PREFIXES = ("data_preprocessor.",)


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    classes: tuple[str, ...] | None  # None: the caller falls back to COCO_CLASSES
    meta: dict[str, Any] = field(default_factory=dict)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read any supported checkpoint layout. Raises ConfigError on unreadable, unsafe or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        obj = safe_torch_load(path)
    except UnsafeCheckpoint as exc:
        raise ConfigError(f"refusing to load {path}: it would import or call {', '.join(exc.names)}") from None
    except InflatingCheckpoint as exc:
        raise ConfigError(f"refusing to load {path}: {exc}") from None
    except Exception as exc:
        reason = _unpickler_reason(exc)
        if isinstance(exc, pickle.UnpicklingError) and any(m in reason for m in _REFUSAL_MARKERS):
            raise ConfigError(f"refusing to load {path}: {reason}") from None
        raise ConfigError(f"{path} is not a readable PyTorch checkpoint: {reason}") from None
    return parse_checkpoint(obj, source=str(path))


# torch's weights_only unpickler wording for objects it will not build or call
_REFUSAL_MARKERS = ("Unsupported global", "unrecognized function", "Can only", "is blocked", "allowlist")


def _unpickler_reason(exc: Exception) -> str:
    """The informative line of torch's multi-paragraph load error."""
    # torch re-raises with a long preamble; the unpickler's own error rides along as __context__
    inner = exc.__context__ if isinstance(exc, pickle.UnpicklingError) and exc.__context__ else exc
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    for line in lines:
        if any(m in line for m in _REFUSAL_MARKERS):
            return line.split("WeightsUnpickler error:", 1)[-1].strip()
    useful = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation"))]
    return (useful or lines or [type(exc).__name__])[0]


def parse_checkpoint(obj: Any, source: str = "checkpoint") -> Checkpoint:
    """Split an unpickled object into state_dict, classes and meta."""
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{source}: expected a dict, got {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        meta = dict(obj.get("meta") or {})
        classes = obj.get("classes")
        return Checkpoint(_clean_state_dict(obj["state_dict"], source),
                          tuple(str(c) for c in classes) if classes else None, meta)
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            meta = obj.get("meta")
            meta = dict(meta) if isinstance(meta, Mapping) else {}
            return Checkpoint(_clean_state_dict(obj[key], source), classes_from_meta(meta), meta)
    return Checkpoint(_clean_state_dict(obj, source), None, {})


def classes_from_meta(meta: Mapping[str, Any]) -> tuple[str, ...] | None:
    """meta.dataset_meta.classes (CLASSES in 2022 files; keys compared lowercased), else meta.classes."""
    for holder in (meta.get("dataset_meta"), meta):
        if isinstance(holder, Mapping):
            lowered = {str(k).lower(): v for k, v in holder.items()}
            classes = lowered.get("classes")
            if classes:
                return tuple(str(c) for c in classes)
    return None


def _clean_state_dict(state_dict: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = str(key)
        if key.startswith("module."):  # DataParallel / mmengine EMA wrappers
            key = key[len("module."):]
        if key.startswith(IGNORED_PREFIXES):
            continue
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"{source}: state_dict entry {key!r} is {type(value).__name__}, not a tensor")
        cleaned[key] = value
    if not cleaned:
        raise ConfigError(f"{source}: the state_dict is empty")
    if any(k.startswith(MMYOLO_PREFIX) for k in cleaned):
        raise ConfigError(
            f"{source} is an MMYOLO RTMDet checkpoint ({MMYOLO_PREFIX}* keys, BN eps 1e-3); "
            "detserve loads MMDetection RTMDet checkpoints only"
        )
    return cleaned


def save_checkpoint(path: str | Path, state_dict: Mapping[str, torch.Tensor], classes, meta: dict | None = None,
                    fp16: bool = False) -> None:
    """Write detserve's own format atomically. `meta` must hold plain data (it is read back with weights_only)."""
    tensors, converted = {}, {}
    for key, value in state_dict.items():
        # shared head convs appear under several keys: convert each tensor once so the file stores it once
        # (state_dict() gives a fresh tensor per key, so identify them by storage and view)
        ident = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), value.shape,
                 value.stride(), value.dtype)
        if ident not in converted:
            out = value.detach().cpu()
            converted[ident] = out.half() if fp16 and out.is_floating_point() else out
        tensors[key] = converted[ident]
    payload = {
        "format": FORMAT,
        "state_dict": tensors,
        "classes": [str(c) for c in classes] if classes is not None else None,
        "meta": dict(meta or {}),
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def num_classes_in(state_dict: Mapping[str, torch.Tensor], arch: str | None = None) -> int | None:
    """Classes the head was trained for, read by `arch`'s family from its own classifier key; without
    `arch`, by the first family whose key is present. None when no family recognises the weights."""
    if arch is not None:
        return get_detector(arch).num_classes_in(state_dict)
    for name in list_archs():
        found = get_detector(name).num_classes_in(state_dict)
        if found is not None:
            return found
    return None


def load_weights(model: nn.Module, checkpoint: Checkpoint | Mapping[str, torch.Tensor], strict: bool = True):
    """Load into `model`, casting floating tensors to the model's dtypes (fp16 files into fp32 models).

    Raises ConfigError listing missing, unexpected and mis-shaped keys instead of torch's wall of text.
    """
    state_dict = checkpoint.state_dict if isinstance(checkpoint, Checkpoint) else dict(checkpoint)
    expected = model.state_dict()
    casted, mismatched = {}, []
    for key, value in state_dict.items():
        target = expected.get(key)
        if target is not None:
            if target.shape != value.shape:
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
                continue
            if value.is_floating_point() and target.is_floating_point() and value.dtype != target.dtype:
                value = value.to(target.dtype)
        casted[key] = value
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if mismatched or (strict and (missing or unexpected)):
        raise ConfigError(_mismatch_message(missing, unexpected, mismatched, state_dict, expected))
    return model.load_state_dict(casted, strict=strict)


def guess_arch(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The first registered arch whose family says the weights are its own (e.g. RTMDet by stem width)."""
    return next((arch for arch in list_archs() if get_detector(arch).owns(state_dict)), None)


def _mismatch_message(missing, unexpected, mismatched, state_dict, expected, limit: int = 8) -> str:
    parts = ["checkpoint does not fit the model"]
    if len(missing) + len(mismatched) > len(expected) // 2:
        guess = guess_arch(state_dict)
        parts.append("the architecture (arch) differs" + (f": the weights look like {guess}" if guess else ""))
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
            parts.append(f"{len(keys)} {label}: {shown}")
    have, want = num_classes_in(state_dict), num_classes_in(expected)
    if have is not None and want is not None and have != want:
        parts.append(f"the checkpoint has {have} classes, the model {want}")
    return "; ".join(parts)
