"""What the load generator talks to. Each target prebuilds one request per corpus image at
construction, so a send is only I/O; `send(i)` returns "ok" or the error code as a string
(HTTP status such as "503", gRPC status name such as "UNAVAILABLE", or an exception class name).
"""
from __future__ import annotations

import base64
import json
import struct
from typing import Protocol as TypingProtocol

from .http import HttpPool, build_request

TARGETS = ("rest", "kserve-rest", "kserve-grpc", "grpc")


class Target(TypingProtocol):
    name: str

    async def open(self) -> None: ...
    async def send(self, index: int) -> str: ...
    async def close(self) -> None: ...


class _HttpTarget:
    def __init__(self, url: str, raws: list[bytes], name: str, ok_statuses=(200,)):
        self.name = name
        self.url = url
        self._raws = raws
        self._ok = set(ok_statuses)
        self._pool: HttpPool | None = None

    async def open(self) -> None:
        self._pool = HttpPool(self.url)

    async def send(self, index: int) -> str:
        status, _ = await self._pool.request(self._raws[index % len(self._raws)])
        return "ok" if status in self._ok else str(status)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()


class _HttpxTarget:
    """The same requests through httpx, to compare client ceilings (slower; not the default)."""

    def __init__(self, url: str, requests: list[tuple[str, dict, bytes]], name: str, pool_size: int):
        self.name, self.url = name, url
        self._requests = requests
        self._pool_size = pool_size
        self._client = None

    async def open(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self._pool_size, max_keepalive_connections=self._pool_size)
        self._client = httpx.AsyncClient(limits=limits, timeout=None)

    async def send(self, index: int) -> str:
        method, headers, body = self._requests[index % len(self._requests)]
        response = await self._client.request(method, self.url, content=body, headers=headers)
        return "ok" if response.status_code == 200 else str(response.status_code)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


class _GrpcTarget:
    """Sends pre-serialised protobuf bytes and keeps the reply undecoded: no message-building cost."""

    def __init__(self, address: str, method: str, payloads: list[bytes], name: str, channels: int = 1):
        self.name, self.address, self.method = name, address, method
        self.payloads = payloads  # pre-serialised; bench/h2load.py sends them too
        self._channels_wanted = channels
        self._calls = []
        self._channels = []

    async def open(self) -> None:
        import grpc

        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        for i in range(self._channels_wanted):
            # a distinct arg keeps grpc from sharing one subchannel (one TCP connection) between them
            channel = grpc.aio.insecure_channel(self.address, options=options + [("grpc.channel_id", i)])
            self._channels.append(channel)
            self._calls.append(channel.unary_unary(self.method))

    async def send(self, index: int) -> str:
        import grpc

        call = self._calls[index % len(self._calls)]
        try:
            await call(self.payloads[index % len(self.payloads)])
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "ok"

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


def _kserve_json_body(image: bytes) -> bytes:
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}
    return json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": False}}).encode()


def _kserve_binary_body(image: bytes) -> tuple[bytes, int]:
    header = json.dumps({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                    "parameters": {"binary_data_size": len(image) + 4}}],
    }).encode()
    return header + struct.pack("<I", len(image)) + image, len(header)


def make_target(kind: str, url: str, model: str, corpus: list[bytes], *, kserve_mode: str = "raw",
                client: str = "raw", pool_size: int = 16, grpc_channels: int = 1) -> Target:
    """`url`: http://host:port for REST kinds, host:port for gRPC kinds."""
    if kind == "rest":
        full = f"{url.rstrip('/')}/predictions/{model}"
        headers = {"Content-Type": "application/octet-stream"}
        method, bodies = "PUT", [(headers, img) for img in corpus]
    elif kind == "kserve-rest":
        full = f"{url.rstrip('/')}/v2/models/{model}/infer"
        method = "POST"
        if kserve_mode == "raw":
            bodies = [({"Inference-Header-Content-Length": "0", "Content-Type": "application/octet-stream"}, img)
                      for img in corpus]
        elif kserve_mode == "binary":
            bodies = []
            for img in corpus:
                body, header_len = _kserve_binary_body(img)
                bodies.append(({"Inference-Header-Content-Length": str(header_len),
                                "Content-Type": "application/octet-stream"}, body))
        elif kserve_mode == "json":
            bodies = [({"Content-Type": "application/json"}, _kserve_json_body(img)) for img in corpus]
        else:
            raise ValueError(f"unknown kserve mode {kserve_mode!r} (raw, binary, json)")
    elif kind == "grpc":
        from ..protocols.grpc.generated import detserve_pb2 as pb

        payloads = [pb.DetectRequest(model=model, image=pb.Image(encoded=img)).SerializeToString() for img in corpus]
        return _GrpcTarget(url, "/detserve.v1.Detector/Detect", payloads, kind, grpc_channels)
    elif kind == "kserve-grpc":
        from ..protocols.grpc.generated import grpc_service_pb2 as kpb

        payloads = []
        for img in corpus:
            req = kpb.ModelInferRequest(model_name=model)
            req.inputs.add(name="image", datatype="BYTES", shape=[1])
            # raw_input_contents carries BYTES elements length-prefixed, as Triton's clients send them
            req.raw_input_contents.append(struct.pack("<I", len(img)) + img)
            payloads.append(req.SerializeToString())
        return _GrpcTarget(url, "/inference.GRPCInferenceService/ModelInfer", payloads, kind, grpc_channels)
    else:
        raise ValueError(f"unknown target {kind!r}; choose from {', '.join(TARGETS)}")
    if client == "httpx":
        return _HttpxTarget(full, [(method, h, b) for h, b in bodies], kind, pool_size)
    return _HttpTarget(full, [build_request(method, full, b, h) for h, b in bodies], kind)
