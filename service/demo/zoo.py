"""Official MMDetection COCO checkpoints (RTMDet[-Ins]: spec §6; Faster/Mask R-CNN: two-stage spec §4)
and `models pull`.

A pull streams the file with a progress bar, hashes it on the way, checks the sha256 prefix that
OpenMMLab embeds in the file name (`..._<8 hex>.pth`), loads it once to be sure it is a checkpoint
our loader accepts, and only then moves the finished folder into the store.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from service.errors import DetserveError

DEFAULT_BASE_URL = "https://download.openmmlab.com/mmdetection/v3.0/rtmdet/"
# mmdet 3.x serves its Faster/Mask R-CNN configs with these 2.x-trained files (configs/*/metafile.yml)
TWO_STAGE_BASE_URL = "https://download.openmmlab.com/mmdetection/v2.0/"
HASH_RE = re.compile(r"-([0-9a-f]{8})\.pth$")


class PullError(DetserveError):
    code = "pull_failed"


@dataclass(frozen=True)
class ZooEntry:
    name: str  # model name in the store, e.g. "rtmdet-tiny-coco"
    arch: str
    path: str  # relative to the base URL
    base_url: str = DEFAULT_BASE_URL

    @property
    def file_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str:
        match = HASH_RE.search(self.file_name)
        assert match, self.file_name
        return match.group(1)


_FILES = {
    "rtmdet-tiny": "rtmdet_tiny_8xb32-300e_coco/rtmdet_tiny_8xb32-300e_coco_20220902_112414-78e30dcc.pth",
    "rtmdet-s": "rtmdet_s_8xb32-300e_coco/rtmdet_s_8xb32-300e_coco_20220905_161602-387a891e.pth",
    "rtmdet-m": "rtmdet_m_8xb32-300e_coco/rtmdet_m_8xb32-300e_coco_20220719_112220-229f527c.pth",
    "rtmdet-l": "rtmdet_l_8xb32-300e_coco/rtmdet_l_8xb32-300e_coco_20220719_112030-5a0be7c4.pth",
    "rtmdet-x": "rtmdet_x_8xb32-300e_coco/rtmdet_x_8xb32-300e_coco_20220715_230555-cc79b9ae.pth",
    "rtmdet-ins-tiny": "rtmdet-ins_tiny_8xb32-300e_coco/rtmdet-ins_tiny_8xb32-300e_coco_20221130_151727-ec670f7e.pth",
    "rtmdet-ins-s": "rtmdet-ins_s_8xb32-300e_coco/rtmdet-ins_s_8xb32-300e_coco_20221121_212604-fdc5d7ec.pth",
    "rtmdet-ins-m": "rtmdet-ins_m_8xb32-300e_coco/rtmdet-ins_m_8xb32-300e_coco_20221123_001039-6eba602e.pth",
    "rtmdet-ins-l": "rtmdet-ins_l_8xb32-300e_coco/rtmdet-ins_l_8xb32-300e_coco_20221124_103237-78d1d652.pth",
    "rtmdet-ins-x": "rtmdet-ins_x_8xb16-300e_coco/rtmdet-ins_x_8xb16-300e_coco_20221124_111313-33d4595b.pth",
}
# the 1x schedules of mmdet's metafiles (the 3x files are the same networks, trained longer)
_TWO_STAGE_FILES = {
    "faster-rcnn-r50-fpn": "faster_rcnn/faster_rcnn_r50_fpn_1x_coco/faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth",
    "faster-rcnn-r101-fpn": "faster_rcnn/faster_rcnn_r101_fpn_1x_coco/faster_rcnn_r101_fpn_1x_coco_20200130-f513f705.pth",
    "faster-rcnn-x101-32x4d-fpn": "faster_rcnn/faster_rcnn_x101_32x4d_fpn_1x_coco/"
                                  "faster_rcnn_x101_32x4d_fpn_1x_coco_20200203-cff10310.pth",
    "mask-rcnn-r50-fpn": "mask_rcnn/mask_rcnn_r50_fpn_1x_coco/mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth",
    "mask-rcnn-r101-fpn": "mask_rcnn/mask_rcnn_r101_fpn_1x_coco/mask_rcnn_r101_fpn_1x_coco_20200204-1efe0ed5.pth",
    "mask-rcnn-x101-32x4d-fpn": "mask_rcnn/mask_rcnn_x101_32x4d_fpn_1x_coco/"
                                "mask_rcnn_x101_32x4d_fpn_1x_coco_20200205-478d0b67.pth",
}
ZOO: dict[str, ZooEntry] = {
    **{f"{arch}-coco": ZooEntry(f"{arch}-coco", arch, path) for arch, path in _FILES.items()},
    **{f"{arch}-coco": ZooEntry(f"{arch}-coco", arch, path, TWO_STAGE_BASE_URL) for arch, path in _TWO_STAGE_FILES.items()},
}


def lookup(name: str, zoo: Mapping[str, ZooEntry] = ZOO) -> ZooEntry:
    key = name if name in zoo else f"{name}-coco"
    if key not in zoo:
        raise PullError(f"unknown model {name!r}; available: {', '.join(zoo)}")
    return zoo[key]


def model_toml(name: str, arch: str, weights: str, classes: list[str] | None, has_masks: bool,
               two_stage: bool = False) -> str:
    """model.toml for an official COCO checkpoint: RTMDet at 640 with the README's deployment test_cfg;
    two-stage at mmdet's 1333x800 with its test_cfg (rcnn NMS 0.5, RPN defaults)."""
    lines = [
        f"# Official MMDetection {arch} COCO checkpoint, fetched by `detserve models pull`.",
        f'name = "{name}"',
        f'arch = "{arch}"',
        f'weights = "{weights}"',
    ]
    if classes:
        lines.append("classes = [" + ", ".join(_toml_str(c) for c in classes) + "]")
    if two_stage:
        lines += ["resize_scale = [1333, 800]", "default_score_thr = 0.3", "", "[test_cfg]", "score_thr = 0.05",
                  "iou_threshold = 0.5", "max_per_img = 100"]
    else:
        lines += ["input_size = 640", "default_score_thr = 0.3", "", "[test_cfg]", "nms_pre = 1000",
                  "score_thr = 0.05", f"iou_threshold = {0.6 if has_masks else 0.65}", "max_per_img = 100"]
    if has_masks:
        lines.append("mask_thr_binary = 0.5")
    if two_stage:
        lines += ["", "[test_cfg.rpn]", "nms_pre = 1000", "max_per_img = 1000", "iou_threshold = 0.7"]
    return "\n".join(lines) + "\n"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# The largest official MMDetection checkpoint of the zoo's families is under 600 MB: a mirror (or a
