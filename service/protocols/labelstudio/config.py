"""Labelling-config parsing: which control tags to fill, from which image, with which labels.

A Label Studio project's config is XML such as
`<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="Car" predicted_values="car,truck"/></RectangleLabels></View>`. We fill
RectangleLabels always, PolygonLabels and BrushLabels for mask models.

Per-project settings live on the control tags, as Label Studio's own `model_score_threshold` does:
`model_tile="auto|off|<px>"`, `model_tile_overlap="0.2"`, `model_tile_merge="nms|nmm"` (sliced
inference, docs/labelstudio.md), checked by the same rules as every door's parameters.
"""
from __future__ import annotations

import enum
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.parsers import expat

from ...engine.dataplane import knob_options
from ...errors import InvalidRequest
from ...types import DetectOptions, MaskFormat, TileMerge

SCORE_THRESHOLD_ATTR = "model_score_threshold"
SKIP_ATTR = "model_skip"
# control-tag attribute -> the request option it sets
TILING_ATTRS = {"model_tile": "tile", "model_tile_overlap": "tile_overlap", "model_tile_merge": "tile_merge"}
# Every control of an image gets the image's detections as its own regions, and each <Image> is
# fetched and detected per task: a 512 KiB config of 2,400 controls turned one task into 240,000
# regions. Real configs have a handful.
MAX_CONTROLS = 64


class ControlKind(str, enum.Enum):
    """The control tags we can fill; the value is the result `type` Label Studio expects."""

    RECTANGLE = "rectanglelabels"
    POLYGON = "polygonlabels"
    BRUSH = "brushlabels"

    @property
    def needs_masks(self) -> bool:
        return self is not ControlKind.RECTANGLE

    @property
    def tag(self) -> str:
        return {"rectanglelabels": "RectangleLabels", "polygonlabels": "PolygonLabels", "brushlabels": "BrushLabels"}[
            self.value
        ]


@dataclass(frozen=True, slots=True)
class LabelTag:
    value: str
    predicted_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ControlTag:
    """One `<XxxLabels>` tag attached to an `<Image>`."""

    kind: ControlKind
    from_name: str
    to_name: str
    image_key: str  # the <Image value="$key"> without the dollar
    labels: tuple[LabelTag, ...]
    score_threshold: float | None = None  # the tag's model_score_threshold attribute
    tile: int | str | None = None  # model_tile, model_tile_overlap, model_tile_merge; None: the model's default
    tile_overlap: float | None = None
    tile_merge: TileMerge | None = None


@dataclass(frozen=True, slots=True)
class BoundControl:
    """A control tag matched against one model: model class name -> Label Studio label."""

    tag: ControlTag
    label_map: dict[str, str]
    score_threshold: float


class ConfigInvalid(InvalidRequest):
    code = "invalid_label_config"


def parse_xml(text: str) -> ET.Element:
    """Parse untrusted XML with no DTD, so no entity expansion or external fetches can happen."""
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)

    def forbid(*_args):
        raise ConfigInvalid("labelling config must not contain a DOCTYPE or entity declarations")

    parser.StartDoctypeDeclHandler = forbid
    parser.EntityDeclHandler = forbid
    parser.ExternalEntityRefHandler = forbid
    parser.StartElementHandler = lambda name, attrs: builder.start(name, attrs)
    parser.EndElementHandler = lambda name: builder.end(name)
    try:
        parser.Parse(text, True)
        return builder.close()
    except expat.ExpatError as exc:
        raise ConfigInvalid(f"labelling config is not valid XML: {exc}") from None
    except AssertionError:  # TreeBuilder on an empty document
        raise ConfigInvalid("labelling config is empty") from None


def parse_label_config(text: str) -> tuple[ControlTag, ...]:
    """Every RectangleLabels/PolygonLabels/BrushLabels tag whose toName is an <Image>, in order.

    Not cached here: LabelStudioBackend caches parsed configs under the same bounds as /setup's."""
    if not text or not text.strip():
        raise ConfigInvalid("labelling config is empty")
    root = parse_xml(text)
    images: dict[str, str] = {}
    for el in root.iter():
        if el.tag.lower() == "image" and el.get("name") and el.get("value"):
            images[el.get("name")] = el.get("value").lstrip("$")
    kinds = {k.value: k for k in ControlKind}
    controls = []
    for el in root.iter():
        kind = kinds.get(el.tag.lower())
        if kind is None or not el.get("name"):
            continue
        if el.get(SKIP_ATTR, "").lower() in ("true", "1", "yes"):
            continue
        to_names = [n.strip() for n in el.get("toName", "").split(",")]
        to_name = next((n for n in to_names if n in images), None)
        if to_name is None:
            continue
        if len(controls) == MAX_CONTROLS:
            raise ConfigInvalid(f"the labelling config has more than {MAX_CONTROLS} object-detection controls on "
                                f"<Image> tags; detserve predicts for at most {MAX_CONTROLS}")
        labels = tuple(
            LabelTag(
                value=label.get("value"),
                predicted_values=tuple(
                    v.strip() for v in label.get("predicted_values", "").split(",") if v.strip()
                ),
            )
            for label in el
            if label.tag.lower() == "label" and label.get("value") is not None
        )
        controls.append(
            ControlTag(
                kind=kind,
                from_name=el.get("name"),
                to_name=to_name,
                image_key=images[to_name],
                labels=labels,
                score_threshold=_threshold(el),
                **_tiling(el),
            )
        )
    return tuple(controls)


