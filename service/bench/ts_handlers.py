"""TorchServe handlers for the comparison, run inside TorchServe's Python worker (bench/torchserve/.venv).

They reuse detserve's detector, weights loader and pipeline functions, so the model math is
identical to detserve's worker; what differs is what TorchServe prescribes around it:

- `MMDetStyleHandler`: MMDetection's tools/deployment/mmdet_handler.py shape: cv2 decode in
  preprocess, then one forward per image (mmdet 3.x `inference_detector` loops over the list),
  JSON with the hard-coded 0.5 score threshold. The network runs as MMDetection runs it: BatchNorm
  kept as its own layers and NCHW tensors; folding BatchNorm and channels-last are detserve's eager
  optimisations (service/backends/fold.py, eager.py), which mmdet's handler does not have.
- `BatchedHandler`: the best case TorchServe allows: one batched forward for the whole batch
  TorchServe hands over (registered with batch_size 8), with detserve's optimised eager network
  (BatchNorm folded, channels-last): what a TorchServe user gets who does everything detserve does.
- `NoopHandler`: answers `[]` per request without touching the body: TorchServe's own overhead.

Each .mar carries `bench_config.json`: {"model_dir": <detserve model folder>, "threads": N}.
"""
from __future__ import annotations

import base64
import json
import os

from ts.torch_handler.base_handler import BaseHandler

THRESHOLD = 0.5  # mmdet_handler.py hard-codes it


def _config(context) -> dict:
    with open(os.path.join(context.system_properties["model_dir"], "bench_config.json")) as f:
        return json.load(f)


class NoopHandler(BaseHandler):
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        return ["[]" for _ in data]


class MMDetStyleHandler(BaseHandler):
    optimised_network = False  # the network as mmdet runs it
    def initialize(self, context):
        import torch

        from service.backends.eager import EagerBackend
        from service.settings import load_model_config

        config = _config(context)
        threads = int(config.get("threads") or 0)
        if threads:
            torch.set_num_threads(threads)
        overrides = {} if self.optimised_network else {"eager": {"fold_batchnorm": False, "channels_last": False}}
        self.cfg = load_model_config(config["model_dir"], **overrides)
        self.backend = EagerBackend(self.cfg, "cpu")
        self.backend.load()
        self.classes = list(self.cfg.classes or [])
        self.manifest = context.manifest
        self.initialized = True

    def preprocess(self, data):
        import cv2
        import numpy as np

        images = []
        for row in data:
            image = row.get("data") or row.get("body")
            if isinstance(image, str):
                image = base64.b64decode(image)
            # mmcv.imfrombytes with its default cv2 backend
            images.append(cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR))
        return images

    def _forward(self, images):
        import torch

        from service.pipeline.postprocess import clip_to_image, postprocess_head_outputs
        from service.pipeline.transforms import preprocess_batch

        batch, metas = preprocess_batch(images, self.cfg.input_size)
        outputs = self.backend.infer(batch)
        with torch.inference_mode():
            dets = postprocess_head_outputs(outputs, metas, self.cfg.test_cfg)
            return [clip_to_image(d, m.ori_h, m.ori_w) for d, m in zip(dets, metas)]

    def inference(self, data, *args, **kwargs):
        out = []
        for image in data:  # inference_detector(model, list) runs test_step once per image
            out.extend(self._forward([image]))
        return out

    def postprocess(self, data):
        output = []
        for dets in data:
            bboxes = dets.boxes_xyxy.cpu().numpy().astype("float32").tolist()
            labels = dets.labels.cpu().numpy().astype("int32").tolist()
            scores = dets.scores.cpu().numpy().astype("float32").tolist()
            preds = []
            for score, bbox, label in zip(scores, bboxes, labels):
                if score >= THRESHOLD:
                    name = self.classes[label] if label < len(self.classes) else str(label)
                    preds.append({"class_label": label, "class_name": name, "bbox": bbox, "score": score})
            output.append(preds)
        return output


class BatchedHandler(MMDetStyleHandler):
    optimised_network = True
    def inference(self, data, *args, **kwargs):
        return self._forward(data)
