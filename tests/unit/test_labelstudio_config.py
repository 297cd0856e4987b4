"""Labelling-config parsing, label mapping and control binding for the Label Studio backend."""
from __future__ import annotations

import pytest

from service.errors import InvalidRequest, http_status
from service.protocols.labelstudio.config import (
    ControlKind,
    LabelTag,
    bind_controls,
    build_label_map,
    parse_label_config,
)

RECT = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Circle"/><Label value="SQUARE"/><Label value="Vehicle" predicted_values="car,truck"/>
  </RectangleLabels>
</View>"""

MIXED = """<View>
  <!-- comments are fine -->
  <Header value="Shapes"/>
  <Image name="img" value="$photo" zoom="true"/>
  <Choices name="quality" toName="img"><Choice value="ok"/></Choices>
  <PolygonLabels name="poly" toName="img" model_score_threshold="0.6"><Label value="circle"/></PolygonLabels>
  <BrushLabels name="brush" toName="img"><Label value="triangle"/></BrushLabels>
  <RectangleLabels name="orphan" toName="nowhere"><Label value="circle"/></RectangleLabels>
</View>"""


def test_rectangle_pair_found():
    (control,) = parse_label_config(RECT)
    assert control.kind is ControlKind.RECTANGLE
    assert (control.from_name, control.to_name, control.image_key) == ("label", "image", "image")
    assert [label.value for label in control.labels] == ["Circle", "SQUARE", "Vehicle"]
    assert control.labels[2].predicted_values == ("car", "truck")
    assert control.score_threshold is None


def test_mask_tags_found_and_unattached_tags_skipped():
    controls = parse_label_config(MIXED)
    assert [(c.kind, c.from_name, c.image_key) for c in controls] == [
        (ControlKind.POLYGON, "poly", "photo"),
        (ControlKind.BRUSH, "brush", "photo"),
    ]
    assert controls[0].score_threshold == 0.6


def test_label_map_predicted_values_then_exact_then_case_insensitive():
    labels = (
        LabelTag("Vehicle", ("car", "truck")),
        LabelTag("person"),
        LabelTag("Person"),
        LabelTag("DOG"),
        LabelTag("car"),  # exact name, but predicted_values claimed "car" first
    )
    mapping = build_label_map(labels, ("car", "truck", "Person", "dog", "cat"))
    assert mapping == {"car": "Vehicle", "truck": "Vehicle", "Person": "Person", "dog": "DOG"}
    assert "cat" not in mapping  # unmapped classes are dropped


def test_bind_drops_unmapped_and_uses_model_default_threshold():
    (bound,) = bind_controls(
        parse_label_config(RECT), model="m", classes=("circle", "square", "car", "star"), has_masks=False,
        default_score_thr=0.3,
    )
    assert bound.label_map == {"circle": "Circle", "square": "SQUARE", "car": "Vehicle"}
    assert bound.score_threshold == 0.3


def test_tag_threshold_overrides_model_default():
    bound = bind_controls(parse_label_config(MIXED), model="m", classes=("circle", "triangle"), has_masks=True,
                          default_score_thr=0.3)
    assert [(b.tag.kind, b.score_threshold) for b in bound] == [(ControlKind.POLYGON, 0.6), (ControlKind.BRUSH, 0.3)]


@pytest.mark.parametrize(
    "xml, has_masks, needle",
    [
        ("<View><Image name='i' value='$image'/></View>", False, "needs a RectangleLabels tag"),
        ("<View><Image name='i' value='$image'/></View>", True, "RectangleLabels, PolygonLabels or BrushLabels"),
        ("<View><RectangleLabels name='l' toName='i'><Label value='circle'/></RectangleLabels></View>", False,
         "<Image"),
        (MIXED, False, "predicts boxes only, but the labelling config has only BrushLabels, PolygonLabels"),
        (RECT.replace("Circle", "Ball").replace("SQUARE", "Box"), False, "no <Label> in <RectangleLabels name=\"label\">"),
        ("<View><Image", False, "not valid XML"),
        ("", False, "empty"),
        ('<View><RectangleLabels name="l" toName="i" model_score_threshold="high"/><Image name="i" value="$x"/></View>',
         False, "model_score_threshold=\"high\""),
    ],
)
def test_unusable_config_is_a_clear_400(xml, has_masks, needle):
    with pytest.raises(InvalidRequest) as info:
        bind_controls(parse_label_config(xml), model="m", classes=("circle", "square"), has_masks=has_masks,
                      default_score_thr=0.3)
    assert needle in info.value.message
    assert http_status(info.value) == 400


def test_entities_and_doctype_are_refused():
    bomb = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>
<View><Image name="i" value="$image"/><RectangleLabels name="l" toName="i"><Label value="&lol2;"/></RectangleLabels></View>"""
    external = """<!DOCTYPE v [<!ENTITY x SYSTEM "file:///etc/passwd">]><View><Header value="&x;"/></View>"""
    for xml in (bomb, external):
        with pytest.raises(InvalidRequest, match="DOCTYPE"):
            parse_label_config(xml)


