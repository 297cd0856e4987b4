"""One typed, validated configuration tree: the server (file + DETSERVE_* env) and each model's
`model.toml`. Validation happens at start-up; an error names the field and the allowed values.
"""
from __future__ import annotations

import enum
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError, ModelNotFound
from .types import TileMerge

MODEL_CONFIG_FILE = "model.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendKind(str, enum.Enum):
    AUTO = "auto"  # resolved in the worker at load: ONNX Runtime (TensorRT/CUDA/CPU EP) when parity holds, else eager
    EAGER = "eager"
    ONNXRUNTIME = "onnxruntime"


class RPNTestConfig(_Strict):
    """Two-stage families only: the RPN's proposal selection (mmdet `test_cfg.rpn`, defaults mmdet's)."""

    nms_pre: int = Field(1000, ge=1, le=10_000)  # per level
    max_per_img: int = Field(1000, ge=1, le=10_000)
    iou_threshold: float = Field(0.7, gt=0, le=1)


class TestConfig(_Strict):
    """MMDetection's `test_cfg`. Defaults are the README's deployment values, not the COCO-eval ones.

    For two-stage families the top-level fields are `test_cfg.rcnn` (mmdet uses iou_threshold = 0.5 there)
    and `rpn` is the proposal stage; single-stage families ignore `rpn`.
    """

    nms_pre: int = Field(1000, ge=1)
    min_bbox_size: float = Field(0.0, ge=0)
    score_thr: float = Field(0.05, ge=0, le=1)
    iou_threshold: float = Field(0.65, gt=0, le=1)
    class_agnostic: bool = False  # mmdet's nms.class_agnostic: one NMS over all classes
    max_per_img: int = Field(100, ge=1)
    mask_thr_binary: float = Field(0.5, ge=0, le=1)
    # Upstream clamps boxes to the padded input only, so a box can reach past the image edge.
    # Clipping to the original image is our default; turn it off for exact mmdet parity.
    clip_to_image: bool = True
    rpn: RPNTestConfig = RPNTestConfig()


class BatchConfig(_Strict):
    max_batch_size: int = Field(8, ge=1, le=1024)
    max_batch_delay_ms: float = Field(0.0, ge=0, le=10_000)  # 0: never wait while a worker is idle
    # Bounded even though only model.toml and the management API set them: a queue of a billion
    # items or an infinite deadline is a typo, and the deadline also bounds how long a stuck batch
    # may hold a worker before the pool kills it.
    max_queue_size: int = Field(256, ge=1, le=100_000)
    request_timeout_ms: float = Field(30_000.0, gt=0, le=3_600_000, allow_inf_nan=False)


class TilingConfig(_Strict):
    """`[tiling]`: the model's default for sliced inference (docs/tiling.md); a request's tile,
    tile_overlap and tile_merge options override mode, overlap and merge."""

    # "off": never (the default: tiling multiplies the cost of an image by its tile count, so it is
    # asked for, not sprung on clients); "auto": only images whose long side exceeds auto_above x the
    # input size; a number: tiles of that side for any image longer than it.
    mode: Literal["auto", "off"] | Annotated[int, Field(ge=32, le=8192)] = "off"
    tile_size: int | None = Field(None, ge=32, le=8192)  # the side `auto` uses; None: input_size
    auto_above: float = Field(2.0, ge=1.0, le=100.0)
    overlap: float = Field(0.2, ge=0.0, le=0.5)  # fraction of the side shared by neighbouring tiles
    merge: TileMerge = TileMerge.NMS
    match_threshold: float = Field(0.5, gt=0.0, le=1.0)  # IoU (whole boxes) / IoS (cut boxes) that merges
    full_pass: bool = True  # one more item: the whole image, for objects larger than a tile
    max_tiles: int = Field(256, ge=1, le=4096)  # per image; more is refused with 413
    # Detections a tiled image returns at most when the request sets no max_dets (test_cfg.max_per_img
    # bounds each tile): a 4000x3000 image holds more objects than one 320 px view.
    max_dets: int = Field(1000, ge=1, le=100_000)


