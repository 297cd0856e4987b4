from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DetectOptions(_message.Message):
    __slots__ = ("score_thr", "max_dets", "classes", "iou_thr", "class_agnostic", "box_format", "normalized", "mask_format", "tile", "tile_overlap", "tile_merge")
    SCORE_THR_FIELD_NUMBER: _ClassVar[int]
    MAX_DETS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    IOU_THR_FIELD_NUMBER: _ClassVar[int]
    CLASS_AGNOSTIC_FIELD_NUMBER: _ClassVar[int]
    BOX_FORMAT_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    MASK_FORMAT_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    TILE_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    TILE_MERGE_FIELD_NUMBER: _ClassVar[int]
    score_thr: float
    max_dets: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    iou_thr: float
    class_agnostic: bool
    box_format: str
    normalized: bool
    mask_format: str
    tile: str
    tile_overlap: float
    tile_merge: str
    def __init__(self, score_thr: _Optional[float] = ..., max_dets: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., iou_thr: _Optional[float] = ..., class_agnostic: _Optional[bool] = ..., box_format: _Optional[str] = ..., normalized: _Optional[bool] = ..., mask_format: _Optional[str] = ..., tile: _Optional[str] = ..., tile_overlap: _Optional[float] = ..., tile_merge: _Optional[str] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("pixels", "height", "width", "channel_order")
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ORDER_FIELD_NUMBER: _ClassVar[int]
    pixels: bytes
    height: int
    width: int
    channel_order: str
    def __init__(self, pixels: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channel_order: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("model", "image", "options", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: Image
    options: DetectOptions
    request_id: str
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., options: _Optional[_Union[DetectOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class DetectBatchRequest(_message.Message):
    __slots__ = ("model", "images", "options", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    options: DetectOptions
    request_id: str
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., options: _Optional[_Union[DetectOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class BoxXYXY(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class RLEMask(_message.Message):
    __slots__ = ("height", "width", "counts")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    counts: str
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., counts: _Optional[str] = ...) -> None: ...

class Polygon(_message.Message):
    __slots__ = ("points",)
    POINTS_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, points: _Optional[_Iterable[float]] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("label", "class_name", "score", "box", "mask", "bbox", "polygons")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    BBOX_FIELD_NUMBER: _ClassVar[int]
    POLYGONS_FIELD_NUMBER: _ClassVar[int]
    label: int
    class_name: str
    score: float
    box: BoxXYXY
    mask: RLEMask
    bbox: _containers.RepeatedScalarFieldContainer[float]
    polygons: _containers.RepeatedCompositeFieldContainer[Polygon]
    def __init__(self, label: _Optional[int] = ..., class_name: _Optional[str] = ..., score: _Optional[float] = ..., box: _Optional[_Union[BoxXYXY, _Mapping]] = ..., mask: _Optional[_Union[RLEMask, _Mapping]] = ..., bbox: _Optional[_Iterable[float]] = ..., polygons: _Optional[_Iterable[_Union[Polygon, _Mapping]]] = ...) -> None: ...

class DetectResult(_message.Message):
    __slots__ = ("model_name", "model_version", "image_width", "image_height", "detections")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    image_width: int
    image_height: int
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ...) -> None: ...

class DetectBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DetectResult]
    def __init__(self, results: _Optional[_Iterable[_Union[DetectResult, _Mapping]]] = ...) -> None: ...

class StreamFrame(_message.Message):
    __slots__ = ("frame_id", "model", "image", "options")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    model: str
    image: Image
    options: DetectOptions
    def __init__(self, frame_id: _Optional[int] = ..., model: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., options: _Optional[_Union[DetectOptions, _Mapping]] = ...) -> None: ...

class FrameError(_message.Message):
    __slots__ = ("code", "grpc_status", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    GRPC_STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    grpc_status: str
    message: str
    def __init__(self, code: _Optional[str] = ..., grpc_status: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class StreamResult(_message.Message):
    __slots__ = ("frame_id", "result", "error")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    result: DetectResult
    error: FrameError
    def __init__(self, frame_id: _Optional[int] = ..., result: _Optional[_Union[DetectResult, _Mapping]] = ..., error: _Optional[_Union[FrameError, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BatchSettings(_message.Message):
    __slots__ = ("max_batch_size", "max_batch_delay_ms", "max_queue_size", "request_timeout_ms")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_batch_delay_ms: float
    max_queue_size: int
    request_timeout_ms: float
    def __init__(self, max_batch_size: _Optional[int] = ..., max_batch_delay_ms: _Optional[float] = ..., max_queue_size: _Optional[int] = ..., request_timeout_ms: _Optional[float] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "version", "arch", "backend", "classes", "input_size", "has_masks", "ready", "batch", "queue_depth", "default_score_thr")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    HAS_MASKS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SCORE_THR_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    arch: str
    backend: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    input_size: int
    has_masks: bool
    ready: bool
    batch: BatchSettings
    queue_depth: int
    default_score_thr: float
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., arch: _Optional[str] = ..., backend: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., input_size: _Optional[int] = ..., has_masks: _Optional[bool] = ..., ready: _Optional[bool] = ..., batch: _Optional[_Union[BatchSettings, _Mapping]] = ..., queue_depth: _Optional[int] = ..., default_score_thr: _Optional[float] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...
