"""Protocol-neutral request and result types.

Every door (REST, gRPC, KServe V2, Label Studio, the CLI) builds these and renders them; none of
them knows about FastAPI, protobuf or torch. They cross the process boundary to the workers, so
they are plain dataclasses that pickle cheaply.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Protocol(str, enum.Enum):
    """Which door a request came through; a label on metrics and logs."""

    REST = "rest"
    KSERVE_REST = "kserve_rest"
    KSERVE_GRPC = "kserve_grpc"
    GRPC = "grpc"
    LABELSTUDIO = "labelstudio"
    CLI = "cli"


class Priority(enum.IntEnum):
    """Scheduling priority of an engine request: lower goes first. Background jobs use LOW so that
    requests from the inference doors never wait behind them."""

    NORMAL = 0
    LOW = 1


class RenderFormat(str, enum.Enum):
    JPEG = "jpeg"
    PNG = "png"


class BoxFormat(str, enum.Enum):
    """How a door writes a box: corners, corner + size (COCO), or centre + size (YOLO)."""

    XYXY = "xyxy"
    XYWH = "xywh"
    CXCYWH = "cxcywh"


class MaskFormat(str, enum.Enum):
    RLE = "rle"  # COCO compressed RLE, original-image pixels
    POLYGON = "polygon"  # outer contours as flat [x0, y0, x1, y1, ...] lists, original-image pixels
    NONE = "none"  # no masks: the worker skips pasting them


class TileMerge(str, enum.Enum):
    """How detections of overlapping tiles are merged (docs/tiling.md)."""

    NMS = "nms"  # class-wise greedy non-maximum suppression: the best box of a cluster survives
    NMM = "nmm"  # greedy non-maximum merging (SAHI): a cluster becomes the union of its boxes and masks


TILE_AUTO = "auto"
TILE_OFF = "off"


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """An encoded file (JPEG, PNG, WebP, BMP) exactly as the client sent it."""

    data: bytes


@dataclass(frozen=True, slots=True)
class RawImage:
    """Decoded pixels, uint8, HWC, row-major; `channel_order` is "RGB" or "BGR"."""

    pixels: bytes
    height: int
    width: int
    channel_order: str = "RGB"


ImageInput = EncodedImage | RawImage


@dataclass(frozen=True, slots=True)
class DetectOptions:
    """Per-request postprocessing knobs. None means: use the model's configured default."""

    score_thr: float | None = None
    max_dets: int | None = None
    classes: tuple[str, ...] | None = None  # keep only these class names
    render: RenderFormat | None = None  # also return the annotated image in this format
    # NMS re-done per request on the network's raw outputs (the network is not run again).
    iou_thr: float | None = None
    class_agnostic: bool | None = None  # one NMS over all classes instead of one per class
    # How the door writes results; detections themselves are always xyxy in original pixels.
    box_format: BoxFormat | None = None
    normalized: bool | None = None  # boxes divided by the image width/height
    mask_format: MaskFormat | None = None
    # Sliced inference (docs/tiling.md): TILE_AUTO, TILE_OFF or a tile side in pixels (int).
    tile: int | str | None = None
    tile_overlap: float | None = None  # fraction of the tile side shared with the next tile, [0, 0.5]
    tile_merge: TileMerge | None = None


@dataclass(frozen=True, slots=True)
class RLEMask:
    """COCO run-length encoding in original-image coordinates (pycocotools' compressed string)."""

    height: int
    width: int
    counts: str

    def to_coco(self) -> dict:
        return {"size": [self.height, self.width], "counts": self.counts}


@dataclass(frozen=True, slots=True)
class Detection:
    label: int  # index into the model's class list
    class_name: str
    score: float
    box_xyxy: tuple[float, float, float, float]  # original-image pixels
    mask: RLEMask | None = None
    # mask_format=polygon: outer contours as flat (x0, y0, x1, y1, ...) in original pixels, biggest
    # first; `mask` is then None (the worker converts, the front only moves numbers).
    polygons: tuple[tuple[float, ...], ...] | None = None

    def to_torchserve(self) -> dict:
        """The MMDetection TorchServe handler's JSON shape, plus `segmentation` for mask models."""
        out = {
            "class_label": self.label,
            "class_name": self.class_name,
            "bbox": [round(v, 2) for v in self.box_xyxy],
            "score": round(self.score, 5),
        }
        if self.mask is not None:
            out["segmentation"] = self.mask.to_coco()
        if self.polygons is not None:
            out["polygons"] = [list(p) for p in self.polygons]
        return out


@dataclass(slots=True)
class StageTimes:
    """Seconds spent per stage inside the worker; feeds the latency histograms."""

    decode: float = 0.0
    preprocess: float = 0.0
    inference: float = 0.0
    postprocess: float = 0.0


@dataclass(slots=True)
class DetectResult:
    """Detections for one image, sorted by descending score."""

    detections: list[Detection]
    image_width: int
    image_height: int
    model_name: str = ""
    model_version: str = ""
    rendered: bytes | None = None  # annotated image when DetectOptions.render was set
    times: StageTimes = field(default_factory=StageTimes)

    def to_torchserve(self) -> list[dict]:
        return [d.to_torchserve() for d in self.detections]


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    worker_id: int
    pid: int | None
    device: str
    state: str  # "starting" | "ready" | "busy" | "restarting" | "stopped"
    restarts: int = 0
    in_flight: int = 0
    responsive: bool = True  # False after missed heartbeats: not live until it beats again or is killed


@dataclass(frozen=True, slots=True)
class BatchSettings:
    max_batch_size: int = 8
    max_batch_delay_ms: float = 0.0
    max_queue_size: int = 256
    request_timeout_ms: float = 30_000.0


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the management API, KServe metadata and gRPC ModelInfo report."""

    name: str
    version: str  # stable: model name plus a short hash of the weights
    arch: str
    backend: str
    classes: tuple[str, ...]
    input_size: int
    has_masks: bool
    ready: bool
    batch: BatchSettings
    workers: tuple[WorkerStatus, ...] = ()
    queue_depth: int = 0
    default_score_thr: float = 0.3
    max_per_img: int | None = None  # test_cfg.max_per_img: the most detections one image returns
    backend_reason: str = ""  # why `backend` runs (backend = "auto" explains its choice or its fallback)
