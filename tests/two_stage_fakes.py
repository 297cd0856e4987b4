"""Random-weight two-stage detectors that actually detect, for tests (the spec's §7 recipe, which lives in
service/detectors/two_stage/calibrate.py so that the benchmark builds the same models)."""
from __future__ import annotations

from service.detectors.two_stage.calibrate import CALIBRATION_SCALE, detecting_model, save_detecting_checkpoint, shapes_image

SMALL_SCALE = CALIBRATION_SCALE  # resize target for tests: a 160x128 image keeps its size (sf 1) and needs no padding

__all__ = ["SMALL_SCALE", "detecting_model", "shapes_image", "write_two_stage_model"]


def write_two_stage_model(store, name: str, arch: str = "mask-rcnn-r50-fpn", classes=("a", "b", "c"), *,
                          backend: str = "eager", max_per_img: int = 5, extra: str = ""):
    """A model folder serving a calibrated random-weight two-stage detector at SMALL_SCALE, cheap test_cfg."""
    from pathlib import Path

    folder = Path(store) / name
    folder.mkdir(parents=True, exist_ok=True)
    save_detecting_checkpoint(folder / "weights.pth", arch, classes)
    (folder / "model.toml").write_text(
        f'name = "{name}"\narch = "{arch}"\nweights = "weights.pth"\nbackend = "{backend}"\n'
        f"resize_scale = [{SMALL_SCALE[0]}, {SMALL_SCALE[1]}]\ndefault_score_thr = 0.05\n{extra}"
        f"[test_cfg]\niou_threshold = 0.5\nmax_per_img = {max_per_img}\n[test_cfg.rpn]\nmax_per_img = 150\n"
        "[workers]\ncount = 1\nthreads = 1\n[batch]\nmax_batch_size = 4\n")
    return folder