def _tiling(el: ET.Element) -> dict:
    raw = {option: el.get(attr) for attr, option in TILING_ATTRS.items()}
    try:
        options = knob_options(**raw)
    except InvalidRequest as err:
        attrs = " ".join(f'{a}="{el.get(a)}"' for a in TILING_ATTRS if el.get(a) is not None)
        raise ConfigInvalid(f'<{el.tag} name="{el.get("name")}"> has {attrs}: {err.message}') from None
    return {option: getattr(options, option) for option in TILING_ATTRS.values()}


def _threshold(el: ET.Element) -> float | None:
    raw = el.get(SCORE_THRESHOLD_ATTR)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ConfigInvalid(
            f'<{el.tag} name="{el.get("name")}"> has {SCORE_THRESHOLD_ATTR}="{raw}"; expected a number in [0, 1]'
        )
    return value


def build_label_map(labels: tuple[LabelTag, ...], model_classes: tuple[str, ...]) -> dict[str, str]:
    """Model class -> label: `predicted_values` first, then an exact match, then a case-insensitive
    one. Classes that match no label are left out (their detections are dropped)."""
    mapping: dict[str, str] = {}
    known = set(model_classes)
    for label in labels:
        for predicted in label.predicted_values:
            if predicted in known:
                mapping.setdefault(predicted, label.value)
    by_value = {label.value: label.value for label in labels}
    by_folded: dict[str, str] = {}
    for label in labels:
        by_folded.setdefault(label.value.casefold(), label.value)
    for cls in model_classes:
        if cls in mapping:
            continue
        if cls in by_value:
            mapping[cls] = by_value[cls]
        elif cls.casefold() in by_folded:
            mapping[cls] = by_folded[cls.casefold()]
    return mapping


def bind_controls(
    controls: tuple[ControlTag, ...],
    *,
    model: str,
    classes: tuple[str, ...],
    has_masks: bool,
    default_score_thr: float,
) -> list[BoundControl]:
    """The control tags this model can fill. Raises ConfigInvalid naming what is missing."""
    wanted = "RectangleLabels, PolygonLabels or BrushLabels" if has_masks else "RectangleLabels"
    if not controls:
        raise ConfigInvalid(
            f"labelling config has no usable control tag: model '{model}' needs a {wanted} tag whose "
            'toName names an <Image name="..." value="$..."> tag'
        )
    usable = [c for c in controls if has_masks or not c.kind.needs_masks]
    if not usable:
        found = ", ".join(sorted({c.kind.tag for c in controls}))
        raise ConfigInvalid(
            f"model '{model}' predicts boxes only, but the labelling config has only {found}; add a "
            "RectangleLabels tag or use an instance-segmentation model"
        )
    bound = []
    for control in usable:
        label_map = build_label_map(control.labels, classes)
        if label_map:
            thr = control.score_threshold if control.score_threshold is not None else default_score_thr
            bound.append(BoundControl(tag=control, label_map=label_map, score_threshold=thr))
    if bound:
        detect_options(bound)  # controls that disagree on tiling fail here, at /setup, with the reason
    if not bound:
        names = ", ".join(f'<{c.kind.tag} name="{c.from_name}">' for c in usable)
        shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
        raise ConfigInvalid(
            f"no <Label> in {names} matches a class of model '{model}' (classes: {shown}); "
            'name labels after the classes or map them with predicted_values="class1,class2"'
        )
    return bound


def detect_options(controls: list[BoundControl]) -> DetectOptions:
    """The options one image of these controls is detected with: the lowest threshold (each control
    filters its own regions), the project's tiling, and no masks when no control draws them (the
    worker then skips pasting them). Box format knobs do not apply: regions are in percent."""
    tiling = {}
    for option in TILING_ATTRS.values():
        values = {getattr(c.tag, option) for c in controls} - {None}
        if len(values) > 1:
            attr = next(a for a, o in TILING_ATTRS.items() if o == option)
            names = ", ".join(f'"{c.tag.from_name}"' for c in controls if getattr(c.tag, option) is not None)
            raise ConfigInvalid(f"control tags {names} set different {attr} values {sorted(map(str, values))}; "
                                "one image is detected once, so set it on one tag or to the same value")
        tiling[option] = values.pop() if values else None
    needs_masks = any(c.tag.kind.needs_masks for c in controls)
    return DetectOptions(score_thr=min(c.score_threshold for c in controls),
                         mask_format=None if needs_masks else MaskFormat.NONE, **tiling)
