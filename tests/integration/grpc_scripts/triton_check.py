"""Run by the tritonclient virtualenv (not detserve's): drive detserve with tritonclient.http and
tritonclient.grpc and print what each saw as JSON on stdout.

usage: triton_check.py HTTP_HOSTPORT GRPC_HOSTPORT MODEL IMAGE...
"""
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def _outputs(result, names):
    out = {}
    for name in names:
        array = result.as_numpy(name)
        if array.dtype == np.object_:  # BYTES: JSON text per element
            array = np.vectorize(lambda b: b.decode() if isinstance(b, bytes) else str(b), otypes=[object])(array)
        out[name] = array.tolist()
    return out


def check(module, url, model, images):
    client = module.InferenceServerClient(url=url)
    meta = client.get_model_metadata(model)
    if module is grpcclient:
        meta = {"name": meta.name, "versions": list(meta.versions),
                "outputs": [{"name": o.name, "datatype": o.datatype, "shape": list(o.shape)} for o in meta.outputs]}
    names = [o["name"] for o in meta["outputs"]]
    data = np.array([open(path, "rb").read() for path in images], dtype=np.object_)
    tensor = module.InferInput("image", [len(images)], "BYTES")
    if module is httpclient:
        tensor.set_data_from_numpy(data, binary_data=True)
        requested = [module.InferRequestedOutput(n, binary_data=True) for n in names]
    else:
        tensor.set_data_from_numpy(data)
        requested = [module.InferRequestedOutput(n) for n in names]
    result = client.infer(model, [tensor], outputs=requested, request_id="req-7")
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "metadata": meta,
        "outputs": _outputs(result, names),
        "id": result.get_response()["id"] if module is httpclient else result.get_response().id,
    }


def stream(url, model, images):
    """ModelStreamInfer: one request per image; returns each response's id and num_detections."""
    seen = []
    client = grpcclient.InferenceServerClient(url=url)
    client.start_stream(callback=lambda result, error: seen.append(
        ("error", str(error)) if error else (result.get_response().id, result.as_numpy("num_detections").tolist())))
    for i, path in enumerate(images):
        tensor = grpcclient.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([open(path, "rb").read()], dtype=np.object_))
        client.async_stream_infer(model, [tensor], request_id=f"s{i}")
    client.stop_stream()  # waits for the outstanding responses
    return seen


def main():
    http_url, grpc_url, model, *images = sys.argv[1:]
    report = {"http": check(httpclient, http_url, model, images), "grpc": check(grpcclient, grpc_url, model, images),
              "stream": stream(grpc_url, model, images)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
