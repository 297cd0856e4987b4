"""Shared fakes: a controllable clock and a predictor whose behaviour is chosen per image.

FakePredictor reads each EncodedImage's bytes as a command, so a test can steer one request:
  b"ok..."          -> an empty DetectResult
  b"BAD..."         -> errors.InvalidImage for that image only
  b"SLEEP:<s>"      -> the batch sleeps <s> seconds (the longest request wins)
  b"CRASH"          -> the worker process dies (os._exit) mid-batch
  b"HANG"           -> the batch never returns
  b"RAISE"          -> predict() raises RuntimeError for the whole batch
  b"DIGEST..."      -> model_version = sha256 of all the image's bytes (checks payload transport)
With `oom_above=N`, a batch larger than N raises torch.cuda.OutOfMemoryError.
Each result reports `image_width` = size of the batch it ran in and `image_height` = worker pid.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from service import errors
from service.types import DetectResult, EncodedImage

FAKE_FACTORY = "fakes:FakePredictor.from_config"


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class FakePredictor:
    seen: list[bytes] = []  # every command run, in this process (inline engines only)

    def __init__(self, cfg, device: str, threads: int | None, oom_above: int | None = None,
                 load_delay_s: float = 0.0, fail_load: bool = False):
        if fail_load:
            raise FileNotFoundError("weights.pth: no such file (fake)")
        time.sleep(load_delay_s)
        self.name = cfg.name
        self.version = f"{cfg.name}-fake"
        self.arch = cfg.arch
        self.classes = tuple(cfg.classes or ("a", "b"))
        self.has_masks = False
        self.input_size = cfg.input_size
        self.device = "cpu" if device in ("auto", None) else device
        self.backend_name = "fake"
        self.threads = threads
        self.oom_above = oom_above
        self.closed = False

    @classmethod
    def from_config(cls, cfg, *, device: str | None = None, threads: int | None = None, **kwargs):
        return cls(cfg, device or "auto", threads, **kwargs)

    def predict(self, images, options):
        commands = [bytes(img.data[:16]) if isinstance(img, EncodedImage) else b"ok" for img in images]
        FakePredictor.seen.extend(commands)
        if self.oom_above is not None and len(images) > self.oom_above:
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        if any(c.startswith(b"CRASH") for c in commands):
            os._exit(3)
        if any(c.startswith(b"HANG") for c in commands):
            time.sleep(3600)
        if any(c.startswith(b"RAISE") for c in commands):
            raise RuntimeError("predictor exploded (fake)")
        sleeps = [float(c.split(b":")[1]) for c in commands if c.startswith(b"SLEEP:")]
        if sleeps:
            time.sleep(max(sleeps))
        out = []
        for command, img in zip(commands, images):
            if command.startswith(b"BAD"):
                out.append(errors.InvalidImage("not an image (fake)"))
            elif command.startswith(b"DIGEST"):
                out.append(DetectResult([], image_width=len(img.data), image_height=os.getpid(),
                                        model_name=self.name, model_version=hashlib.sha256(img.data).hexdigest()))
            else:
                out.append(DetectResult([], image_width=len(images), image_height=os.getpid(),
                                        model_name=self.name, model_version=self.version))
        return out

    def close(self) -> None:
        self.closed = True


def write_model(store: Path, name: str, *, arch: str = "null", workers: int = 1, batch: dict | None = None,
                extra: str = "") -> Path:
    """A model folder in `store` with a model.toml; arch "null" needs no weights."""
    folder = store / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f'arch = "{arch}"', 'classes = ["a", "b"]', "input_size = 64", extra, "[workers]", f"count = {workers}"]
    if batch:
        lines.append("[batch]")
        lines += [f"{k} = {v}" for k, v in batch.items()]
    (folder / "model.toml").write_text("\n".join(lines) + "\n")
    return folder


@contextlib.asynccontextmanager
async def running_engine(store: Path, *, inline: bool, factory: str | None = FAKE_FACTORY,
                         factory_kwargs: dict | None = None, **settings):
    """An Engine over `store` (fake predictors unless factory=None), stopped on exit."""
    from service.engine.engine import Engine
    from service.settings import ServerSettings

    engine = Engine(ServerSettings(model_store=store, **settings), inline=inline,
                    predictor_factory=factory, factory_kwargs=factory_kwargs)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop(5.0)


def sample(name: str, labels: dict) -> float:
    """A Prometheus sample from the detserve registry, 0 when absent."""
    from service.observability.metrics import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def image(command: bytes) -> EncodedImage:
    return EncodedImage(command)
