"""`detserve bench tiles`: one tiled request (tiles batched by the engine) against the same tiles sent one
by one, through the same Engine with worker processes.

"One by one" is what a client-side slicer (SAHI's loop, a workflow block) does against a server: crop
each tile, send it, wait, send the next. The tiles go as raw pixels, so the one-by-one side pays no
JPEG encoding and no full-image decode per tile: it is the best case for that side, and the ratio is
what batching alone buys (plus the full image decoded once per worker instead of never re-used).
"""
from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..types import DetectOptions, EncodedImage, RawImage
from .setup import toml_dumps


@dataclass
class TileBenchResult:
    image: str
    width: int
    height: int
    tile: int
    tiles: int  # items per request, full pass included
    max_batch_size: int
    device: str
    backend: str
    batched_s: float  # median seconds for the whole image, tiles batched by the engine
    one_by_one_s: float  # median seconds for the same tiles as sequential single-tile requests
    rounds: int

    @property
    def speedup(self) -> float:
        return self.one_by_one_s / self.batched_s

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": round(self.speedup, 3)}

    def markdown(self) -> str:
        return (f"| {self.width}x{self.height} | {self.tile} | {self.tiles} | {self.max_batch_size} | "
                f"{self.device} / {self.backend} | {self.batched_s:.2f} s | {self.one_by_one_s:.2f} s | "
                f"{self.speedup:.2f}x |")


MARKDOWN_HEADER = ("| image | tile | items | max batch | device / backend | batched | one by one | speedup |\n"
                   "|---|---|---|---|---|---|---|---|")


def _store(model_dir: Path, root: Path, max_batch_size: int, device: str | None) -> str:
    """A one-model store whose model.toml is the model's with the batch size (and device) set."""
    import tomllib

    data = tomllib.loads((model_dir / "model.toml").read_text())
    data.setdefault("batch", {})["max_batch_size"] = max_batch_size
    data["batch"]["max_queue_size"] = max(data["batch"].get("max_queue_size", 256), 1024)
    data["batch"]["request_timeout_ms"] = 600_000.0  # a few hundred tiles on a small CPU take more than 30 s
    data.setdefault("tiling", {})["max_tiles"] = 4096
    if device:
        data["device"] = device
    for key in ("weights", "classes_file"):
        if key in data:
            data[key] = str((model_dir / data[key]).resolve())
    if "onnxruntime" in data and "model" in data["onnxruntime"]:
        data["onnxruntime"]["model"] = str((model_dir / data["onnxruntime"]["model"]).resolve())
    name = data.get("name", model_dir.name)
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(toml_dumps(data))
    return name


async def _measure(store: Path, name: str, image: bytes, tile: int, rounds: int) -> tuple[float, float, int, str, str]:
    from ..engine.engine import Engine
    from ..pipeline.decode import decode_image
    from ..pipeline.tiling import plan_tiles
    from ..settings import ServerSettings, TilingConfig

    engine = Engine(ServerSettings(model_store=store, models=[name]))
    await engine.start()
    try:
        info = engine.model_info(name)
        options = DetectOptions(tile=tile)
        plan = plan_tiles(EncodedImage(image), options, TilingConfig(max_tiles=4096), input_size=info.input_size,
                          max_pixels=10**9)
        bgr = decode_image(image, max_pixels=10**9)
        crops = [RawImage(np.ascontiguousarray(bgr[w.y0:w.y1, w.x0:w.x1]).tobytes(), w.height, w.width, "BGR")
                 for w in plan.windows]
        await engine.detect(name, [EncodedImage(image)], options)  # warm-up: allocator, ONNX sessions
        batched, single = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            await engine.detect(name, [EncodedImage(image)], options)
            batched.append(time.perf_counter() - start)
            start = time.perf_counter()
            for crop in crops:
                await engine.detect(name, [crop], DetectOptions(tile="off"))
            single.append(time.perf_counter() - start)
        device = ",".join(sorted({w.device for w in info.workers})) or "?"
        return statistics.median(batched), statistics.median(single), plan.items, device, info.backend
    finally:
        await engine.stop(5.0)


def bench_tiles(model_dir: Path, image_path: Path | None, *, tile: int | None = None, max_batch_size: int = 8,
                rounds: int = 3, device: str | None = None,
                generated_size: tuple[int, int] = (4000, 3000)) -> TileBenchResult:
    """Median wall time of one tiled request vs its tiles as sequential requests (plus the full pass)."""
    from ..settings import load_model_config

    if image_path is None:
        import cv2

        from ..demo.dataset import render_small_shapes

        width, height = generated_size
        pixels, _ = render_small_shapes(np.random.default_rng(18), width, height, num_shapes=60)
        image = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
        label = f"generated {width}x{height}, 60 shapes"
    else:
        image, label = image_path.read_bytes(), str(image_path)
    cfg = load_model_config(model_dir)
    side = tile or cfg.input_size
    with tempfile.TemporaryDirectory() as root:
        name = _store(model_dir, Path(root), max_batch_size, device)
        batched, single, items, dev, backend = asyncio.run(_measure(Path(root), name, image, side, rounds))
    from ..pipeline.tiling import image_size

    width, height = image_size(EncodedImage(image), 10**9)
    return TileBenchResult(label, width, height, side, items, max_batch_size, dev, backend, batched, single, rounds)
