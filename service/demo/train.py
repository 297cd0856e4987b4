"""Train the bundled RTMDet-tiny / RTMDet-Ins-tiny on procedural shapes, on CPU.

The network is exactly `build_detector(arch, 5)` (upstream architecture); only the training side is
simplified: a dynamic soft-label assigner, QFL + GIoU, and Dice + BCE on dynamic-conv masks, AdamW
with warm-up and cosine decay, and an EMA of the weights, which is what gets saved (fp16).
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .assigner import assign, distance_to_box, make_priors
from .dataset import CLASSES
from .losses import dice_loss, dynamic_mask_logits, giou_loss, quality_focal_loss
from .traindata import MASK_STRIDE, TrainSet, augmented_sample, build_train_set, to_input_tensor

PRIOR_PROB_BIAS = -math.log((1 - 0.01) / 0.01)  # upstream bias_init_with_prob(0.01)


@dataclass
class TrainConfig:
    arch: str
    out: Path
    iters: int = 1500
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_iters: int = 100
    input_size: int = 320
    num_images: int = 4000
    seed: int = 0
    threads: int = 2
    init_from: Path | None = None  # checkpoint to start from (e.g. the det model for Ins)
    cache: Path | None = None  # rendered training set (.npz): reused when present
    max_masks_per_image: int = 48
    ema_decay: float = 0.995
    save_every: int = 100  # EMA weights are written this often, so a stopped run still leaves a model
    log_every: int = 20
    weights_name: str = "weights.pth"
    extra_meta: dict = field(default_factory=dict)


def split_outputs(outs: tuple, has_masks: bool) -> dict[str, torch.Tensor]:
    """Flatten the detector's per-level outputs (HeadOutputs.flat order) to [B, P, ...]."""

    def flat(levels):
        return torch.cat([t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1]) for t in levels], 1)

    parts = {"cls": flat(outs[0:3]), "ltrb": flat(outs[3:6])}
    if has_masks:
        parts["kernels"] = flat(outs[6:9])
        parts["mask_feat"] = outs[9]
    return parts


def init_head_bias(model: torch.nn.Module) -> None:
    """Upstream-like head init: small normal weights on the 1x1 predictors, prior-prob cls bias."""
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Conv2d):
            continue
        if ".rtm_cls." in f".{name}." or ".rtm_reg." in f".{name}.":
            torch.nn.init.normal_(module.weight, std=0.01)
            # reg bias 1: boxes start one stride wide on each side instead of empty, so the
            # GIoU loss has a useful gradient (and relu(reg) in Ins is not dead) from step 0
            torch.nn.init.constant_(module.bias, PRIOR_PROB_BIAS if "rtm_cls" in name else 1.0)


