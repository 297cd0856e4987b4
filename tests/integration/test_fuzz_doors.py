"""Generated malformed inputs against every door but Label Studio, on one real `detserve serve`
with the null model: TorchServe REST (raw and multipart), KServe V2 REST, KServe V2 gRPC and
detserve gRPC. No answer may be a 5xx (or gRPC INTERNAL / UNKNOWN); afterwards the server is ready,
its front process grew by a bounded amount, and 3,000 client-chosen model names made O(1) series.

Cases are drawn from a seeded generator, so a failure names a reproducible case.
"""
from __future__ import annotations

import base64
import json
import random
import struct
import urllib.parse

import grpc
import httpx
import pytest

from fakes import write_model
from serve_process import ServeProcess
from service.protocols.grpc.generated import detserve_pb2 as pb
from service.protocols.grpc.generated import detserve_pb2_grpc as pb_grpc
from service.protocols.grpc.generated import grpc_service_pb2 as kpb
from service.protocols.grpc.generated import grpc_service_pb2_grpc as kpb_grpc

pytestmark = pytest.mark.integration

MODEL = "null"
SEED = 15
SERVER_ERRORS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
RSS_GROWTH_LIMIT_KB = 32 * 1024  # measured: ~1 MB over the 4,200 cases

WEIRD_STRINGS = ["", " ", "²", "١٢", "0x10", "1e400", "-1e400", "nan", "NaN", "inf", "-inf", "1_0", "0.5", "-0.5",
                 "2", "0", "1", "101", "99999999999999999999999", "true", "null", "[]", "{}", "a,b", ",,,", "cat",
                 "\x00", "é" * 50, "%00", "../../etc/passwd", "a" * 3000, "1.0000000001", "+1", "0b1", "٣"]
WEIRD_JSON = [None, True, False, 0, -1, 1, 2 ** 64, -(2 ** 63) - 1, 0.5, 1e308, -1e308, "", "x", "²", [], [None],
              [1, "a"], {}, {"a": 1}, {"b64": 5}, {"b64": "!!"}, [[[]]], "A" * 500, [0.1] * 50]


def _header(text: str) -> bytes:
    """Any text as header bytes a client can send: Latin-1 where it fits (servers decode headers as
    Latin-1, so "²" arrives as "²"), else UTF-8; no control characters."""
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        raw = text.encode("utf-8")
    return bytes(b for b in raw if b >= 0x20 and b != 0x7F).strip()


