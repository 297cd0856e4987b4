"""The worker wire (service/engine/messages.py dumps/loads): every per-batch type survives the trip
through a real multiprocessing Pipe unchanged, in its compact field-tuple form."""
from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

from service import errors
from service.engine import messages
from service.engine.messages import ArenaBytes, BatchRequest, BatchResult, WorkItem
from service.types import (BoxFormat, DetectOptions, DetectResult, Detection, EncodedImage, RawImage, RenderFormat,
                           RLEMask, StageTimes, TileMerge)

OPTIONS = DetectOptions(score_thr=0.25, max_dets=7, classes=("cat", "dog"), render=RenderFormat.PNG, iou_thr=0.5,
                        class_agnostic=True, box_format=BoxFormat.XYWH,
                        normalized=True, tile=512, tile_overlap=0.2, tile_merge=next(iter(TileMerge)))


def request() -> BatchRequest:
    return BatchRequest(41, (
        WorkItem(1, EncodedImage(b"\xff\xd8jpeg"), DetectOptions()),
        WorkItem(2, EncodedImage(ArenaBytes(4096, 70_000)), OPTIONS),
        WorkItem(3, RawImage(b"\x00" * 12, 2, 2, "BGR"), OPTIONS),
    ))


def result() -> BatchResult:
    det = Detection(3, "dog", 0.875, (1.5, 2.0, 30.25, 40.0), RLEMask(48, 64, "PPYo1"))
    ok = DetectResult([det, Detection(0, "cat", 0.5, (0.0, 0.0, 1.0, 1.0))], 64, 48, "m", "m-1", b"png",
                      StageTimes(0.001, 0.002, 0.03, 0.004))
    return BatchResult(41, 2, (ok, errors.InvalidImage("cannot decode image"), DetectResult([], 1, 1)), 3, 0.05, 1)


@dataclass(frozen=True, slots=True)
class TaggedImage(EncodedImage):  # a subclass is not in the table: it pickles the default way
    tag: str = ""


def test_batch_messages_cross_a_real_pipe_unchanged():
    front, worker = mp.Pipe()
    try:
        for message in (request(), result()):
            front.send_bytes(messages.dumps(message))
            got = worker.recv()  # what the worker's (and the front's) reading side does
            assert (got == message) if isinstance(message, BatchRequest) else _same_result(got, message)
    finally:
        front.close()
        worker.close()


def _same_result(got: BatchResult, want: BatchResult) -> bool:
    assert got.outcomes[0] == want.outcomes[0] and got.outcomes[2] == want.outcomes[2]
    err = got.outcomes[1]
    assert isinstance(err, errors.InvalidImage) and err.message == "cannot decode image"
    return (got.batch_id, got.worker_id, got.batch_size, got.worker_seconds, got.oom_splits) == (41, 2, 3, 0.05, 1)


def test_the_wire_form_is_the_compact_one_and_leaves_other_types_alone():
    assert len(messages.dumps(request())) < len(ForkingPickler.dumps(request()))
    tagged = WorkItem(9, TaggedImage(b"x", tag="t"), DetectOptions())
    back = messages.loads(messages.dumps(tagged))
    assert back == tagged and type(back.image) is TaggedImage and back.image.tag == "t"
