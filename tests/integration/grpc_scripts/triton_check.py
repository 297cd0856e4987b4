"""Run by the tritonclient virtualenv (not detserve's): drive detserve with tritonclient.http and
tritonclient.grpc and print what each saw as JSON on stdout.

usage: triton_check.py batch|single HTTP_HOSTPORT GRPC_HOSTPORT MODEL IMAGE...
  batch:  one request whose BYTES input holds every image
  single: one request per image (a real model's float results may differ in the last bits with
          the batch it ran in, so exact comparisons against /predictions use batches of one)
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


def _input(module, paths):
    tensor = module.InferInput("image", [len(paths)], "BYTES")
    data = np.array([open(path, "rb").read() for path in paths], dtype=np.object_)
    if module is httpclient:
        tensor.set_data_from_numpy(data, binary_data=True)
    else:
        tensor.set_data_from_numpy(data)
    return tensor


def check(module, url, model, images, single):
    client = module.InferenceServerClient(url=url)
    meta = client.get_model_metadata(model)
    if module is grpcclient:
        meta = {"name": meta.name, "versions": list(meta.versions),
                "outputs": [{"name": o.name, "datatype": o.datatype, "shape": list(o.shape)} for o in meta.outputs]}
    names = [o["name"] for o in meta["outputs"]]
    if module is httpclient:
        requested = [module.InferRequestedOutput(n, binary_data=True) for n in names]
    else:
        requested = [module.InferRequestedOutput(n) for n in names]
    groups = [[path] for path in images] if single else [images]
    results = [client.infer(model, [_input(module, group)], outputs=requested, request_id="req-7") for group in groups]
    outputs = [_outputs(r, names) for r in results]
    result = results[-1]
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "metadata": meta,
        "outputs": {n: [row for out in outputs for row in out[n]] for n in names},
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
    mode, http_url, grpc_url, model, *images = sys.argv[1:]
    single = mode == "single"
    report = {"http": check(httpclient, http_url, model, images, single),
              "grpc": check(grpcclient, grpc_url, model, images, single),
              "stream": stream(grpc_url, model, images)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