def _weird(rng: random.Random):
    return rng.choice(WEIRD_JSON) if rng.random() < 0.6 else rng.choice(WEIRD_STRINGS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    write_model(store, MODEL, workers=1, batch={"max_batch_size": 8, "max_queue_size": 16})
    proc = ServeProcess(store, tmp_path_factory.mktemp("run"), fake=False, grpc=True,
                        config="max_request_size = 262144\nmax_images_per_request = 8\n")
    proc.wait_ready(120)
    yield proc
    proc.stop()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# ---- generators ------------------------------------------------------------------------------

def rest_raw_cases(rng: random.Random, n: int):
    keys = ["score_thr", "max_dets", "classes", "format", "image_format", "x"]
    bodies = [b"", b"ok", bytes(rng.randrange(256) for _ in range(64)), b"\xff\xd8\xff" + b"\x00" * 100,
              b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, b"{}", b"GIF89a"]
    types = [None, "image/jpeg", "application/json", "text/plain", "multipart/form-data", "multipart/form-data; boundary=",
             "application/x-www-form-urlencoded", "\u00e9/\u00e9", "image/" + "a" * 300]
    for i in range(n):
        params = {rng.choice(keys): rng.choice(WEIRD_STRINGS) for _ in range(rng.randrange(4))}
        headers = {}
        if (ctype := rng.choice(types)) is not None:
            headers["content-type"] = _header(ctype)
        if rng.random() < 0.3:
            headers["x-request-timeout-ms"] = _header(rng.choice(WEIRD_STRINGS))[:100]
        if rng.random() < 0.2:
            headers["x-request-id"] = _header(rng.choice(WEIRD_STRINGS))[:200]
        model = MODEL if rng.random() < 0.7 else f"random-{i}-{rng.random()}"
        version = urllib.parse.quote(rng.choice(WEIRD_STRINGS)[:30] or "v", safe="")
        path = f"/predictions/{model}" + (f"/{version}" if rng.random() < 0.1 else "")
        yield rng.choice(["PUT", "POST"]), path, params, headers, rng.choice(bodies)


def rest_multipart_cases(rng: random.Random, n: int):
    for i in range(n):
        boundary = rng.choice(["b", "x" * 70, "", "--", "é", "b" * 200])
        parts = []
        for k in range(rng.choice([0, 1, 2, 9, 12, 80])):
            name = rng.choice(["data", "body", "file", "", '"', "é"])
            if rng.random() < 0.5:
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f{k}.jpg"\r\n'
                             f"Content-Type: image/jpeg\r\n\r\n".encode() + rng.choice([b"", b"ok", b"\x00" * 10]) + b"\r\n")
            else:
                value = rng.choice(["", "!!!", base64.b64encode(b"ok").decode(), "a" * 100, "%%%"])
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        body = b"".join(parts) + (f"--{boundary}--\r\n".encode() if rng.random() < 0.7 else b"")
        if rng.random() < 0.2:
            body = body[: rng.randrange(len(body) + 1)]
        ctype = rng.choice([f"multipart/form-data; boundary={boundary}", "multipart/form-data",
                            f'multipart/form-data; boundary="{boundary}"', "multipart/form-data; boundary=other"])
        yield f"/predictions/{MODEL}", {"content-type": _header(ctype)}, body


def _valid_kserve_request(rng: random.Random) -> dict:
    return {"id": "1", "parameters": {"score_thr": 0.2},
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"ok").decode()],
                        "parameters": {}}],
            "outputs": [{"name": "boxes", "parameters": {"binary_data": False}}]}


def _mutate(value, rng: random.Random, depth: int = 0):
    """Replace one random member (at any depth) with a weird value, or drop it."""
    if isinstance(value, dict) and value and depth < 4:
        key = rng.choice(list(value))
        if rng.random() < 0.35:
            out = dict(value)
            out[key] = _weird(rng) if rng.random() < 0.8 else out.pop(key, None)
            return out
        return {**value, key: _mutate(value[key], rng, depth + 1)}
    if isinstance(value, list) and value and depth < 4:
        i = rng.randrange(len(value))
        return value[:i] + [_mutate(value[i], rng, depth + 1)] + value[i + 1:]
    return _weird(rng)


def kserve_rest_cases(rng: random.Random, n: int):
    for i in range(n):
        request = _valid_kserve_request(rng)
        for _ in range(rng.randrange(1, 4)):
            request = _mutate(request, rng)
        body = json.dumps(request).encode()
        headers = {"content-type": "application/json"}
        kind = rng.random()
        if kind < 0.15:  # binary extension with a lying or odd header length
            headers["inference-header-content-length"] = _header(rng.choice(
                ["²", "-1", "1e3", " 12", "99999999999999999999999", "٣", str(len(body)), str(len(body) + 5), "", "0x1"]))
            body += bytes(rng.randrange(256) for _ in range(rng.randrange(16)))
        elif kind < 0.25:  # raw mode: the whole body is one image
            headers["inference-header-content-length"] = "0"
            body = rng.choice([b"", b"ok", b"\x00" * 10])
        elif kind < 0.35:
            body = body[: rng.randrange(len(body) + 1)]  # truncated JSON
        model = MODEL if rng.random() < 0.8 else f"random-{i}"
        yield f"/v2/models/{model}/infer", headers, body


