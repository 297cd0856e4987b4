"""The Predictor end to end on real (randomly initialised) RTMDet models in temporary model folders."""
from __future__ import annotations

import re
import threading

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from service.detectors.checkpoint import save_checkpoint
from service.detectors.registry import build_detector, get_detector
from service.errors import ConfigError, ImageTooLarge, InvalidImage, InvalidRequest, UnsupportedMediaType
from service.pipeline.predictor import Predictor, model_version
from service.settings import load_model_config
from service.types import DetectOptions, DetectResult, EncodedImage, RawImage, RenderFormat

CLASSES = ["cat", "dog", "bird"]


def write_model(folder, arch: str, *, classes=CLASSES, toml_extra: str = "", seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_detector(arch, len(classes))
    for module in model.modules():  # default init lets activations vanish: every score would tie
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    state_dict = model.state_dict()
    for key, value in state_dict.items():
        if key.startswith("bbox_head.rtm_reg.") and key.endswith(".bias"):
            value.fill_(1.5)  # default init regresses negative distances: boxes with no area
        if key.startswith("bbox_head.rtm_cls.") and key.endswith(".weight"):
            value.mul_(30)  # spread the scores, which default init keeps near 0.5
    save_checkpoint(folder / "weights.pth", state_dict, classes, {"arch": arch})
    (folder / "model.toml").write_text(
        f'backend = "eager"\narch = "{arch}"\nweights = "weights.pth"\ninput_size = 128\ndevice = "cpu"\n'
        f"default_score_thr = 0.0\n{toml_extra}\n"
    )
    return folder


@pytest.fixture(scope="module")
def det_predictor(tmp_path_factory):
    folder = write_model(tmp_path_factory.mktemp("store") / "tiny", "rtmdet-tiny", toml_extra="[test_cfg]\nscore_thr = 0.0\nmax_per_img = 50")
    predictor = Predictor.from_config(load_model_config(folder), threads=1)
    yield predictor
    predictor.close()


def jpeg(h: int, w: int, seed: int = 0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", cv2.GaussianBlur(img, (7, 7), 2))[1].tobytes()


def png(h: int, w: int) -> bytes:
    return cv2.imencode(".png", np.full((h, w, 3), 90, np.uint8))[1].tobytes()


def test_attributes(det_predictor):
    p = det_predictor
    assert (p.name, p.arch, p.classes, p.has_masks, p.input_size, p.device, p.backend_name) == (
        "tiny", "rtmdet-tiny", tuple(CLASSES), False, 128, "cpu", "eager"
    )
    assert re.fullmatch(r"tiny-[0-9a-f]{8}", p.version)
    assert p.version == model_version(p.cfg)
    assert p.working_size() == (128, 128)  # RTMDet letterboxes into its square input


def test_batch_with_a_bad_image_returns_per_image_results(det_predictor):
    images = [EncodedImage(jpeg(150, 300)), EncodedImage(b"not an image at all"), EncodedImage(png(64, 40)),
              EncodedImage(jpeg(100, 100)[:200])]
    results = det_predictor.predict(images, [DetectOptions()] * 4)
    assert len(results) == 4
    assert isinstance(results[1], UnsupportedMediaType) and isinstance(results[3], InvalidImage)
    for result, (h, w) in ((results[0], (150, 300)), (results[2], (64, 40))):
        assert isinstance(result, DetectResult)
        assert (result.image_height, result.image_width) == (h, w)
        assert result.model_name == "tiny" and result.model_version == det_predictor.version
        assert 0 < len(result.detections) <= 50
        scores = [d.score for d in result.detections]
        assert scores == sorted(scores, reverse=True)
        for d in result.detections:
            x1, y1, x2, y2 = d.box_xyxy
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert d.class_name == CLASSES[d.label] and d.mask is None
        t = result.times
        assert t.decode > 0 and t.preprocess > 0 and t.inference > 0 and t.postprocess > 0


def test_batched_equals_single(det_predictor):
    images = [EncodedImage(jpeg(150, 300, seed=1)), EncodedImage(jpeg(200, 120, seed=2))]
    batched = det_predictor.predict(images, [DetectOptions()] * 2)
    for image, together in zip(images, batched):
        (alone,) = det_predictor.predict([image], [DetectOptions()])
        assert [d.label for d in alone.detections] == [d.label for d in together.detections]
        np.testing.assert_allclose(
            [d.box_xyxy for d in alone.detections], [d.box_xyxy for d in together.detections], atol=1e-3
        )


def test_request_options(det_predictor):
    image = EncodedImage(jpeg(120, 160))
    (everything,) = det_predictor.predict([image], [DetectOptions(score_thr=0.0)])
    scores = [d.score for d in everything.detections]
    distinct = sorted(set(scores))
    assert len(distinct) > 1
    cut = distinct[len(distinct) // 2]
    wanted = everything.detections[-1].class_name
    opts = [
        DetectOptions(score_thr=cut),
        DetectOptions(max_dets=3),
        DetectOptions(score_thr=0.0, classes=(wanted,)),
        DetectOptions(classes=("unicorn",)),
        DetectOptions(score_thr=1.5),
        DetectOptions(max_dets=-1),
    ]
    above, top3, one_class, unknown, bad_thr, bad_max = det_predictor.predict([image] * 6, opts)
    # >= keeps the detections scoring exactly the threshold
    assert len(above.detections) == sum(s >= cut for s in scores) < len(scores)
    assert [d.score for d in top3.detections] == [d.score for d in everything.detections[:3]]
    assert [d.box_xyxy for d in one_class.detections] == [
        d.box_xyxy for d in everything.detections if d.class_name == wanted
    ]
    assert isinstance(unknown, InvalidRequest) and "unicorn" in unknown.message
    assert isinstance(bad_thr, InvalidRequest) and isinstance(bad_max, InvalidRequest)


def test_raw_input_render_and_pixel_limit(det_predictor):
    rgb = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    raw = RawImage(pixels=rgb.tobytes(), height=90, width=70, channel_order="RGB")
    (result,) = det_predictor.predict([raw], [DetectOptions(render=RenderFormat.PNG, max_dets=5)])
    drawn = cv2.imdecode(np.frombuffer(result.rendered, np.uint8), cv2.IMREAD_COLOR)
    assert drawn.shape == (90, 70, 3)
    assert not np.array_equal(drawn, rgb[:, :, ::-1])  # something was drawn
    (jpeg_result,) = det_predictor.predict([raw], [DetectOptions(render=RenderFormat.JPEG)])
    assert jpeg_result.rendered[:3] == b"\xff\xd8\xff"
    huge = RawImage(pixels=b"\x00" * 3, height=1, width=1)
    small_limit = Predictor(
        det_predictor.cfg.model_copy(update={"max_image_pixels": 100}), backend=det_predictor._backend,
        detector=get_detector(det_predictor.arch), classes=det_predictor.classes, device="cpu", version="v",
    )
    ok, too_big = small_limit.predict([huge, EncodedImage(png(20, 20))], [DetectOptions()] * 2)
    assert isinstance(ok, DetectResult) and isinstance(too_big, ImageTooLarge)


def test_ins_model_returns_rle_masks_in_image_coordinates(tmp_path):
    folder = write_model(tmp_path / "ins", "rtmdet-ins-tiny", toml_extra="[test_cfg]\nmax_per_img = 10")
    predictor = Predictor.from_config(load_model_config(folder), threads=1)
    try:
        assert predictor.has_masks
        (result,) = predictor.predict([EncodedImage(jpeg(96, 160))], [DetectOptions()])
        assert 0 < len(result.detections) <= 10
        for d in result.detections:
            assert (d.mask.height, d.mask.width) == (96, 160)
            decoded = mask_utils.decode({"size": [96, 160], "counts": d.mask.counts.encode()})
            assert decoded.shape == (96, 160)
            assert d.to_torchserve()["segmentation"]["size"] == [96, 160]
    finally:
        predictor.close()


def test_null_arch(tmp_path):
    (tmp_path / "model.toml").write_text('arch = "null"\n')
    predictor = Predictor.from_config(load_model_config(tmp_path))
    results = predictor.predict([EncodedImage(b"whatever"), EncodedImage(b"")], [DetectOptions()] * 2)
    assert [(r.detections, r.image_width, r.image_height) for r in results] == [([], 0, 0)] * 2
    assert predictor.version == tmp_path.name and predictor.backend_name == "null"


def test_class_sources_and_mismatch(tmp_path):
    folder = write_model(tmp_path / "m", "rtmdet-tiny")
    (folder / "names.txt").write_text("x\ny\n\nz\n")
    with open(folder / "model.toml", "a") as f:
        f.write('classes_file = "names.txt"\n')
    predictor = Predictor.from_config(load_model_config(folder))
    assert predictor.classes == ("x", "y", "z")
    predictor.close()
    with pytest.raises(ConfigError, match="2 class names.*predicts 3 classes"):
        Predictor.from_config(load_model_config(folder, classes=["x", "y"], classes_file=None))
    with pytest.raises(ConfigError, match="arch"):
        Predictor.from_config(load_model_config(folder, arch="rtmdet-huge"))
    with pytest.raises(ConfigError, match="weights"):
        Predictor.from_config(load_model_config(folder, weights="missing.pth"))


def test_unavailable_cuda_device_is_a_config_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    folder = write_model(tmp_path / "m", "rtmdet-tiny")
    with pytest.raises(ConfigError, match="cuda:0"):
        Predictor.from_config(load_model_config(folder), device="cuda:0")


@pytest.mark.gpu
def test_cuda_fp16_channels_last_matches_cpu(tmp_path):
    folder = write_model(
        tmp_path / "gpu", "rtmdet-ins-tiny",
        toml_extra='[eager]\nfp16 = true\nchannels_last = true\n[test_cfg]\nmax_per_img = 20',
    )
    images = [EncodedImage(jpeg(200, 300, seed=5)), EncodedImage(jpeg(128, 64, seed=6))]
    gpu = Predictor.from_config(load_model_config(folder), device="cuda")
    cpu = Predictor.from_config(load_model_config(folder), device="cpu")
    try:
        assert gpu.device == "cuda:0" and gpu._backend.fp16
        on_gpu = gpu.predict(images, [DetectOptions()] * 2)
        on_cpu = cpu.predict(images, [DetectOptions()] * 2)
        for g, c in zip(on_gpu, on_cpu):
            assert isinstance(g, DetectResult) and g.detections
            assert g.detections[0].mask is not None
            # fp16 moves scores slightly; the best detection agrees
            assert g.detections[0].score == pytest.approx(c.detections[0].score, abs=0.02)
            np.testing.assert_allclose(g.detections[0].box_xyxy, c.detections[0].box_xyxy, atol=3.0)
    finally:
        gpu.close()
        cpu.close()


def test_cuda_out_of_memory_reaches_the_worker_which_splits_the_batch(det_predictor, monkeypatch):
    # The worker's _BatchRunner halves a batch that ran out of CUDA memory; the real predictor used
    # to turn the error into an InternalError for every image, so it never split.
    from service.engine.messages import BatchRequest, WorkItem
    from service.engine.worker import run_batch

    detector = det_predictor._detector
    real_run = detector.run

    def run_or_oom(backend, inputs, *args, **kwargs):
        if inputs.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return real_run(backend, inputs, *args, **kwargs)

    monkeypatch.setattr(detector, "run", run_or_oom)
    image = EncodedImage(cv2.imencode(".jpg", np.full((96, 128, 3), 90, np.uint8))[1].tobytes())
    request = BatchRequest(1, tuple(WorkItem(i, image, DetectOptions()) for i in range(8)))
    result = run_batch(det_predictor, request, worker_id=0)
    assert all(isinstance(o, DetectResult) for o in result.outcomes), result.outcomes
    assert result.oom_splits == 3  # 8 -> 4 + 4 -> 2 + 2 + 2 + 2


def test_cuda_out_of_memory_while_pasting_masks_splits_the_batch_too(det_predictor, monkeypatch):
    from service.engine.messages import BatchRequest, WorkItem
    from service.engine.worker import run_batch

    real_finish = det_predictor._finish_image

    def finish_or_oom(p, dets, meta, outputs, slot):
        if slot >= 2:  # only batches of more than two images get here
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return real_finish(p, dets, meta, outputs, slot)

    monkeypatch.setattr(det_predictor, "_finish_image", finish_or_oom)
    image = EncodedImage(cv2.imencode(".jpg", np.full((96, 128, 3), 90, np.uint8))[1].tobytes())
    result = run_batch(det_predictor, BatchRequest(1, tuple(WorkItem(i, image, DetectOptions()) for i in range(4))), 0)
    assert all(isinstance(o, DetectResult) for o in result.outcomes), result.outcomes
    assert result.oom_splits == 1


def test_out_of_memory_in_process_is_each_images_typed_error_not_a_crash(det_predictor, monkeypatch, tmp_path):
    from service.doctor import ERROR, check_model
    from service.errors import InternalError
    from service.pipeline.tiling import _predict_or_error

    def oom(images, options):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(det_predictor, "predict", oom)
    out = _predict_or_error(det_predictor, [RawImage(bytes(12), 2, 2)] * 3, [DetectOptions()] * 3)
    assert len(out) == 3 and all(isinstance(o, InternalError) and "out of memory" in o.message for o in out)

    monkeypatch.setattr(Predictor, "predict", lambda self, images, options: oom(images, options))
    folder = write_model(tmp_path / "m", "rtmdet-tiny")
    finding = check_model(load_model_config(folder))
    assert finding.level == ERROR and "OutOfMemoryError" in finding.message


def test_a_batch_decodes_its_whole_images_on_the_worker_threads_with_unchanged_results(det_predictor, monkeypatch):
    from service.pipeline import predictor as predictor_module
    from service.pipeline.tiling import TileImage, TileWindow

    big = EncodedImage(jpeg(150, 300, seed=5))
    images = [EncodedImage(jpeg(120, 90, seed=4)), EncodedImage(b"not an image at all"), EncodedImage(png(64, 40)),
              TileImage(big, "big", TileWindow(0, 0, 150, 150), 300, 150),
              TileImage(big, "big", TileWindow(150, 0, 300, 150), 300, 150), EncodedImage(jpeg(100, 100)[:200])]
    expected = det_predictor.predict(images, [DetectOptions()] * len(images))  # threads=1: one after another
    threads_before = torch.get_num_threads()
    parallel = Predictor.from_config(det_predictor.cfg, threads=2)
    seen: list[str] = []
    real_decode = predictor_module.decode_image

    def recording_decode(data, **kwargs):
        seen.append(threading.current_thread().name)
        return real_decode(data, **kwargs)

    monkeypatch.setattr(predictor_module, "decode_image", recording_decode)
    try:
        got = parallel.predict(images, [DetectOptions()] * len(images))
    finally:
        parallel.close()
        torch.set_num_threads(threads_before)
        cv2.setNumThreads(threads_before)
    assert [type(r) for r in got] == [type(r) for r in expected]
    assert isinstance(got[1], UnsupportedMediaType) and isinstance(got[5], InvalidImage)
    for mine, theirs in zip(got, expected):
        if isinstance(theirs, DetectResult):
            # Equal up to float reduction order: the network itself runs on 2 threads here, not 1.
            assert [d.label for d in mine.detections] == [d.label for d in theirs.detections]
            np.testing.assert_allclose([d.box_xyxy for d in mine.detections],
                                       [d.box_xyxy for d in theirs.detections], atol=1e-3)
            np.testing.assert_allclose([d.score for d in mine.detections], [d.score for d in theirs.detections],
                                       atol=1e-5)
            assert (mine.image_width, mine.image_height) == (theirs.image_width, theirs.image_height)
    # The four whole images on the pool; the tiles' source once, in the calling thread (its cache is not shared).
    assert sorted(name.startswith("decode-tiny") for name in seen) == [False] + [True] * 4
