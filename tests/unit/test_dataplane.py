"""The data plane: one set of option bounds for every door, one readiness, bounded metric labels,
and the request-size rules (too many images is 413, never a retryable 429)."""
from __future__ import annotations

import asyncio
import math

import pytest

from fakes import image, running_engine, write_model
from service import errors
from service.engine.dataplane import DataPlane
from service.observability import metrics
from service.types import BatchSettings, ModelInfo
from service.types import Protocol as Door


def _info(max_per_img: int | None = 100) -> ModelInfo:
    return ModelInfo("m", "m-1", "null", "eager", ("cat", "dog"), 64, False, True, BatchSettings(),
                     max_per_img=max_per_img)


@pytest.mark.parametrize("field, value, fragment", [
    ("score_thr", "nan", "finite"),
    ("score_thr", float("inf"), "finite"),
    ("score_thr", -0.1, "within [0, 1]"),
    ("score_thr", 1.5, "within [0, 1]"),
    ("score_thr", True, "boolean"),
    ("score_thr", [0.1], "list"),
    ("score_thr", {"a": 1}, "dict"),
    ("score_thr", "x", "must be a number"),
    ("score_thr", "-Infinity", "finite"),
    # float() takes these too; a client's number is a plain ASCII decimal
    ("score_thr", "\uff10.\uff15", "must be a number"),  # fullwidth "0.5"
    ("score_thr", "0_5", "must be a number"),
    ("score_thr", "0x1", "must be a number"),
    ("max_dets", "\u0661\u0660", "must be a number"),  # Arabic-Indic "10"
    ("max_dets", math.inf, "finite"),
    ("max_dets", "1e400", "finite"),
    ("max_dets", 0, "within [1, 100]"),
    ("max_dets", 101, "max_per_img"),
    ("max_dets", 2.5, "whole number"),
    ("max_dets", False, "boolean"),
    ("classes", 7, "int"),
    ("classes", [1, 2], "list of class-name strings"),
    ("classes", "", "one or more"),
    ("classes", "unicorn", "unknown class"),
])
def test_every_bad_option_is_one_invalid_request_naming_the_field(field, value, fragment):
    with pytest.raises(errors.InvalidRequest) as caught:
        DataPlane(object()).options(_info(), **{field: value})
    assert field in caught.value.message and fragment in caught.value.message


def test_options_from_any_wire_type_agree():
    dp = DataPlane(object())
    from_query = dp.options(_info(), score_thr=" 2.5e-1 ", max_dets="7", classes="dog, cat")
    from_json = dp.options(_info(), score_thr=0.25, max_dets=7.0, classes=["dog", "cat"])
    assert from_query == from_json
    assert from_query.score_thr == 0.25 and from_query.max_dets == 7 and from_query.classes == ("dog", "cat")
    assert dp.options(_info(None), max_dets=10_000).max_dets == 10_000  # no cap reported: the global bound


def test_too_many_images_for_the_queue_is_413_naming_the_limit(tmp_path):
    write_model(tmp_path, "q16", batch={"max_queue_size": 16, "max_batch_size": 4})

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            with pytest.raises(errors.PayloadTooLarge, match=r"max_queue_size 16"):
                await engine.detect("q16", [image(b"ok")] * 20)
            assert len(await engine.detect("q16", [image(b"ok")] * 16)) == 16  # a full queue's worth fits
            dp = DataPlane(engine, max_images_per_request=8)
            with pytest.raises(errors.PayloadTooLarge, match=r"max_images_per_request \(8\)"):
                await dp.detect("q16", [image(b"ok")] * 9, dp.options(engine.model_info("q16")), protocol=Door.REST)

    asyncio.run(scenario())
    assert errors.http_status(errors.PayloadTooLarge("x")) == 413


def test_readiness_follows_start_up_and_draining(tmp_path):
    write_model(tmp_path, "r")

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            dp = DataPlane(engine)
            assert dp.ready() and dp.model_ready("r") and dp.state() == "ready"
            dp.starting = True
            assert not dp.ready() and not dp.model_ready("r") and dp.state() == "starting" and dp.live()
            dp.starting, dp.draining = False, True
            assert not dp.ready() and not dp.model_ready("r") and dp.state() == "draining"
            # Accepted work still completes while draining.
            assert len(await dp.detect("r", [image(b"ok")], dp.options(engine.model_info("r")), protocol=Door.REST)) == 1

    asyncio.run(scenario())


