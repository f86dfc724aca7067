"""The synthetic benchmark: deterministic scenes, well-posed questions, region targets that hold
their object, glyphs unreadable in the global view and larger in a crop."""
from __future__ import annotations

import pytest
import torch
from PIL import ImageFont
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from vpt_agent.data.synthetic import FAMILIES, GLYPH_SCALE, GLYPHS, cells_covering, generate, make_item
from vpt_agent.perception.crop import crop
from vpt_agent.tokens import NUM_CUT, region_box
from vpt_agent.train import DEMO_MAX_PIXELS


@pytest.fixture(scope="module")
def items():
    return generate(7, 48)


def contains(outer, inner) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def test_items_are_deterministic_by_seed():
    a, b, other = generate(3, 3), generate(3, 3), generate(4, 3)
    fields = lambda i: (i.question, i.answer, i.family, i.box, i.cells, i.objects)  # noqa: E731
    for x, y in zip(a, b):
        assert torch.equal(x.image, y.image) and fields(x) == fields(y)
    assert not any(torch.equal(x.image, z.image) for x, z in zip(a, other))
    assert torch.equal(make_item(3, 2).image, a[2].image)  # item i does not depend on items before it


def test_scenes(items):
    for item in items:
        width, height = item.size
        assert item.image.dtype == torch.uint8 and item.image.shape[0] == 3
        assert 640 <= max(width, height) <= 800 and min(width, height) >= 0.7 * max(width, height) - 1
        assert 4 <= len(item.objects) <= 8
        assert len({(o.colour, o.shape) for o in item.objects}) == len(item.objects)  # "the red circle" names one
        for o in item.objects:
            assert 0 <= o.box[0] < o.box[2] <= width and 0 <= o.box[1] < o.box[3] <= height
            assert o.glyph in GLYPHS
    assert {item.size for item in items} != {items[0].size}  # sizes and aspect ratios vary


def test_questions_and_answers(items):
    assert {item.family for item in items} == set(FAMILIES)
    for item in items:
        assert len(item.question) <= 60 and item.question.endswith("?")
        names = {o.name: o for o in item.objects}
        if item.family == "fine_detail":
            name = item.question.removeprefix("What character is in the ").removesuffix("?")
            assert item.answer == names[name].glyph and item.box == names[name].box
        elif item.family == "spatial":
            assert item.answer in ("left", "right", "above", "below") and item.box is not None
        elif item.family == "counting":
            noun = item.question.split()[2]
            expected = sum(o.shape + "s" == noun or o.colour == noun for o in item.objects)
            assert item.answer == str(expected)
        else:
            colour, shape = item.question.removesuffix("?").split()[-2:]
            present = (colour, shape) in {(o.colour, o.shape) for o in item.objects}
            assert item.answer == ("yes" if present else "no") and (item.box is not None) == present
            pairs = {(o.colour, o.shape) for o in item.objects}
            hard_exists = any((o.colour, p.shape) not in pairs for o in item.objects for p in item.objects)
            if not present and hard_exists:  # POPE-like: the colour and the shape both occur
                assert any(o.colour == colour for o in item.objects) and any(o.shape == shape for o in item.objects)


def test_spatial_answers_follow_centres():
    items = generate(11, 30, ("spatial",))
    for item in items:
        first, second = item.question.removeprefix("Is the ").removesuffix("?").split(" the ")
        phrase = next(p for p in ("left or right of", "above or below") if first.endswith(p))
        a = next(o for o in item.objects if o.name == first.removesuffix(phrase).strip())
        b = next(o for o in item.objects if o.name == second)
        axis = phrase.startswith("above")
        gap = a.centre[axis] - b.centre[axis]
        assert abs(gap) >= 40  # never a close call
        assert item.answer == ("left", "right", "above", "below")[2 * axis + (gap > 0)]
    assert {item.answer for item in items} == {"left", "right", "above", "below"}


def test_region_targets_crop_the_whole_object():
    for item in generate(5, 40, ("fine_detail",)):
        assert item.cells == cells_covering(item.box, item.size)
        x0, y0, x1, y1 = item.cells
        assert x1 - x0 <= 1 and y1 - y0 <= 1  # an object spans at most 2x2 cells
        tight = region_box(item.cells, item.size)  # (margin cells, pixel box)
        cell_w, cell_h = item.size[0] / NUM_CUT, item.size[1] / NUM_CUT
        exact = (int(x0 * cell_w), int(y0 * cell_h), int((x1 + 1) * cell_w), int((y1 + 1) * cell_h))
        assert contains(exact, item.box)  # the cells alone already cover it
        assert contains(tight[1], item.box)
        assert crop(item.image, tight[1]).shape[1:] == (tight[1][3] - tight[1][1], tight[1][2] - tight[1][0])


def test_cells_covering_is_the_smallest_cover():
    size = (1000, 700)  # cells of 125 x 87.5 px

    def pixels(cells):
        return int(cells[0] * 125), int(cells[1] * 87.5), int((cells[2] + 1) * 125), int((cells[3] + 1) * 87.5)

    for box in [(0, 0, 1, 1), (124, 86, 126, 88), (125, 87, 250, 175), (990, 690, 1000, 700), (0, 0, 1000, 700)]:
        cells = cells_covering(box, size)
        assert contains(pixels(cells), box)
        for side in range(4):  # dropping any edge row or column of cells loses part of the box
            smaller = list(cells)
            smaller[side] += 1 if side < 2 else -1
            if smaller[0] <= smaller[2] and smaller[1] <= smaller[3]:
                assert not contains(pixels(smaller), box)


def test_glyphs_are_unreadable_in_the_global_view_and_larger_in_a_crop(items):
    """At the demo model's 224x224 budget a glyph is <= 3.5 px tall in the global view; the crop of
    the object's cell (with the parser's margin) shows it at least 2.2x larger."""
    for item in items:
        width, height = item.size
        font = ImageFont.load_default(size=round(GLYPH_SCALE * min(width, height) / 8))
        tallest = max(font.getbbox(g)[3] - font.getbbox(g)[1] for g in GLYPHS)
        global_scale = smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=DEMO_MAX_PIXELS)[0] / height
        assert tallest * global_scale <= 3.5
        for obj in item.objects:
            x0, y0, x1, y1 = region_box(cells_covering(obj.box, item.size), item.size)[1]
            crop_scale = smart_resize(y1 - y0, x1 - x0, factor=28, min_pixels=56 * 56,
                                      max_pixels=DEMO_MAX_PIXELS)[0] / (y1 - y0)
            assert crop_scale >= 2.2 * global_scale