"""The protocol-neutral data plane every door calls in front of the engine.

One place for what used to be repeated per door with different rules:
- request options (`OPTION_NAMES`: score_thr, max_dets, classes and the issue-18 knobs) parsed from
  whatever the wire carried (query strings, JSON values, protobuf fields) and checked with one set of
  bounds and one message naming the parameter and what it accepts;
- the per-request image cap and the model lookup;
- readiness: start-up, draining and the engine's own view (models loaded, live workers, which
  excludes hung ones), used by /ping, /readyz, KServe ready, gRPC ServerReady and grpc.health;
- request metrics, whose model label is the model's name only once the model is known: a
  client-chosen name must never create a Prometheus series.

Doors stay thin adapters: frame the wire, call `resolve`, `options`, `detect`, `record`, render.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import re
import reprlib
from collections.abc import Awaitable, Sequence
from typing import Any

from .. import errors
from ..observability import metrics
from ..observability.logging import clean_request_id
# The tiling module's own bounds and wording (what [tiling] in model.toml accepts too): one rule for both.
from ..pipeline.tiling import MAX_OVERLAP, MAX_TILE, MIN_TILE, OVERLAP_ALLOWED, TILE_ALLOWED
from ..types import (
    TILE_AUTO, TILE_OFF, BoxFormat, DetectOptions, DetectResult, ImageInput, MaskFormat, ModelInfo, RenderFormat,
    TileMerge,
)
from ..types import Protocol as Door

UNKNOWN_MODEL = metrics.UNKNOWN_MODEL
MAX_DETS_LIMIT = 10_000  # the bound when a model reports no max_per_img (fakes, older engines)
MAX_CLASS_NAMES = 1024
DEFAULT_MAX_IMAGES = 64
# The request options every door reads under these names (query parameters, KServe `parameters`,
# proto fields); `render` is not one of them: each door has its own way to ask for an image.
OPTION_NAMES = ("score_thr", "max_dets", "classes", "iou_thr", "class_agnostic", "box_format", "normalized",
                "mask_format", "tile", "tile_overlap", "tile_merge")


class DataPlane:
    """Wraps an EngineAPI; `starting` and `draining` are set by the server (service/server.py)."""

    def __init__(self, engine, *, max_images_per_request: int = DEFAULT_MAX_IMAGES):
        self.engine = engine
        self.max_images_per_request = max_images_per_request
        self.starting = False
        self.draining = False

    # -- readiness: the one source ------------------------------------------------------------
    def live(self) -> bool:
        return self.starting or self.engine.live()

    def ready(self) -> bool:
        return not (self.starting or self.draining) and self.engine.live() and self.engine.ready()

    def model_ready(self, model: str) -> bool:
        return not (self.starting or self.draining) and self.engine.live() and self.engine.model_ready(model)

    def state(self) -> str:
        """"starting" | "draining" | "ready" | "not ready" | "dead" for /readyz and logs."""
        if self.starting:
            return "starting"
        if not self.engine.live():
            return "dead"
        if self.draining:
            return "draining"
        return "ready" if self.engine.ready() else "not ready"

    # -- validation -------------------------------------------------------------------------
    def resolve(self, model: str, version: str | None = None) -> ModelInfo:
        """The model's info, or the error a client should see (503 while starting, 404 unknown)."""
        if self.starting or not self.engine.live():
            raise errors.ModelNotReady("the server is starting or stopping; retry shortly")
        info = self.engine.model_info(model)
        if version and version != info.version:
            raise errors.ModelNotFound(f"model {model!r} has no version {version!r}; the loaded version is {info.version!r}")
        return info

    def options(self, info: ModelInfo, *, score_thr: Any = None, max_dets: Any = None, classes: Any = None,
                render: RenderFormat | None = None, iou_thr: Any = None, class_agnostic: Any = None,
                box_format: Any = None, normalized: Any = None, mask_format: Any = None, tile: Any = None,
                tile_overlap: Any = None, tile_merge: Any = None) -> DetectOptions:
        """Options from raw wire values (str, int, float, list...); InvalidRequest names the field.
        None (or an empty string from a query or proto field, for the knobs) means the model's default."""
        return dataclasses.replace(
            knob_options(iou_thr=iou_thr, class_agnostic=class_agnostic, box_format=box_format, normalized=normalized,
                         mask_format=mask_format, tile=tile, tile_overlap=tile_overlap, tile_merge=tile_merge),
            score_thr=_score_thr(score_thr),
            max_dets=_max_dets(max_dets, info.max_per_img),
            classes=_classes(classes, info.classes),
            render=render,
        )

    def options_from(self, info: ModelInfo, params: Any, *, render: RenderFormat | None = None) -> DetectOptions:
        """`options` from a mapping keyed by OPTION_NAMES (query dict, KServe parameters); other keys
        are left alone, as every door has always ignored parameters it does not know."""
        return self.options(info, render=render, **{name: params.get(name) for name in OPTION_NAMES})

    def check_images(self, count: int) -> None:
        if count == 0:
            raise errors.InvalidRequest("no images in the request")
        if count > self.max_images_per_request:
            raise errors.PayloadTooLarge(
                f"{count} images in one request; at most max_images_per_request ({self.max_images_per_request}) are accepted")

    def detect(self, model: str, images: Sequence[ImageInput], options: DetectOptions, *,
               protocol: Door, request_id: str | None = None,
               timeout_s: float | None = None) -> Awaitable[list[DetectResult]]:
        """The engine's awaitable, returned rather than awaited here: no extra coroutine per request.
        Draining does not refuse: a request accepted before the drain (still uploading, say)
        completes; the listeners stop taking new connections and the engine refuses once it stops."""
        self.check_images(len(images))
        if request_id is not None:
            # A client's id reaches logs and error messages: long or unprintable ones are replaced
            # here, for every door (REST already did so for its header; gRPC ids were unbounded).
            request_id = clean_request_id(request_id)
        return self.engine.detect(model, images, options, protocol=protocol, request_id=request_id,
                                  timeout_s=timeout_s)

    # -- metrics ----------------------------------------------------------------------------
    def metric_label(self, model: str | None) -> str:
        if not model:
            return UNKNOWN_MODEL
        has_model = getattr(self.engine, "has_model", None)
        if has_model is not None:
            return model if has_model(model) else UNKNOWN_MODEL
        try:  # engines without has_model (test fakes): ask for the info
            self.engine.model_info(model)
        except Exception:  # noqa: BLE001 - unknown, or an engine that cannot tell
            return UNKNOWN_MODEL
        return model

    def record(self, model: str | None, protocol: str, code: int | str, seconds: float | None) -> None:
        metrics.record_request(self.metric_label(model), protocol, code, seconds)