def test_random_model_names_make_one_series(tmp_path):
    write_model(tmp_path, "known")

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            dp = DataPlane(engine)
            before = _series()
            for i in range(3000):
                dp.record(f"random-{i}", "grpc", "INVALID_ARGUMENT", 0.001)
                dp.record(f"random-{i}", "kserve_rest", 400, 0.001)
            dp.record("known", "grpc", "OK", 0.001)
            return before, _series()

    before, after = asyncio.run(scenario())
    new = after - before
    assert {labels["model"] for labels in map(dict, new)} <= {metrics.UNKNOWN_MODEL, "known"}
    # O(1): a counter per (label, protocol, code) and a histogram per (label, protocol), not per name.
    assert len(new) < 100


def _series() -> set[tuple]:
    out = set()
    for family in metrics.REGISTRY.collect():
        for s in family.samples:
            if "model" in s.labels:
                out.add(tuple(sorted(s.labels.items())))
    return out


# ---- the issue-18 knobs: one rule each, one message naming the parameter and what it accepts ------

@pytest.mark.parametrize("field, value, allowed", [
    ("iou_thr", 0, "(0, 1]"),
    ("iou_thr", "1.01", "(0, 1]"),
    ("iou_thr", "nan", "finite"),
    ("iou_thr", True, "boolean"),
    ("class_agnostic", "yes", "true, false, 1, 0"),
    ("class_agnostic", 2, "true, false, 1, 0"),
    ("class_agnostic", [True], "true, false, 1, 0"),
    ("normalized", "maybe", "true, false, 1, 0"),
    ("box_format", "xyxyxy", "xyxy, xywh, cxcywh"),
    ("box_format", 3, "xyxy, xywh, cxcywh"),
    ("mask_format", "bitmap", "rle, polygon, none"),
    ("tile", "big", "auto, off or a tile side in pixels within [32, 8192]"),
    ("tile", 31, "[32, 8192]"),
    ("tile", "8193", "[32, 8192]"),
    ("tile", 512.5, "[32, 8192]"),
    ("tile", "inf", "[32, 8192]"),
    ("tile", "\uff15\uff11\uff12", "[32, 8192]"),  # fullwidth "512"
    ("tile", "5_12", "[32, 8192]"),
    ("tile", True, "[32, 8192]"),
    ("tile_overlap", 0.51, "[0, 0.5]"),
    ("tile_overlap", -0.1, "[0, 0.5]"),
    ("tile_overlap", "x", "must be a number"),
    ("tile_merge", "wbf", "nms, nmm"),
])
def test_every_bad_knob_is_one_invalid_request_naming_parameter_and_allowed_values(field, value, allowed):
    with pytest.raises(errors.InvalidRequest) as caught:
        DataPlane(object()).options(_info(), **{field: value})
    assert caught.value.message.startswith(field) and allowed in caught.value.message
    assert errors.http_status(caught.value) == 400


def test_knobs_from_query_strings_json_and_proto_agree():
    from service.types import BoxFormat, MaskFormat, TileMerge

    dp = DataPlane(object())
    query = dp.options_from(_info(), {"iou_thr": "0.4", "class_agnostic": "TRUE", "box_format": "xywh",
                                      "normalized": "1", "mask_format": "polygon", "tile": "512",
                                      "tile_overlap": "0.25", "tile_merge": "NMM", "unknown": "ignored"})
    json_like = dp.options_from(_info(), {"iou_thr": 0.4, "class_agnostic": True, "box_format": "xywh",
                                          "normalized": 1, "mask_format": "polygon", "tile": 512.0,
                                          "tile_overlap": 0.25, "tile_merge": "nmm"})
    assert query == json_like
    assert (query.iou_thr, query.class_agnostic, query.box_format, query.normalized, query.mask_format,
            query.tile, query.tile_overlap, query.tile_merge) == (
        0.4, True, BoxFormat.XYWH, True, MaskFormat.POLYGON, 512, 0.25, TileMerge.NMM)
    assert dp.options(_info(), tile="AUTO").tile == "auto" and dp.options(_info(), tile="off").tile == "off"
    assert dp.options(_info(), class_agnostic="0").class_agnostic is False
    assert dp.options(_info(), iou_thr=1).iou_thr == 1.0 and dp.options(_info(), tile_overlap=0).tile_overlap == 0.0
    # proto3 strings and blank query values cannot say "unset" otherwise: empty is the model's default
    blank = dp.options_from(_info(), {name: "" for name in ("iou_thr", "class_agnostic", "box_format", "normalized",
                                                            "mask_format", "tile", "tile_overlap", "tile_merge")})
    assert blank == dp.options(_info())
