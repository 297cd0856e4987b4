"""Fixed-shape batch buckets for the eager backend's `compile` and `cuda_graphs` options.

torch.compile specialises on input shapes and CUDA graphs replay fixed buffers, so every batch size
the scheduler produces would cost a recompile or a capture. Batches are padded up to the next
bucket (1, 2, 4, ... up to max_batch_size) and the results sliced back: at most
log2(max_batch_size) + 2 shapes ever reach the compiled model or get captured.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..settings import EagerConfig

log = logging.getLogger(__name__)


def bucket_sizes(max_batch_size: int) -> list[int]:
    """Powers of two below max_batch_size, then max_batch_size itself."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


class BucketedRunner:
    """Callable like the detector (x -> flat output tuple), with padded fixed-shape batches."""

    def __init__(self, model: nn.Module, options: EagerConfig, device: str, max_batch_size: int):
        self.model = model
        self.buckets = bucket_sizes(max_batch_size)
        self.device = device
        self.use_cuda_graphs = options.cuda_graphs and device.startswith("cuda")
        if options.cuda_graphs and not self.use_cuda_graphs:
            log.warning("eager.cuda_graphs needs a CUDA device; running without CUDA graphs on %s", device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self.shapes_seen: set[tuple[int, ...]] = set()  # what the network really ran on (for tests/metrics)
        self.fn = model
        if options.compile:
            import torch._dynamo

            # One graph per bucket; the default cache limit (8) would fall back to eager past 8 buckets.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, len(self.buckets) + 2)
            # reduce-overhead = inductor + CUDA graph trees, which replaces our own capture on CUDA.
            mode = "reduce-overhead" if self.use_cuda_graphs else None
            self.fn = torch.compile(model, dynamic=False, mode=mode)
            self.use_cuda_graphs = False
        log.info("eager: batch buckets %s (compile=%s, cuda_graphs=%s)", self.buckets, options.compile,
                 options.cuda_graphs and device.startswith("cuda"))

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        largest = self.buckets[-1]
        if x.shape[0] > largest:  # the scheduler never does this, but a direct caller may
            parts = [self(x[i : i + largest]) for i in range(0, x.shape[0], largest)]
            return tuple(torch.cat(outs) for outs in zip(*parts))
        n = x.shape[0]
        bucket = self.bucket_for(n)
        if bucket != n:
            x = torch.cat([x, x.new_zeros((bucket - n, *x.shape[1:]))])
        self.shapes_seen.add(tuple(x.shape))
        outputs = self._replay(x) if self.use_cuda_graphs else self.fn(x)
        return tuple(o[:n] for o in outputs)

    def _replay(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bucket = x.shape[0]
        if bucket not in self._graphs:
            static_in = x.clone()
            stream = torch.cuda.Stream(device=x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the capture (cuDNN autotuning, allocator)
                    self.model(static_in)
            torch.cuda.current_stream(x.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = tuple(self.model(static_in))
            self._graphs[bucket] = (graph, static_in, static_out)
            log.info("eager: captured a CUDA graph for batch bucket %d", bucket)
        graph, static_in, static_out = self._graphs[bucket]
        static_in.copy_(x)
        graph.replay()
        # The static outputs are overwritten by the next replay: hand out copies.
        return tuple(o.clone() for o in static_out)