def _param(rng: random.Random) -> kpb.InferParameter:
    choice = rng.randrange(5)
    if choice == 0:
        return kpb.InferParameter(bool_param=rng.random() < 0.5)
    if choice == 1:
        return kpb.InferParameter(int64_param=rng.choice([0, -1, 1, 2 ** 63 - 1, -(2 ** 63), 101]))
    if choice == 2:
        return kpb.InferParameter(string_param=rng.choice(WEIRD_STRINGS))
    if choice == 3:
        return kpb.InferParameter(double_param=rng.choice([float("inf"), float("-inf"), float("nan"), 0.5, -3.0, 1e300]))
    return kpb.InferParameter(uint64_param=rng.choice([0, 2 ** 64 - 1, 7]))


def kserve_grpc_cases(rng: random.Random, n: int):
    datatypes = ["BYTES", "UINT8", "FP32", "FP16", "INT64", "BOOL", "NOPE", ""]
    for i in range(n):
        request = kpb.ModelInferRequest(model_name=MODEL if rng.random() < 0.8 else f"random-{i}",
                                        model_version=rng.choice(["", "", "x"]), id=rng.choice(WEIRD_STRINGS)[:50])
        for key in rng.sample(["score_thr", "max_dets", "classes", "binary_data_output", "zz"], rng.randrange(3)):
            request.parameters[key].CopyFrom(_param(rng))
        raw = []
        for _ in range(rng.choice([0, 1, 1, 1, 2])):
            datatype = rng.choice(datatypes)
            shape = rng.choice([[1], [2], [], [-1], [1, 2, 2, 3], [2 ** 40], [0], [1, 1]])
            tensor = request.inputs.add(name=rng.choice(["image", "x", ""]), datatype=datatype, shape=shape)
            if rng.random() < 0.3:
                tensor.parameters["channel_order"].CopyFrom(_param(rng))
            if rng.random() < 0.6:
                raw.append(rng.choice([struct.pack("<I", 2) + b"ok", b"", b"\x00" * 12, struct.pack("<I", 999) + b"x"]))
            elif datatype == "BYTES":
                tensor.contents.bytes_contents.extend([b"ok"] * rng.randrange(3))
            else:
                tensor.contents.uint_contents.extend([rng.randrange(300)] * rng.randrange(13))
        if rng.random() < 0.8:
            request.raw_input_contents.extend(raw)
        for _ in range(rng.randrange(3)):
            out = request.outputs.add(name=rng.choice(["boxes", "scores", "nope", ""]))
            if rng.random() < 0.3:
                out.parameters["binary_data"].CopyFrom(_param(rng))
        yield request


def detserve_grpc_cases(rng: random.Random, n: int):
    for i in range(n):
        options = pb.DetectOptions()
        if rng.random() < 0.5:
            options.score_thr = rng.choice([float("nan"), float("inf"), -1.0, 2.0, 0.0, 1.0, 0.3])
        if rng.random() < 0.5:
            options.max_dets = rng.choice([0, -1, 1, 100, 101, 2 ** 31 - 1])
        if rng.random() < 0.3:
            options.classes.extend(rng.sample(["a", "b", "", "é", "cat", "a" * 100], rng.randrange(1, 4)))
        images = []
        for _ in range(rng.choice([0, 1, 1, 3, 9])):
            if rng.random() < 0.5:
                images.append(pb.Image(encoded=rng.choice([b"", b"ok", b"\x00" * 20])))
            elif rng.random() < 0.8:
                h, w = rng.choice([(1, 1), (0, 5), (-1, 3), (2, 2), (50000, 50000), (2 ** 31 - 1, 2)])
                images.append(pb.Image(raw=pb.RawImage(pixels=b"\x00" * rng.choice([0, 3, 12]), height=h, width=w,
                                                       channel_order=rng.choice(["RGB", "BGR", "rgb", "XYZ", ""]))))
            else:
                images.append(pb.Image())
        model = rng.choice([MODEL, MODEL, "", f"random-{i}"])
        if rng.random() < 0.5:
            yield "Detect", pb.DetectRequest(model=model, image=images[0] if images else None, options=options)
        else:
            yield "DetectBatch", pb.DetectBatchRequest(model=model, images=images, options=options)