def test_model_skip_attribute_hides_a_tag():
    xml = RECT.replace('toName="image"', 'toName="image" model_skip="true"')
    assert parse_label_config(xml) == ()


# ---- per-project tiling and what one image is detected with (issue 18) -------------------------

def _tiled(attrs: str, kind: str = "RectangleLabels") -> str:
    return (f'<View><Image name="image" value="$image"/><{kind} name="label" toName="image" {attrs}>'
            f'<Label value="circle"/></{kind}></View>')


def _bind(config: str, has_masks: bool = True):
    return bind_controls(parse_label_config(config), model="m", classes=("circle",), has_masks=has_masks,
                         default_score_thr=0.3)


def test_tiling_attributes_set_the_projects_detect_options():
    from service.protocols.labelstudio.config import detect_options
    from service.types import MaskFormat, TileMerge

    options = detect_options(_bind(_tiled('model_tile="512" model_tile_overlap="0.25" model_tile_merge="NMM" '
                                          'model_score_threshold="0.4"')))
    assert (options.tile, options.tile_overlap, options.tile_merge, options.score_thr) == (512, 0.25, TileMerge.NMM, 0.4)
    assert options.mask_format is MaskFormat.NONE  # rectangles only: the worker need not paste masks
    assert detect_options(_bind(_tiled('model_tile="auto"'))).tile == "auto"
    plain = detect_options(_bind(_tiled("")))
    assert (plain.tile, plain.tile_overlap, plain.tile_merge) == (None, None, None)  # the model's defaults
    assert detect_options(_bind(_tiled("", "PolygonLabels"))).mask_format is None  # masks wanted: rle


@pytest.mark.parametrize("attrs, allowed", [
    ('model_tile="huge"', "auto, off or a tile side in pixels within [32, 8192]"),
    ('model_tile="16"', "[32, 8192]"),
    ('model_tile_overlap="0.8"', "[0, 0.5]"),
    ('model_tile_merge="wbf"', "nms, nmm"),
])
def test_bad_tiling_attribute_is_a_config_error_naming_it_and_the_allowed_values(attrs, allowed):
    with pytest.raises(InvalidRequest) as caught:
        parse_label_config(_tiled(attrs))
    assert http_status(caught.value) == 400
    assert attrs.split("=")[0] in caught.value.message and allowed in caught.value.message


def test_controls_of_one_image_that_disagree_on_tiling_are_refused():
    config = """<View><Image name="image" value="$image"/>
    <RectangleLabels name="a" toName="image" model_tile="512"><Label value="circle"/></RectangleLabels>
    <PolygonLabels name="b" toName="image" model_tile="1024"><Label value="circle"/></PolygonLabels></View>"""
    with pytest.raises(InvalidRequest) as caught:
        _bind(config)
    assert "model_tile" in caught.value.message and '"a"' in caught.value.message
