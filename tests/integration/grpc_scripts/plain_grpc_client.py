"""A plain grpcio client generated from proto/detserve.proto alone (no detserve imports): run with
the generated modules' folder first on sys.path. Prints a JSON report on stdout.

usage: plain_grpc_client.py GENERATED_DIR HOSTPORT MODEL IMAGE
"""
import json
import sys

sys.path.insert(0, sys.argv[1])

import detserve_pb2 as pb  # noqa: E402
import detserve_pb2_grpc as pb_grpc  # noqa: E402
import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402


def main():
    _, _, target, model, image_path = sys.argv
    image = open(image_path, "rb").read()
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DetectorStub(channel)
        one = stub.Detect(pb.DetectRequest(model=model, image=pb.Image(encoded=image)), timeout=30)
        batch = stub.DetectBatch(pb.DetectBatchRequest(model=model, images=[pb.Image(encoded=image)] * 3), timeout=30)
        frames = (pb.StreamFrame(frame_id=1000 + i, model=model, image=pb.Image(encoded=image)) for i in range(100))
        stream = list(stub.DetectStream(frames, timeout=120))
        health = health_pb2_grpc.HealthStub(channel)
        report = {
            "detect": [[d.label, d.class_name, round(d.score, 5), [d.box.x1, d.box.y1, d.box.x2, d.box.y2]]
                       for d in one.detections],
            "size": [one.image_width, one.image_height],
            "batch": [len(r.detections) for r in batch.results],
            "stream_ids": [r.frame_id for r in stream],
            "stream_ok": all(r.WhichOneof("outcome") == "result" and len(r.result.detections) == len(one.detections)
                             for r in stream),
            "health": health_pb2.HealthCheckResponse.ServingStatus.Name(
                health.Check(health_pb2.HealthCheckRequest(service="")).status),
            "model_health": health_pb2.HealthCheckResponse.ServingStatus.Name(
                health.Check(health_pb2.HealthCheckRequest(service=model)).status),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