def load_init(model: torch.nn.Module, path: Path) -> list[str]:
    """Copy every same-named, same-shaped tensor; returns the keys left at their init."""
    from service.detectors.checkpoint import load_checkpoint

    source = load_checkpoint(path).state_dict
    own = model.state_dict()
    # In RTMDet-Ins reg_convs *is* cls_convs: loading a det model's separate reg tower would
    # overwrite the shared classification tower, so keep the cls tower.
    if any(k.startswith("bbox_head.kernel_convs") for k in own):
        source = {k: v for k, v in source.items() if not k.startswith("bbox_head.reg_convs.")}
    usable = {k: v.float() for k, v in source.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return sorted(k for k in own if k not in usable and not k.startswith("bbox_head.reg_convs."))


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_iters:
        return cfg.lr * (0.01 + 0.99 * step / cfg.warmup_iters)
    t = (step - cfg.warmup_iters) / max(1, cfg.iters - cfg.warmup_iters)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():  # shared head convs appear once
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.ndim == 4 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def compute_losses(parts: dict, priors: torch.Tensor, batch: list, has_masks: bool,
                   cfg: TrainConfig, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    boxes = distance_to_box(priors, parts["ltrb"])  # [B, P, 4]
    qfl, giou, dice, bce = [], [], [], []
    norm = 0.0
    num_pos = 0
    for b, sample in enumerate(batch):
        gt_boxes = torch.from_numpy(sample.boxes)
        gt_labels = torch.from_numpy(sample.labels)
        a = assign(priors, parts["cls"][b].detach(), boxes[b].detach(), gt_boxes, gt_labels)
        qfl.append(quality_focal_loss(parts["cls"][b], a.pos_index, gt_labels[a.gt_index], a.iou))
        norm += float(a.iou.sum())
        num_pos += len(a.pos_index)
        if len(a.pos_index):
            g = giou_loss(boxes[b, a.pos_index], gt_boxes[a.gt_index])
            giou.append((g * a.iou).sum())
        if has_masks and len(a.pos_index):
            keep = np.arange(len(a.pos_index))
            if len(keep) > cfg.max_masks_per_image:
                keep = np.sort(rng.choice(keep, cfg.max_masks_per_image, replace=False))
            keep = torch.from_numpy(keep)
            pos = a.pos_index[keep]
            logits = dynamic_mask_logits(parts["mask_feat"][b], parts["kernels"][b, pos], priors[pos])
            logits = F.interpolate(logits[None], scale_factor=8 // MASK_STRIDE, mode="bilinear")[0]
            target = torch.from_numpy(sample.masks)[a.gt_index[keep]]
            dice.append(dice_loss(logits, target))
            bce.append(F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2)))
    norm = max(norm, 1.0)
    losses = {"cls": torch.stack(qfl).sum() / norm}
    zero = parts["cls"].sum() * 0
    losses["box"] = 2.0 * (torch.stack(giou).sum() / norm if giou else zero)
    if has_masks:
        losses["dice"] = 2.0 * (torch.cat(dice).mean() if dice else zero)
        losses["bce"] = torch.cat(bce).mean() if bce else zero
    losses["num_pos"] = torch.tensor(float(num_pos))
    return losses


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # named_parameters/buffers list shared head convs once, so each tensor is averaged once
    source = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, value in [*ema.named_parameters(), *ema.named_buffers()]:
        if value.dtype.is_floating_point:
            value.mul_(decay).add_(source[name].detach(), alpha=1 - decay)
        else:
            value.copy_(source[name])


def load_or_build_train_set(cfg: TrainConfig, log) -> TrainSet:
    if cfg.cache is not None and Path(cfg.cache).is_file():
        data = TrainSet.load(Path(cfg.cache))
        if len(data) == cfg.num_images and data.images.shape[1] == cfg.input_size:
            log(f"loaded training set {cfg.cache} ({len(data)} images)")
            return data
    t0 = time.monotonic()
    data = build_train_set(cfg.num_images, cfg.seed, cfg.input_size, processes=max(1, cfg.threads))
    log(f"rendered {len(data)} training images ({len(data.labels)} shapes) in {time.monotonic() - t0:.0f}s")
    if cfg.cache is not None:
        data.save(Path(cfg.cache))
    return data


def train(cfg: TrainConfig, log=print) -> Path:
    """Run the whole training; returns the saved weights file."""
    from service.detectors.registry import build_detector, get_detector

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed + 1000)
    has_masks = bool(get_detector(cfg.arch).has_masks)
    started = time.monotonic()
    data = load_or_build_train_set(cfg, log)

    model = build_detector(cfg.arch, len(CLASSES))
    init_head_bias(model)
    if cfg.init_from is not None:
        fresh = load_init(model, Path(cfg.init_from))
        log(f"initialised from {cfg.init_from}; {len(fresh)} tensors kept fresh")
    # channels_last makes the CPU convolutions ~25% faster here (oneDNN's preferred layout)
    model = model.to(memory_format=torch.channels_last).train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = make_optimizer(model, cfg)
    priors = make_priors(cfg.input_size)
    t_loop = time.monotonic()
    for step in range(cfg.iters):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = rng.integers(0, len(data), size=cfg.batch_size)
        batch = [augmented_sample(data, int(i), rng) for i in idx]
        x = to_input_tensor(np.stack([s.image for s in batch])).contiguous(memory_format=torch.channels_last)
        parts = split_outputs(model(x), has_masks)
        losses = compute_losses(parts, priors, batch, has_masks, cfg, rng)
        total = sum(v for k, v in losses.items() if k != "num_pos")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        update_ema(ema, model, cfg.ema_decay * (1 - math.exp(-(step + 1) / 100)))
        if step % cfg.log_every == 0 or step == cfg.iters - 1:
            per_iter = (time.monotonic() - t_loop) / (step + 1)
            parts_txt = " ".join(f"{k}={float(v.detach()):.4f}" for k, v in losses.items())
            log(f"iter {step}/{cfg.iters} lr={lr_at(step, cfg):.5f} loss={float(total.detach()):.4f} {parts_txt} "
                f"{per_iter:.2f}s/it eta={per_iter * (cfg.iters - step - 1) / 60:.1f}min")
        if (step + 1) % cfg.save_every == 0 or step == cfg.iters - 1:
            path = save_weights(ema, cfg, step + 1, started, log)
    return path


def save_weights(ema: torch.nn.Module, cfg: TrainConfig, steps: int, started: float, log) -> Path:
    from service.detectors.checkpoint import save_checkpoint

    minutes = (time.monotonic() - started) / 60
    cfg.out.mkdir(parents=True, exist_ok=True)
    path = cfg.out / cfg.weights_name
    meta = {"arch": cfg.arch, "steps": steps, "train_minutes": round(minutes, 1),
            "train_config": _jsonable(asdict(cfg)), **cfg.extra_meta}
    save_checkpoint(path, ema.state_dict(), list(CLASSES), meta, fp16=True)
    log(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB) at step {steps}/{cfg.iters}, {minutes:.1f} min")
    return path


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))