def dataplane_for(state) -> DataPlane:
    """The app's (or servicer's) data plane, made on first use around `state.engine` when the
    builder did not install one (tests that mount a single router)."""
    dp = getattr(state, "dataplane", None)
    if dp is None:
        dp = state.dataplane = DataPlane(state.engine)
    return dp


# ---- option parsers: one rule and one message per field ------------------------------------

def knob_options(*, iou_thr: Any = None, class_agnostic: Any = None, box_format: Any = None, normalized: Any = None,
                 mask_format: Any = None, tile: Any = None, tile_overlap: Any = None,
                 tile_merge: Any = None) -> DetectOptions:
    """The issue-18 knobs alone, which need no model to check (`detserve predict` checks its flags here)."""
    return DetectOptions(
        iou_thr=_iou_thr(_unset_if_empty(iou_thr)),
        class_agnostic=_bool("class_agnostic", _unset_if_empty(class_agnostic)),
        box_format=_choice("box_format", _unset_if_empty(box_format), BoxFormat),
        normalized=_bool("normalized", _unset_if_empty(normalized)),
        mask_format=_choice("mask_format", _unset_if_empty(mask_format), MaskFormat),
        tile=_tile(_unset_if_empty(tile)),
        tile_overlap=_tile_overlap(_unset_if_empty(tile_overlap)),
        tile_merge=_choice("tile_merge", _unset_if_empty(tile_merge), TileMerge),
    )


# float() also takes "１", "1_0", "nan" and "infinity": a query value is a plain decimal or it is refused.
_DECIMAL = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*", re.ASCII)


def decimal(text: str | bytes) -> float | None:
    """A client's number written as a plain ASCII decimal (1, 0.5, 2e3), else None."""
    text = _text(text)
    return float(text) if _DECIMAL.fullmatch(text) else None


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool):
        raise errors.InvalidRequest(f"{field} must be a number, got a boolean")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, (str, bytes)):
        number = decimal(value)
        if number is None:
            finite = " finite" if _text(value).strip().lower().lstrip("+-") in ("nan", "inf", "infinity") else ""
            raise errors.InvalidRequest(f"{field} must be a{finite} number, got {_show(value)}")
    else:
        raise errors.InvalidRequest(f"{field} must be a number, got {type(value).__name__}")
    if not math.isfinite(number):
        raise errors.InvalidRequest(f"{field} must be a finite number, got {_show(value)}")
    return number


