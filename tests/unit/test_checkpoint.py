"""Checkpoint loading: mmdet/mmengine .pth (legacy and zip) without mmengine, plain state_dicts, our format,
and refusal of pickles that would run code."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch

from service.detectors.checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint
from service.detectors.coco import COCO_CLASSES
from service.detectors.registry import build_detector
from service.detectors.safe_load import safe_torch_load
from service.errors import ConfigError

FAKE_MODULES = ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer", "mmengine.structures")


@contextlib.contextmanager
def fake_mmengine():
    """Real-looking mmengine classes for pickling only; removed again before anything is loaded."""
    assert importlib.util.find_spec("mmengine") is None, "this test proves loading works without mmengine"
    mods = {name: types.ModuleType(name) for name in FAKE_MODULES}

    class HistoryBuffer:  # mirrors mmengine's attributes
        def __init__(self, log_history, count_history, max_length=1000000):
            self._log_history = np.asarray(log_history, dtype=np.float64)
            self._count_history = np.asarray(count_history, dtype=np.int64)
            self.max_length = max_length

    class InstanceData:
        def __init__(self):
            self._metainfo_fields = {"img_shape"}
            self.img_shape = (640, 640)

    for cls, module in ((HistoryBuffer, "mmengine.logging.history_buffer"), (InstanceData, "mmengine.structures")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(mods[module], cls.__name__, cls)
    sys.modules.update(mods)
    try:
        yield mods
    finally:
        for name in FAKE_MODULES:
            sys.modules.pop(name, None)


def mmdet_style_checkpoint(model: torch.nn.Module, mods, classes_key: str = "CLASSES") -> dict:
    HistoryBuffer = mods["mmengine.logging.history_buffer"].HistoryBuffer
    InstanceData = mods["mmengine.structures"].InstanceData
    ema_weights = OrderedDict(model.state_dict())
    raw = OrderedDict(("module." + k, v.clone()) for k, v in ema_weights.items())
    raw["steps"] = torch.tensor(1000)
    return {
        "meta": {
            "dataset_meta": {classes_key: ("cat", "dog", "bird"), "PALETTE": [(220, 20, 60)] * 3},
            "cfg": "model = dict(type='RTMDet')",
            "seed": np.int64(42),
            "mmengine_version": "0.1.0",
            "epoch": 300,
        },
        "state_dict": ema_weights,  # EMAHook swaps: state_dict holds the EMA weights
        "ema_state_dict": raw,
        "message_hub": {
            "log_scalars": {"train/loss": HistoryBuffer([1.5, 1.2], [1, 1]), "train/lr": HistoryBuffer([0.004], [1])},
            "runtime_info": {"epoch": 300, "iter": np.int64(123456), "loss": np.float32(0.5), "sample": InstanceData()},
            "resumed_keys": {"epoch": True},
        },
        "optimizer": {
            "state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
            "param_groups": [{"lr": np.float64(0.004), "betas": (0.9, 0.999), "params": [0]}],
        },
        "param_schedulers": [{"start_factor": 1e-05, "by_epoch": False, "last_step": 1000}],
    }


@pytest.fixture(scope="module")
def tiny3():
    torch.manual_seed(0)
    model = build_detector("rtmdet-tiny", num_classes=3)
    with torch.no_grad():  # non-default BN stats so a wrong load would show
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_mmdet_checkpoint_with_mmengine_objects_loads_strictly_without_mmengine(tmp_path, tiny3, legacy):
    path = tmp_path / "rtmdet_tiny.pth"
    with fake_mmengine() as mods:
        torch.save(mmdet_style_checkpoint(tiny3, mods), path, _use_new_zipfile_serialization=not legacy)
    assert "mmengine" not in sys.modules

    ckpt = load_checkpoint(path)
    assert ckpt.classes == ("cat", "dog", "bird")
    assert ckpt.meta["cfg"].startswith("model")
    assert "mmengine" not in sys.modules

    model = build_detector("rtmdet-tiny", num_classes=3)
    result = load_weights(model, ckpt, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in tiny3.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    # the mmengine objects came back as inert stand-ins holding their data
    raw = safe_torch_load(path)
    buffer = raw["message_hub"]["log_scalars"]["train/loss"]
    assert type(buffer).__module__ == "mmengine.logging.history_buffer"
    np.testing.assert_allclose(buffer._log_history, [1.5, 1.2])
    assert raw["message_hub"]["runtime_info"]["iter"] == 123456
    assert raw["message_hub"]["runtime_info"]["sample"].img_shape == (640, 640)


def test_lowercase_dataset_meta_classes(tmp_path, tiny3):
    path = tmp_path / "new.pth"
    with fake_mmengine() as mods:
        torch.save(mmdet_style_checkpoint(tiny3, mods, classes_key="classes"), path)
    assert load_checkpoint(path).classes == ("cat", "dog", "bird")


class RunsShell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class Evaluates:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('pwned').touch()",))


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
@pytest.mark.parametrize("payload", ["os.system", "eval", "raw_pickle"])
def test_pickle_that_runs_code_is_refused(tmp_path, tiny3, legacy, payload, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if payload == "raw_pickle":
        path.write_bytes(pickle.dumps(RunsShell(f"touch {marker}"), protocol=2))
    else:
        evil = RunsShell(f"touch {marker}") if payload == "os.system" else Evaluates()
        obj = {"meta": {"hook": evil}, "state_dict": tiny3.state_dict()}
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ConfigError, match="refusing to load") as err:
        load_checkpoint(path)
    assert ("eval" if payload == "eval" else "system") in str(err.value)
    assert not marker.exists()


def test_a_checkpoint_whose_entries_inflate_is_refused_before_loading(tmp_path):
    """torch.save stores tensors uncompressed: a zip whose entries expand far beyond the file is a
    bomb (a 2 MB file expanded to 2 GiB in torch.load), refused before anything is read."""
    import zipfile

    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {"w": torch.zeros(8 << 20)}}, plain)  # 32 MiB of zeros
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(ConfigError, match="expand to .* bytes from a file of"):
        load_checkpoint(bomb)
    assert safe_torch_load(plain)["state_dict"]["w"].numel() == 8 << 20  # stored plainly, it loads


def test_plain_and_wrapped_state_dicts_with_module_prefix(tmp_path, tiny3):
    sd = tiny3.state_dict()
    torch.save(sd, tmp_path / "plain.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "wrapped.pth")
    for name in ("plain.pth", "wrapped.pth"):
        ckpt = load_checkpoint(tmp_path / name)
        assert ckpt.classes is None  # caller falls back to COCO_CLASSES
        assert set(ckpt.state_dict) == set(sd)
        load_weights(build_detector("rtmdet-tiny", 3), ckpt)


def test_own_format_round_trip_fp16_into_fp32_model(tmp_path, tiny3):
    path = tmp_path / "model.pth"
    save_checkpoint(path, tiny3.state_dict(), classes=["a", "b", "c"], meta={"trained_on": "shapes"}, fp16=True)
    ckpt = load_checkpoint(path)
    assert ckpt.classes == ("a", "b", "c") and ckpt.meta == {"trained_on": "shapes"}
    assert ckpt.state_dict["bbox_head.rtm_cls.0.weight"].dtype == torch.float16
    assert ckpt.state_dict["backbone.stem.0.bn.num_batches_tracked"].dtype == torch.int64
    model = build_detector("rtmdet-tiny", 3)
    load_weights(model, ckpt)
    weight = model.state_dict()["bbox_head.rtm_cls.0.weight"]
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, tiny3.state_dict()["bbox_head.rtm_cls.0.weight"], atol=1e-3, rtol=1e-3)
    # shared convs are stored once even though three keys name them
    assert ckpt.state_dict["bbox_head.cls_convs.1.0.conv.weight"].untyped_storage().data_ptr() == \
        ckpt.state_dict["bbox_head.cls_convs.0.0.conv.weight"].untyped_storage().data_ptr()


def test_classes_fallbacks(tmp_path, tiny3):
    sd = tiny3.state_dict()
    torch.save({"meta": {"classes": ["x", "y", "z"]}, "state_dict": sd}, tmp_path / "a.pth")
    torch.save({"meta": {"dataset_meta": {"palette": []}}, "state_dict": sd}, tmp_path / "b.pth")
    assert load_checkpoint(tmp_path / "a.pth").classes == ("x", "y", "z")
    assert load_checkpoint(tmp_path / "b.pth").classes is None
    assert len(COCO_CLASSES) == 80 and COCO_CLASSES[0] == "person" and COCO_CLASSES[-1] == "toothbrush"


def test_mmyolo_checkpoint_is_rejected(tmp_path):
    torch.save({"state_dict": {"bbox_head.head_module.cls_convs.0.0.conv.weight": torch.zeros(1)}},
               tmp_path / "yolo.pth")
    with pytest.raises(ConfigError, match="MMYOLO"):
        load_checkpoint(tmp_path / "yolo.pth")


def test_unreadable_files_give_config_errors(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    torch.save({"state_dict": {"a": 1}}, tmp_path / "nontensor.pth")
    with pytest.raises(ConfigError, match="not a tensor"):
        load_checkpoint(tmp_path / "nontensor.pth")


def test_load_weights_explains_mismatches(tiny3):
    sd = dict(tiny3.state_dict())
    sd.pop("neck.out_convs.0.conv.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError) as err:
        load_weights(build_detector("rtmdet-tiny", 80), Checkpoint(sd, None, {}))
    message = str(err.value)
    assert "1 missing: neck.out_convs.0.conv.weight" in message
    assert "1 unexpected: extra.weight" in message
    assert "the checkpoint has 3 classes, the model 80" in message
    with pytest.raises(ConfigError, match="architecture .* look like rtmdet-tiny"):
        load_weights(build_detector("rtmdet-s", 3), tiny3.state_dict())
    result = load_weights(build_detector("rtmdet-tiny", 3), {k: v for k, v in sd.items() if k != "extra.weight"},
                          strict=False)
    assert result.missing_keys == ["neck.out_convs.0.conv.weight"]


def test_numpy_1x_global_names_load(tmp_path, tiny3):
    """2022 files were written with numpy 1.x, whose pickles name `numpy.core.multiarray`."""
    path = tmp_path / "np1.pth"
    obj = {"meta": {"seed": np.int64(7), "hist": np.arange(3.0)}, "state_dict": tiny3.state_dict()}
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b"numpy._core.multiarray\nscalar" in data  # GLOBAL opcodes are newline-terminated text
    path.write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    ckpt = load_checkpoint(path)
    assert ckpt.meta["seed"] == 7
    np.testing.assert_array_equal(ckpt.meta["hist"], [0.0, 1.0, 2.0])


@pytest.mark.gpu
def test_loaded_weights_run_on_cuda_in_fp16(tmp_path, tiny3):
    path = tmp_path / "m.pth"
    save_checkpoint(path, tiny3.state_dict(), ["a", "b", "c"], fp16=True)
    model = build_detector("rtmdet-tiny", 3).cuda().half()
    load_weights(model, load_checkpoint(path))
    x = torch.randn(1, 3, 320, 320)
    with torch.inference_mode():
        out16 = model(x.cuda().half())
        out32 = tiny3.eval()(x)
    for a, b in zip(out16, out32):
        assert ((a.float().cpu() - b).norm() / b.norm().clamp_min(1e-6)) < 0.02