# ---- the test ---------------------------------------------------------------------------------

def test_generated_malformed_inputs_never_get_a_server_error(server):
    rng = random.Random(SEED)
    pid = server.proc.pid
    failures: list[str] = []
    counted = 0
    with httpx.Client(base_url=server.url, timeout=20) as http:
        # Warm up every path once, so first-use allocations do not count as growth.
        http.put(f"/predictions/{MODEL}", content=b"ok")
        rss_before = _rss_kb(pid)

        for method, path, params, headers, body in rest_raw_cases(rng, 300):
            counted += 1
            r = http.request(method, path, params=params, headers=headers, content=body)
            if r.status_code >= 500:
                failures.append(f"REST raw {method} {path} {params} {headers}: {r.status_code} {r.text[:200]}")
            elif r.status_code >= 400 and "application/json" not in r.headers.get("content-type", ""):
                failures.append(f"REST raw {path} {params}: {r.status_code} is not JSON")
        for path, headers, body in rest_multipart_cases(rng, 150):
            counted += 1
            r = http.put(path, headers=headers, content=body)
            if r.status_code >= 500:
                failures.append(f"REST multipart {headers} {body[:120]!r}: {r.status_code} {r.text[:200]}")
        for path, headers, body in kserve_rest_cases(rng, 300):
            counted += 1
            r = http.post(path, headers=headers, content=body)
            if r.status_code >= 500:
                failures.append(f"KServe REST {headers} {body[:300]!r}: {r.status_code} {r.text[:200]}")
            elif r.status_code >= 400 and "error" not in r.json():
                failures.append(f"KServe REST {body[:100]!r}: {r.status_code} without the V2 'error' field")

    with grpc.insecure_channel(server.grpc_target) as channel:
        kserve, detector = kpb_grpc.GRPCInferenceServiceStub(channel), pb_grpc.DetectorStub(channel)
        for request in kserve_grpc_cases(rng, 200):
            counted += 1
            _grpc_call(lambda: kserve.ModelInfer(request, timeout=20), f"KServe gRPC {request}", failures)
        for method, request in detserve_grpc_cases(rng, 200):
            counted += 1
            _grpc_call(lambda: getattr(detector, method)(request, timeout=20), f"detserve gRPC {method} {request}", failures)
        for method in ("/detserve.v1.Detector/Detect", "/inference.GRPCInferenceService/ModelInfer"):
            raw = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            for _ in range(25):  # bytes that are not a protobuf message of that type
                counted += 1
                junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
                _grpc_call(lambda: raw(junk, timeout=20), f"raw {method} {junk!r}", failures)
        # 3,000 client-chosen model names over gRPC (the case): each fails, none is a series.
        for i in range(3000):
            counted += 1
            _grpc_call(lambda: detector.Detect(pb.DetectRequest(model=f"name-{i}-{rng.random()}"), timeout=20),
                       "random model name", failures)
        ready = kserve.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready

    rss_after = _rss_kb(pid)
    print(f"\n{counted} cases, front RSS {rss_before} -> {rss_after} KB")
    assert not failures, f"{len(failures)} of {counted} cases answered a server error:\n" + "\n".join(failures[:20])
    assert counted >= 1000
    assert ready and httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    assert httpx.put(f"{server.url}/predictions/{MODEL}", content=b"ok", timeout=10).status_code == 200
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_KB, f"front RSS grew {rss_after - rss_before} KB"
    exposition = httpx.get(f"{server.metrics}/metrics", timeout=10).text
    labels = {line.split('model="', 1)[1].split('"', 1)[0] for line in exposition.splitlines()
              if line.startswith("detserve_requests_total{")}
    assert labels <= {MODEL, "_unknown"}, sorted(labels)[:10]
    assert len(exposition) < 200_000


def _grpc_call(call, what: str, failures: list[str]) -> None:
    try:
        call()
    except grpc.RpcError as err:
        if err.code() in SERVER_ERRORS:
            failures.append(f"{what[:300]}: {err.code().name} {err.details()[:200]}")
