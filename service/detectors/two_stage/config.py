"""Typed `test_cfg` of the two-stage configs (spec §2); defaults are mmdet's, bounds keep any client value cheap."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RPNTestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    nms_pre: int = Field(1000, ge=1, le=10_000)  # per level
    max_per_img: int = Field(1000, ge=1, le=10_000)
    iou_threshold: float = Field(0.7, gt=0, le=1)


class TwoStageTestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rpn: RPNTestConfig = RPNTestConfig()
    score_thr: float = Field(0.05, ge=0, le=1)  # strict: score > score_thr
    iou_threshold: float = Field(0.5, gt=0, le=1)
    max_per_img: int = Field(100, ge=1, le=1000)
    mask_thr_binary: float = Field(0.5, ge=0, le=1)  # inclusive: p >= thr
    # float bytes one band of a mask paste may hold; bounds peak memory on huge images
    mask_band_bytes: int = Field(16 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)