# redirect) sending more is not sending a checkpoint, and must not fill the disk.
MAX_DOWNLOAD_BYTES = 2 << 30


def download(url: str, dest: Path, *, progress: bool = True, timeout_s: float = 30.0,
             max_bytes: int | None = None) -> str:
    """Stream url to dest; returns the sha256 hex digest. Raises PullError on any network failure
    and on a file over `max_bytes` (default MAX_DOWNLOAD_BYTES)."""
    max_bytes = MAX_DOWNLOAD_BYTES if max_bytes is None else max_bytes
    import httpx
    from tqdm import tqdm

    digest = hashlib.sha256()
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=timeout_s) as response:
            if response.status_code != 200:
                raise PullError(f"download of {url} failed: HTTP {response.status_code}")
            total = int(response.headers.get("content-length") or 0) or None
            too_big = PullError(f"{url} is over {max_bytes} bytes: not a checkpoint of the zoo's families")
            if total is not None and total > max_bytes:
                raise too_big
            written = 0
            with open(dest, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                               desc=dest.name, disable=not progress) as bar:
                for chunk in response.iter_bytes(1 << 20):
                    written += len(chunk)
                    if written > max_bytes:
                        raise too_big
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except httpx.HTTPError as exc:
        raise PullError(f"cannot download {url}: {exc.__class__.__name__}: {exc or 'no details'} "
                        "(no network? the official checkpoints need internet access; you can also copy "
                        "a .pth into a model folder by hand)") from None
    return digest.hexdigest()


def pull(name: str, store: Path, *, base_url: str | None = None, force: bool = False,
         progress: bool = True, zoo: Mapping[str, ZooEntry] = ZOO) -> Path:
    """Fetch an official checkpoint into `store/<name>/` with a generated model.toml.

    `base_url`: a mirror of the entry's official folder (None: the entry's own, download.openmmlab.com)."""
    from service.detectors.checkpoint import load_checkpoint
    from service.detectors.registry import get_detector

    entry = lookup(name, zoo)
    target = store / entry.name
    if target.exists() and not force:
        raise PullError(f"{target} already exists (use --force to replace it)")
    store.mkdir(parents=True, exist_ok=True)
    url = (base_url or entry.base_url).rstrip("/") + "/" + entry.path
    with tempfile.TemporaryDirectory(dir=store, prefix=f".{entry.name}.") as tmp:
        staging = Path(tmp)
        weights = staging / entry.file_name
        sha = download(url, weights, progress=progress)
        if not sha.startswith(entry.sha256_prefix):
            raise PullError(f"{entry.file_name}: sha256 {sha[:8]}... does not match the expected prefix "
                            f"{entry.sha256_prefix} from the file name; the download is corrupt or not the "
                            "official file")
        try:
            checkpoint = load_checkpoint(weights)
        except Exception as exc:  # any loader failure means the file is unusable here
            raise PullError(f"{entry.file_name}: downloaded but not a loadable checkpoint: {exc}") from None
        classes = list(checkpoint.classes) if checkpoint.classes else None
        detector = get_detector(entry.arch)
        (staging / "model.toml").write_text(model_toml(entry.name, entry.arch, entry.file_name, classes,
                                                       detector.has_masks, two_stage=detector.family == "two-stage"))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        staging.mkdir()  # TemporaryDirectory cleans up a path that must exist
    return target