class WorkerConfig(_Strict):
    count: int = Field(1, ge=0, le=64)
    devices: list[str] = Field(default_factory=list)  # e.g. ["cuda:0", "cuda:1"]; empty: auto
    threads: int = Field(0, ge=0)  # torch/ORT intra-op threads per worker; 0: see threads_per_worker
    # With `threads` unset and two or more CPU workers: a batch that starts while no other worker of the
    # model is busy runs on every core, one that starts beside a busy worker on the worker's share
    # (see wide_threads). Costs a second ONNX Runtime session per worker; off: always the share.
    elastic: bool = True
    # Before it reports ready, each worker runs blank images at the working shape, one and then a
    # batch of max_batch_size (skipped when it would not fit in half of worker_start_timeout_s): the
    # first client after a start or a restart does not pay for lazy kernel and allocator set-up, and
    # the process is at its working memory from the start (engine/worker.py warm_up).
    warmup: bool = True

    def threads_per_worker(self, count: int | None = None) -> int:
        """`threads`, else the cores this process may use split between `count` workers (default:
        `self.count`). No core is held back for the front process: it needs a fraction of one.

        Measured, not assumed (`make bench`, section "Thread placement", 2026-12-01, bundled rtmdet at
        320, backend auto = ONNX Runtime, 2 cores, nothing pinned, wrk with the bench corpus):
            1 worker x 1 thread     c16 14.1 img/s   c1 p50 78.2 ms   (the old rule, cores - 1)
            1 worker x 2 threads    c16 21.4 img/s   c1 p50 61.3 ms   <- this rule
            2 workers x 1 thread    c16 23.3 img/s   c1 p50 81.9 ms
        Two workers win 9% at c16 and lose 34% at c1, and double the memory; one worker with every
        core is the default, `workers.count` the knob for throughput-only deployments.
        Again on a faster 2-core VM (2026-12-02, A/B of the two layouts in one server, 3 alternating
        rounds, medians): 1 x 2 c16 46.8 img/s, c1 p50 28.8 ms; 2 x 1 c16 60.2 img/s (+29%), c1 p50
        34.2 ms (+19%). The default count stays 1: half the memory (a Mask R-CNN worker is gigabytes).
        Two workers no longer cost the c1 latency, though: an elastic worker (wide_threads) takes every
        core while the other is idle, so the small bundled rtmdet ships two (models/rtmdet/model.toml).
        Elastic vs 1 x 2 on one server (2026-12-03, 5 alternating rounds, medians): c16 27.9 vs 24.0
        img/s, c1 p50 51.7 vs 51.1 ms (2 x 1 fixed: 25.9 img/s, 69.5 ms).
        """
        if self.threads:
            return self.threads
        workers = self.count if count is None else count
        return max(1, available_cores() // max(1, workers))

    def wide_threads(self, share: int) -> int:
        """Threads for a batch that starts while no other worker of the model is busy, for a worker whose
        share is `share`: every core this process may use when `elastic` and `threads` unset, else 0
        (the share always).

        Why: on CPU, two workers of one thread each out-run one worker of two threads at high load (ONNX
        Runtime's second thread buys ~1.7x, a second stream 2x), while a lone request is fastest on every
        core. A worker that takes a batch while the other is idle gets both cores; at load both run on
        their share. Measured on one server in alternating rounds (bench/analysis.md, 2026-12-03: c16
        27.9 vs 24.0 img/s against one worker of two threads, c1 p50 51.7 vs 51.1 ms); `make bench`'s
        "Thread placement" rows (`elastic`) did not separate the two in their run (26.8 vs 26.7).
        """
        if self.threads or not self.elastic:
            return 0
        cores = available_cores()
        return cores if cores > share else 0


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota.

    A Kubernetes pod with `limits.cpu: 2` on a 64-core node sees 64 cores in its affinity mask; 64
    intra-op threads against a 2-core quota are throttled for most of each period, so the quota
    (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`), rounded up, wins.
    """
    import math
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota(root: Path) -> float | None:
    """The CPU quota in cores, or None when there is none (or no cgroup filesystem to read)."""
    try:
        fields = (root / "cpu.max").read_text().split()  # v2: "<quota|max> <period>"
        if len(fields) == 2 and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:  # v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


class EagerConfig(_Strict):
    fp16: bool = False  # CUDA only
    # None: on where it measured faster (CPU; see service/backends/eager.py), off on CUDA until measured there.
    channels_last: bool | None = None
    fold_batchnorm: bool = True  # fold each conv's BatchNorm into its weights at load (service/backends/fold.py)
    compile: bool = False  # torch.compile with fixed batch buckets
    cuda_graphs: bool = False


class OnnxRuntimeConfig(_Strict):
    model: str = "model.onnx"
    providers: list[str] = Field(default_factory=lambda: ["tensorrt", "cuda", "cpu"])
    trt_fp16: bool = True
    trt_cache_dir: str = "trt_cache"
    end2end: bool = False  # the graph holds decode + NMS (MMDeploy's end2end.onnx layout)

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        allowed = {"tensorrt", "cuda", "cpu"}
        bad = [p for p in value if p not in allowed]
        if bad:
            raise ValueError(f"unknown provider(s) {bad}; allowed: {sorted(allowed)}")
        return value


class ModelConfig(_Strict):
    """The contents of `models/<name>/model.toml`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    arch: str  # a registry name such as "rtmdet-tiny", "rtmdet-ins-s" or "null"
    weights: str | None = None  # file in the model folder; None only for weightless archs
    classes: list[str] | None = None  # else from the checkpoint meta, else the 80 COCO names
    classes_file: str | None = None  # one class per line, alternative to `classes`
    input_size: int = Field(640, ge=32, le=4096)
    # Keep-ratio resize bound (long edge, short edge) for families that resize that way (two-stage R-CNN);
    # None: the family's default (1333, 800). Square-input families (RTMDet) use input_size and ignore it.
    resize_scale: tuple[int, int] | None = None
    backend: BackendKind = BackendKind.AUTO
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    default_score_thr: float = Field(0.3, ge=0, le=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    test_cfg: TestConfig = TestConfig()
    batch: BatchConfig = BatchConfig()
    workers: WorkerConfig = WorkerConfig()
    eager: EagerConfig = EagerConfig()
    onnxruntime: OnnxRuntimeConfig = OnnxRuntimeConfig()
    tiling: TilingConfig = TilingConfig()

    @field_validator("weights", "classes_file")
    @classmethod
    def _inside_the_folder(cls, value: str | None) -> str | None:
        from pathlib import PurePath

        if value is not None and ".." in PurePath(value).parts:
            # A relative path names a file of the model folder; an absolute one is the operator's
            # explicit choice (a shared weights volume). Climbing out with '..' is neither.
            raise ValueError(f"{value!r} climbs out of the model folder: give a file in it or an absolute path")
        return value

    @field_validator("resize_scale")
    @classmethod
    def _bounded_scale(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not all(32 <= edge <= 4096 for edge in value):
            raise ValueError(f"resize_scale edges must be within [32, 4096], got {list(value)}")
        return value

    # Set by the loader, not by the file: where the model folder lives.
    root: Annotated[Path, Field(exclude=True)] = Path(".")

    def path(self, relative: str) -> Path:
        return (self.root / relative).resolve()


def format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        parts.append(f"{source}: field '{loc}': {e['msg']}")
    return "\n".join(parts)


def load_model_config(folder: str | Path, **overrides) -> ModelConfig:
    """Read and validate `folder/model.toml`; raise ConfigError naming the bad field."""
    folder = Path(folder)
    path = folder / MODEL_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no {MODEL_CONFIG_FILE} in model folder")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    data.setdefault("name", folder.name)
    data.update(overrides)
    try:
        return ModelConfig(**data, root=folder.resolve())
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None


# The model a request or command that names none gets when nothing else decides (docs/api.md):
# `make serve` sets DETSERVE_DEFAULT_MODEL to it, and a fresh clone's store holds it.
BUNDLED_DEFAULT_MODEL = "rtmdet"


def default_model_name(configured: str | None, available: Sequence[str]) -> str:
    """The default model, the one rule for every entry point (the gRPC doors, `detserve predict`):
    `default_model` (DETSERVE_DEFAULT_MODEL) when set, else the only model there is, else the
    bundled default when it is there. ModelNotFound otherwise, listing what there is."""
    if configured:
        return configured
    names = list(available)
    if len(names) == 1:
        return names[0]
    if BUNDLED_DEFAULT_MODEL in names:
        return BUNDLED_DEFAULT_MODEL
    raise ModelNotFound(f"no model given and no default model configured (default_model / DETSERVE_DEFAULT_MODEL); "
                        f"models: {names[:20]}")


def discover_models(store: str | Path) -> dict[str, Path]:
    """Model folders in the store, by name (the folder name)."""
    store = Path(store)
    if not store.is_dir():
        return {}
    return {p.name: p for p in sorted(store.iterdir()) if (p / MODEL_CONFIG_FILE).is_file()}


class AuthSettings(_Strict):
    """Bearer tokens; an empty set means that API is open. Files hold one token per line."""

    inference_tokens: list[str] = Field(default_factory=list)
    management_tokens: list[str] = Field(default_factory=list)
    inference_tokens_file: Path | None = None
    management_tokens_file: Path | None = None
    protect_health: bool = False
    protect_metrics: bool = False


class LabelStudioJobSettings(_Strict):
    """Background pre-annotation jobs (`/labelstudio/{model}/jobs`, docs/labelstudio.md#jobs)."""

    # SQLite file holding jobs and per-task progress; unset: <cache dir>/labelstudio-jobs.sqlite3.
    # Never inside the model store, which may be read-only.
    store_path: Path | None = None
    # tasks read from Label Studio per request; at most 500: a page of 1000 makes 1.23.2 on SQLite answer 500
    page_size: int = Field(100, ge=1, le=500)
    max_in_flight: int = Field(32, ge=1, le=1024)  # images of one job queued or running in the engine
    max_ls_requests: int = Field(4, ge=1, le=64)  # concurrent API calls to Label Studio, all jobs together
    max_running_jobs: int = Field(2, ge=1, le=32)  # more wait in state "queued"
    max_task_ids: int = Field(100_000, ge=1, le=10_000_000)  # tasks one job may cover
    max_filter_bytes: int = Field(16 * 1024, ge=64, le=1024 * 1024)  # a Data Manager filter, as JSON
    max_jobs_kept: int = Field(1000, ge=1)  # finished jobs beyond this are forgotten, oldest first
    retry_initial_s: float = Field(1.0, gt=0)  # Label Studio down or engine full: first wait
    retry_max_s: float = Field(60.0, gt=0)  # ... doubling up to this
    give_up_after_s: float = Field(3600.0, gt=0)  # Label Studio unreachable this long: the job fails
    # Projects whose TASKS_CREATED webhook queues a job for the new tasks (pre-annotate on import).
    on_import_projects: list[int] = Field(default_factory=list)
    # Predictions written per Label Studio request (its predictions import); 1 writes each task
    # with its own POST /api/predictions.
    write_batch: int = Field(100, ge=1, le=500)


class LabelStudioSettings(_Strict):
    """The Label Studio ML backend (`/labelstudio/{model}`). Security notes: docs/deploy.md#security."""

    url: str | None = None  # LABEL_STUDIO_URL: where /data/upload/... lives; the only host that gets api_key
    api_key: str | None = None  # LABEL_STUDIO_API_KEY: legacy token or personal access token (JWT)
    document_root: Path | None = None  # LOCAL_FILES_DOCUMENT_ROOT for /data/local-files/?d=
    # Label Studio's upload folder (<its data dir>/media/upload) when detserve can read it (a shared
    # volume): jobs read /data/upload/... images from there instead of through Label Studio.
    upload_root: Path | None = None
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    # /setup's `hostname` and `access_token` are chosen by whoever calls /setup: used only when no url
    # is configured and this is set, and then never with the configured api_key.
    allow_setup_hostname: bool = False
    # With inference bearer tokens on, the routes need Basic auth (Label Studio sends no bearer
    # tokens) or a bearer token; this opts out and leaves them open.
    allow_unauthenticated: bool = False
    # Task image hosts that may resolve to loopback, private, link-local or other non-public
    # addresses: CIDRs ("10.0.0.0/8", "127.0.0.1/32") or host names ("minio.internal"). The url's host
    # is always allowed.
    fetch_allow: list[str] = Field(default_factory=list)
    fetch_timeout_s: float = Field(10.0, gt=0)
    fetch_max_redirects: int = Field(5, ge=0, le=20)
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_call_bytes: int = Field(128 * 1024 * 1024, ge=1)  # fetched image bytes held at once by one /predict
    max_inflight_bytes: int = Field(256 * 1024 * 1024, ge=1)  # ... and by all /predict calls together
    max_concurrent_fetches: int = Field(16, ge=1, le=1024)  # per /predict call
    max_tasks: int = Field(10_000, ge=1)  # tasks in one /predict call
    # JSON one /predict answer may hold (one task's prediction, for jobs): it is built in memory
    # before it is sent, and a brush region of a large image is kilobytes.
    max_answer_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_projects: int = Field(256, ge=1)  # /setup configs remembered (least recently used dropped)
    max_label_config_bytes: int = Field(512 * 1024, ge=64)
    jobs: LabelStudioJobSettings = LabelStudioJobSettings()

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, url: str | None) -> str | None:
        import urllib.parse

        if url is not None and "@" in urllib.parse.urlsplit(url).netloc:
            # httpx would send them as Basic auth in place of api_key, and URLs reach logs.
            raise ValueError("must not carry user:password@; give Label Studio's token in labelstudio.api_key "
                             "(LABEL_STUDIO_API_KEY)")
        return url

    @field_validator("fetch_allow")
    @classmethod
    def _allow_entries(cls, entries: list[str]) -> list[str]:
        import ipaddress
        import re

        for entry in entries:
            try:
                ipaddress.ip_network(entry, strict=False)
                continue
            except ValueError:
                pass
            if entry.replace(".", "").isdigit() or not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", entry):
                raise ValueError(f"{entry!r} is neither a CIDR or IP address ('10.0.0.0/8') nor a host name")
        return entries

    @model_validator(mode="after")
    def _budgets_fit_an_image(self) -> "LabelStudioSettings":
        for field in ("max_call_bytes", "max_inflight_bytes"):
            if getattr(self, field) < self.max_image_bytes:
                raise ValueError(
                    f"{field} ({getattr(self, field)}) must be >= max_image_bytes ({self.max_image_bytes}), "
                    "or no image of the allowed size could ever be fetched"
                )
        return self


class ServerLimits(_Strict):
    """Per-connection bounds of the HTTP listeners (the security section of docs/deploy.md says what each defends)."""

    max_header_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)  # request line + all headers
    max_headers: int = Field(100, ge=8, le=10_000)
    header_timeout_s: float = Field(10.0, gt=0, le=3600)  # connect (or end of previous request) to end of headers
    body_timeout_s: float = Field(60.0, gt=0, le=3600)  # end of headers to end of body
    keep_alive_timeout_s: float = Field(5.0, gt=0, le=3600)  # idle keep-alive connection
    send_timeout_s: float = Field(60.0, gt=0, le=3600)  # an answer's unsent bytes not read by the client at all
    max_connections: int | None = Field(None, ge=1)  # concurrent connections + tasks per listener (uvicorn's limit_concurrency)


class ServerSettings(BaseSettings):
    """Server configuration: defaults < `--config` TOML file < DETSERVE_* environment < CLI flags.

    Nested fields use a double underscore: DETSERVE_AUTH__INFERENCE_TOKENS='["t1"]'.
    """

    model_config = SettingsConfigDict(env_prefix="DETSERVE_", env_nested_delimiter="__", extra="forbid")

    model_store: Path = Path("models")
    models: list[str] | None = None  # names to load at start-up; None: every folder in the store
    default_model: str | None = None

    inference_address: str = "0.0.0.0"
    inference_port: int = Field(8080, ge=0, le=65535)
    management_address: str = "127.0.0.1"  # closed to the network unless configured otherwise
    management_port: int = Field(8081, ge=0, le=65535)
    metrics_address: str = "0.0.0.0"
    metrics_port: int = Field(8082, ge=0, le=65535)
    grpc_address: str = "0.0.0.0"
    grpc_port: int = Field(7070, ge=0, le=65535)
    enable_grpc: bool = True

    max_request_size: int = Field(16 * 1024 * 1024, ge=1)  # bytes per HTTP/gRPC request body
    max_images_per_request: int = Field(64, ge=1, le=4096)  # every door; a model's max_queue_size also caps it
    limits: ServerLimits = ServerLimits()
    drain_timeout_s: float = Field(30.0, ge=0)
    heartbeat_interval_s: float = Field(1.0, gt=0)
    # A worker silent this long is killed, its batch retried elsewhere, and it is restarted. It stops
    # counting as live (readiness, dispatch) after HEARTBEAT_MISSES_UNTIL_SUSPECT missed beats already.
    heartbeat_timeout_s: float = Field(4.0, gt=0)
    worker_start_timeout_s: float = Field(120.0, gt=0)
    # "forkserver": workers fork from one process that imported torch once, and share those pages
    # (bundled rtmdet, 2 workers: 1151 against 1400 MB PSS, bench/analysis.md); "spawn": each worker
    # starts a fresh interpreter and imports torch itself.
    worker_start_method: Literal["forkserver", "spawn"] = "forkserver"
    cors_origins: list[str] = Field(default_factory=list)  # empty: CORS off
    log_level: str = Field("info", pattern=r"^(debug|info|warning|error)$")
    # Where backend = "auto" keeps exported graphs and parity verdicts (never the model folder, which
    # may be read-only). DETSERVE_CACHE_DIR; unset: $XDG_CACHE_HOME/detserve, else ~/.cache/detserve.
    cache_dir: Path | None = None

    auth: AuthSettings = AuthSettings()
    labelstudio: LabelStudioSettings = LabelStudioSettings()

    @model_validator(mode="after")
    def _heartbeats_fit(self) -> "ServerSettings":
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed heartbeat_interval_s "
                             f"({self.heartbeat_interval_s}), or every worker would be killed between beats")
        return self


def _given_fields(model: BaseModel) -> dict:
    """The fields of `model` that were given rather than defaulted; nested models as far as given."""
    return {name: _given_fields(value) if isinstance(value := getattr(model, name), BaseModel) else value
            for name in model.model_fields_set}


def _deep_merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _deep_merge(merged[key], value) if both else value
    return merged


def load_server_settings(config_file: str | Path | None = None, **overrides) -> ServerSettings:
    """Build settings from an optional TOML file, the environment and explicit overrides."""
    data: dict = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read server config: {exc}") from None
    try:
        # Env beats the file: pydantic-settings gives init kwargs priority, so apply the file as
        # defaults by constructing twice only where the env is silent.
        # Field by field, nested ones too: DETSERVE_LABELSTUDIO__URL must not drop the file's
        # [labelstudio] basic_auth_user, nor a jobs store path its [labelstudio.jobs] on_import_projects.
        from_env = ServerSettings()
        merged = {**_deep_merge(data, _given_fields(from_env)), **overrides}
        return ServerSettings(**merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(config_file or "server settings"))) from None
