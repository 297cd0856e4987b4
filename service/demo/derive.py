"""RTMDet-tiny detection weights from a trained RTMDet-Ins-tiny, without further training.

In RTMDet-Ins the regression branch runs through the classification tower (upstream's
`reg_convs = cls_convs`), so the detection head gets that tower twice: once as its cls tower and
once as its separate reg tower. Backbone, neck, rtm_cls and rtm_reg copy over by name. The only
difference left is the activation: tiny detection decodes `reg * stride`, Ins `relu(reg) * stride`;
they agree wherever the distances are positive, which they are for every prior inside its box.
"""
from __future__ import annotations

from pathlib import Path

CLS_TOWER = "bbox_head.cls_convs."
REG_TOWER = "bbox_head.reg_convs."


def detection_state_from_ins(ins_state: dict) -> dict:
    out = {}
    for key, value in ins_state.items():
        if key.startswith(REG_TOWER):
            continue  # an alias of the cls tower in Ins
        if key.startswith(("bbox_head.kernel_convs.", "bbox_head.rtm_kernel.", "bbox_head.mask_head.")):
            continue
        out[key] = value
        if key.startswith(CLS_TOWER):
            out[REG_TOWER + key[len(CLS_TOWER):]] = value.clone()
    return out


def derive_detection_weights(source: Path, out_dir: Path, *, command: str = "",
                             weights_name: str = "weights.pth") -> Path:
    import torch

    from service.detectors.checkpoint import load_checkpoint, save_checkpoint
    from service.detectors.registry import build_detector

    ckpt = load_checkpoint(source)
    classes = list(ckpt.classes or [])
    model = build_detector("rtmdet-tiny", len(classes))
    state = {k: v.float() for k, v in detection_state_from_ins(ckpt.state_dict).items()}
    model.load_state_dict(state, strict=True)  # every det key must come from the Ins model
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / weights_name
    meta = {"arch": "rtmdet-tiny", "derived_from": str(source), "source_meta": ckpt.meta, "command": command}
    with torch.no_grad():
        save_checkpoint(path, model.state_dict(), classes, meta, fp16=True)
    return path