def _score_thr(value: Any) -> float | None:
    if value is None:
        return None
    score_thr = _number("score_thr", value)
    if not 0.0 <= score_thr <= 1.0:
        raise errors.InvalidRequest(f"score_thr must be within [0, 1], got {_show(value)}")
    return score_thr


def _max_dets(value: Any, cap: int | None) -> int | None:
    if value is None:
        return None
    number = _number("max_dets", value)
    if number != int(number):
        raise errors.InvalidRequest(f"max_dets must be a whole number, got {_show(value)}")
    limit = cap or MAX_DETS_LIMIT
    if not 1 <= number <= limit:
        where = "this model's test_cfg.max_per_img" if cap else "the limit"
        raise errors.InvalidRequest(f"max_dets must be within [1, {limit}] ({where}), got {_show(value)}")
    return int(number)


def check_class_count(count: int) -> None:
    """On the names as sent, before they are stripped and deduplicated (and, on gRPC, before the
    repeated field becomes a list): 16 MiB of empty names are millions of them."""
    if count > MAX_CLASS_NAMES:
        raise errors.InvalidRequest(f"classes: at most {MAX_CLASS_NAMES} names, got {count}")


def _classes(value: Any, known: Sequence[str]) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        check_class_count(value.count(",") + 1)
        names = [n.strip() for n in value.split(",")]
    elif isinstance(value, (list, tuple)):
        check_class_count(len(value))
        if not all(isinstance(n, str) for n in value):
            raise errors.InvalidRequest("classes must be a comma-separated string or a list of class-name strings")
        names = [n.strip() for n in value]
    else:
        raise errors.InvalidRequest(
            f"classes must be a comma-separated string or a list of class-name strings, got {type(value).__name__}")
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise errors.InvalidRequest("classes: give one or more class names")
    unknown = [n for n in names if known and n not in known]
    if unknown:
        shown = list(known[:20]) + (["..."] if len(known) > 20 else [])
        raise errors.InvalidRequest(f"classes: unknown class name(s) {_show(unknown)}; this model knows {shown}")
    return tuple(names)


def _unset_if_empty(value: Any) -> Any:
    """Query strings and proto3 strings cannot say "unset" other than by being empty."""
    return None if isinstance(value, (str, bytes)) and not value.strip() else value


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _iou_thr(value: Any) -> float | None:
    if value is None:
        return None
    iou = _number("iou_thr", value)
    if not 0.0 < iou <= 1.0:
        raise errors.InvalidRequest(f"iou_thr must be within (0, 1] (greater than 0, at most 1), got {_show(value)}")
    return iou


_TRUE, _FALSE = ("true", "1"), ("false", "0")


def _bool(field: str, value: Any) -> bool | None:
    """JSON/proto booleans, and true/false/1/0 from query strings (any case)."""
    if value is None or isinstance(value, bool):
        return value
    value = _text(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise errors.InvalidRequest(f"{field} must be one of true, false, 1, 0, got {_show(value)}")


def _choice(field: str, value: Any, kind: type[enum.Enum]) -> Any:
    if value is None:
        return None
    value = _text(value)
    allowed = [member.value for member in kind]
    if isinstance(value, str) and value.strip().lower() in allowed:
        return kind(value.strip().lower())
    raise errors.InvalidRequest(f"{field} must be one of {', '.join(allowed)}, got {_show(value)}")


def _tile(value: Any) -> int | str | None:
    if value is None:
        return None
    value = _text(value)
    if isinstance(value, str) and value.strip().lower() in (TILE_AUTO, TILE_OFF):
        return value.strip().lower()
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise errors.InvalidRequest(f"tile must be {TILE_ALLOWED}, got {_show(value)}")
    side = decimal(value) if isinstance(value, str) else float(value)
    if side is None or not math.isfinite(side) or side != int(side) or not MIN_TILE <= side <= MAX_TILE:
        raise errors.InvalidRequest(f"tile must be {TILE_ALLOWED}, got {_show(value)}")
    return int(side)


def _tile_overlap(value: Any) -> float | None:
    if value is None:
        return None
    overlap = _number("tile_overlap", value)
    if not 0.0 <= overlap <= MAX_OVERLAP:
        raise errors.InvalidRequest(f"tile_overlap must be {OVERLAP_ALLOWED}, got {_show(value)}")
    return overlap


_SHOW = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxother = 2, 4, 4, 60, 60


def _show(value: Any, limit: int = 80) -> str:
    """A client value for an error message, cut short: messages must stay bounded too. reprlib
    stops two levels in: repr() of a JSON value nested 1,000 deep is a RecursionError."""
    text = _SHOW.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
