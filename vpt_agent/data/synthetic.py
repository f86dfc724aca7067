"""A synthetic "find the small detail" benchmark, deterministic by seed.

Each scene is a 640-800 px canvas (half square, half landscape or portrait with aspect 0.7-1)
with a textured, cluttered background and 4-8 filled shapes, each inside its own cell of the 8x8
grid (about half a cell wide), each a unique (colour, shape) pair and each holding a glyph (a
digit or capital). At the demo model's 224x224 pixel budget the glyph is <= 3.5 px tall in the
global view; the crop of the object's cell plus the parser's one-cell margin (3x3 cells, fewer at
the border) reaches the ViT >= 2.2x larger.

Question families (short questions, short answers):

* ``fine_detail``: "What character is in the red circle?" -> the glyph;
* ``spatial``: "Is the red circle left or right of the blue square?" -> left / right (or "above or
  below" -> above / below; the global view suffices);
* ``counting``: "How many triangles are there?" / "How many red shapes are there?" -> a digit;
* ``existence``: "Is there a green triangle?" -> yes / no; the "no" half are POPE-like hard
  negatives whenever the scene allows (the colour and the shape both occur, never together).

Region targets (``Item.cells``) are the grid cells covering ``Item.box``, the union of the
objects the question is about (the target of fine_detail, both objects of spatial, the counted
objects, the asked-for object); where there is none (a count of 0, an absent object) the region
is the whole image, as the released models emit a region for every question in region mode.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..tokens import NUM_CUT, Box, Cells

Family = Literal["fine_detail", "spatial", "counting", "existence"]
FAMILIES: tuple[Family, ...] = ("fine_detail", "spatial", "counting", "existence")
COMPARING: frozenset[Family] = frozenset({"spatial"})
"""Families whose answer compares the objects it is about (``Item.about``, in the order the question
names them) rather than taking them together."""
READING: frozenset[Family] = frozenset({"fine_detail"})
"""Families whose answer is finer than the global view shows (a character): what a region or a
re-encoding at reading resolution is for."""
COUNTING: frozenset[Family] = frozenset({"counting"})
"""Families whose answer needs every object told apart, however small or close (an exact count): what
a re-encoding at more than the global view's resolution is for."""
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (30, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 25),
    "purple": (135, 55, 190),
    "orange": (245, 125, 20),
    "pink": (245, 120, 190),
}
OUTLINE = (25, 25, 25)
"""Every shape's 2 px outline."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
GLYPHS = "0123456789ACEFHKLPRTXY"
"""Glyph alphabet: digits and capitals that do not look alike in the default font."""
GLYPH_SCALE = 0.17
"""Glyph font size per cell side (PIL's default font: capitals ~0.7 of the size)."""
OBJECT_SCALE = (0.45, 0.6)
"""Object side per cell side (the shorter one); each object lies inside one cell of the 8x8 grid."""
LONG_SIDE = (640, 800)
SQUARE = 0.5
"""Share of square scenes (their 8x8 cells are the demo model's 8x8 global tokens); the others
have aspect ratio ASPECT."""
ASPECT = (0.7, 1.0)
OBJECTS = (4, 8)
BLOCK = 3
"""`block_scene`'s block side in cells: the view a region of one cell shows (its one-cell margin)."""
MIN_FILL_SHARE = 0.001
MIN_OUTLINE_SHARE = 0.0004
"""`looks_synthetic`'s least shares of pixels in the exact fill colours and the exact outline colour:
a quarter of the least over 1000 scenes (0.4 % and 0.17 %); photos hold next to none."""


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    glyph: str
    box: Box
    """(x0, y0, x1, y1), right/bottom exclusive."""

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Item:
    """One benchmark question about one scene."""

    image: torch.Tensor
    """uint8 (3, H, W)."""
    question: str
    answer: str
    family: Family
    box: Box | None
    """Union of the boxes the question is about; None when there is none (count 0, absent object)."""
    cells: Cells
    """Region target (x_min, y_min, x_max, y_max) covering ``box``, or the whole grid."""
    objects: tuple[SceneObject, ...]
    about: tuple[SceneObject, ...]
    """The objects the question is about (those ``box`` covers; none for a count of 0 or an absent object)."""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.image.shape[2], self.image.shape[1]


def cells_covering(box: Box, size: tuple[int, int]) -> Cells:
    """The smallest cell range whose pixel box (``int(k * W / 8)`` edges, as `region_box`) holds ``box``."""
    (x0, y0, x1, y1), (width, height) = box, size

    def span(lo: int, hi: int, extent: int) -> tuple[int, int]:
        edges = [int(k * extent / NUM_CUT) for k in range(NUM_CUT + 1)]
        first = max(k for k in range(NUM_CUT) if edges[k] <= lo)
        last = min(k for k in range(NUM_CUT) if edges[k + 1] >= hi)
        return first, last

    (cx0, cx1), (cy0, cy1) = span(x0, x1, width), span(y0, y1, height)
    return cx0, cy0, cx1, cy1


def union(boxes: Sequence[Box]) -> Box:
    return min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)


def generate(seed: int, n: int, families: Sequence[Family] = FAMILIES) -> list[Item]:
    """Items 0..n-1 of the stream ``seed`` (see `make_item`)."""
    return [make_item(seed, index, families) for index in range(n)]


def make_item(seed: int, index: int, families: Sequence[Family] = FAMILIES) -> Item:
    """Item ``index`` of the stream ``seed``: a function of (seed, index, families) only."""
    unknown = set(families) - set(FAMILIES)
    if unknown or not families:
        raise ValueError(f"unknown question families {sorted(unknown)}; expected some of {FAMILIES}")
    rng = np.random.default_rng([seed, index])
    family = families[rng.integers(len(families))]
    image, objects = _scene(rng)
    question, answer, about = _QUESTIONS[family](rng, objects)
    size = (image.width, image.height)
    box = union([o.box for o in about]) if about else None
    cells = cells_covering(box, size) if box else (0, 0, NUM_CUT - 1, NUM_CUT - 1)
    return Item(_tensor(image), question, answer, family, box, cells, tuple(objects), tuple(about))


def question_corpus() -> list[str]:
    """Every question the templates can ask, and every answer: what the demo tokenizer learns from."""
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    texts = [f"What character is in the {n}?" for n in names]
    texts += [f"Is the {a} {p} the {b}?" for a in names for b in names if a != b for p in _AXES]
    texts += [f"How many {s}s are there?" for s in SHAPES] + [f"How many {c} shapes are there?" for c in COLOURS]
    texts += [f"Is there {_a(n)} {n}?" for n in names]
    return texts + [*GLYPHS, "yes", "no", *SPATIAL_ANSWERS, *(str(k) for k in range(OBJECTS[1] + 1))]


def looks_synthetic(image: np.ndarray) -> bool:
    """Whether an (H, W, 3) uint8 RGB image looks like a scene of this generator saved losslessly: a
    size it draws and flat shapes in its exact fill and outline colours. A photo fails (its pixels
    next to never equal these colours exactly), and so does a resized or lossily compressed scene."""
    height, width = image.shape[:2]
    long_side, short_side = max(width, height), min(width, height)
    if not LONG_SIDE[0] <= long_side <= LONG_SIDE[1] or short_side < int(long_side * ASPECT[0]):
        return False
    rgb = _packed(image)
    fills = np.isin(rgb, _packed(np.array(list(COLOURS.values()), dtype=np.uint8))).mean()
    outline = (rgb == _packed(np.array(OUTLINE, dtype=np.uint8))).mean()
    return bool(fills >= MIN_FILL_SHARE and outline >= MIN_OUTLINE_SHARE)


def _packed(rgb: np.ndarray) -> np.ndarray:
    """One uint32 per RGB triple (the last axis)."""
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


# ------------------------------------------------------------------------------------- scenes
@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def block_scene(seed: int, index: int) -> tuple[torch.Tensor, tuple[SceneObject, ...], Cells]:
    """Scene ``index`` of the stream ``seed`` with an object in each of the 9 cells of one 3x3 block
    of the grid (a training scene, not a benchmark one): (uint8 image, objects, the block's centre
    cell as a region, whose one-cell margin is the block)."""
    rng = np.random.default_rng([seed, index, 3])
    image, objects = _scene(rng, block=True)
    return _tensor(image), tuple(objects), _block_centre(objects, image.size)


def _tensor(image: Image.Image) -> torch.Tensor:
    """uint8 (3, H, W)."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def _block_centre(objects: Sequence[SceneObject], size: tuple[int, int]) -> Cells:
    x0, y0, x1, y1 = cells_covering(union([o.box for o in objects]), size)
    return (x0 + x1) // 2, (y0 + y1) // 2, (x0 + x1) // 2, (y0 + y1) // 2


def _scene(rng: np.random.Generator, block: bool = False) -> tuple[Image.Image, list[SceneObject]]:
    long_side = int(rng.integers(*LONG_SIDE, endpoint=True))
    short_side = long_side if rng.random() < SQUARE else int(long_side * rng.uniform(*ASPECT))
    width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    _clutter(rng, draw, width, height)
    cell_w, cell_h = width / NUM_CUT, height / NUM_CUT
    cell = min(cell_w, cell_h)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    count = BLOCK * BLOCK if block else int(rng.integers(OBJECTS[0], OBJECTS[1], endpoint=True))
    chosen = rng.permutation(len(pairs))[:count]
    if block:
        bx, by = (int(v) for v in rng.integers(NUM_CUT - BLOCK + 1, size=2))
        cells = [(by + k // BLOCK) * NUM_CUT + bx + k % BLOCK for k in range(count)]
    else:
        cells = rng.permutation(NUM_CUT * NUM_CUT)[:count]
    objects: list[SceneObject] = []
    for pair, index in zip(chosen, cells):
        colour, shape = pairs[pair]
        size = int(rng.uniform(*OBJECT_SCALE) * cell)
        # inside its cell, >= 2 px from the cell's edges (the int() edges of `region_box`)
        x_lo, y_lo = int((index % NUM_CUT) * cell_w) + 2, int((index // NUM_CUT) * cell_h) + 2
        x_hi, y_hi = int((index % NUM_CUT + 1) * cell_w) - 2 - size, int((index // NUM_CUT + 1) * cell_h) - 2 - size
        x0, y0 = int(rng.integers(x_lo, x_hi, endpoint=True)), int(rng.integers(y_lo, y_hi, endpoint=True))
        obj = SceneObject(colour, shape, GLYPHS[rng.integers(len(GLYPHS))], (x0, y0, x0 + size, y0 + size))
        _draw_object(draw, obj, round(GLYPH_SCALE * cell))
        objects.append(obj)
    return image, objects


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A muted base colour, large soft (mostly light/dark) blotches and fine luminance grain."""
    shape = (height // 96 + 2, width // 96 + 2)
    blotches = rng.integers(120, 215, size=3) + rng.integers(-35, 36, size=(*shape, 1))
    blotches += rng.integers(-15, 16, size=(*shape, 3))
    smooth = Image.fromarray(np.clip(blotches, 12, 231).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    pixels = np.asarray(smooth) + rng.integers(0, 25, size=(height, width, 1), dtype=np.uint8)  # no overflow
    return Image.fromarray(pixels - np.uint8(12))


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    """Thin lines and outlined ellipses / rectangles in greyish tones: texture, not objects."""
    for _ in range(int(rng.integers(20, 41))):
        grey = int(rng.integers(60, 230))
        colour = tuple(int(np.clip(grey + rng.integers(-25, 26), 0, 255)) for _ in range(3))
        x, y = int(rng.integers(width)), int(rng.integers(height))
        dx, dy = (int(v) for v in rng.integers(-160, 161, size=2))
        kind = rng.integers(3)
        if kind == 0:
            draw.line((x, y, x + dx, y + dy), fill=colour, width=int(rng.integers(1, 4)))
        else:
            box = (min(x, x + dx), min(y, y + dy), max(x, x + dx), max(y, y + dy))
            shape = draw.ellipse if kind == 1 else draw.rectangle
            shape(box, outline=colour, width=int(rng.integers(1, 3)))


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, font_size: int) -> None:
    x0, y0, x1, y1 = obj.box
    x1, y1 = x1 - 1, y1 - 1  # PIL draws inclusive coordinates
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    fill, outline = COLOURS[obj.colour], OUTLINE
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill, outline=outline, width=2)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill, outline=outline, width=2)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline, width=2)
        cy = y0 + (y1 - y0) * 2 / 3  # the centroid: the widest part that fits the glyph
    else:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill, outline=outline, width=2)
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    draw.text((cx, cy), obj.glyph, font=_font(font_size), fill=ink, anchor="mm")


# ---------------------------------------------------------------------------------- questions
Question = tuple[str, str, list[SceneObject]]


def _fine_detail(rng: np.random.Generator, objects: list[SceneObject]) -> Question:
    obj = objects[rng.integers(len(objects))]
    return f"What character is in the {obj.name}?", obj.glyph, [obj]


_AXES = {"left or right of": (0, ("left", "right")), "above or below": (1, ("above", "below"))}
"""A spatial question's phrase -> (axis, the answers for the first object lying before / after the second)."""
SPATIAL_ANSWERS = tuple(word for _, words in _AXES.values() for word in words)


def _spatial(rng: np.random.Generator, objects: list[SceneObject]) -> Question:
    """Where one object lies from another along an axis the question names ("left" / "right", "above"
    / "below"), for a pair whose centres are at least their mean size apart along it (objects in
    different cells are that far apart along some axis, so one of the axes always has pairs). The
    question names both answers: a yes/no relation ("Is A left of B?") makes the answer the
    exclusive or of the relation asked and the objects' order, whose parts alone tell nothing, and a
    small model trained from scratch stayed at chance on it."""
    for phrase in rng.permutation(list(_AXES)):
        axis, answers = _AXES[phrase]
        pairs = [(a, b) for a in objects for b in objects
                 if a.centre[axis] - b.centre[axis] >= (_side(a) + _side(b)) / 2]
        if pairs:
            break
    a, b = pairs[rng.integers(len(pairs))]
    if rng.random() < 0.5:
        a, b = b, a
    return f"Is the {a.name} {phrase} the {b.name}?", answers[int(a.centre[axis] > b.centre[axis])], [a, b]


def _side(obj: SceneObject) -> int:
    return obj.box[2] - obj.box[0]


def _counting(rng: np.random.Generator, objects: list[SceneObject]) -> Question:
    if rng.random() < 0.5:
        shape = SHAPES[rng.integers(len(SHAPES))]
        counted = [o for o in objects if o.shape == shape]
        question = f"How many {shape}s are there?"
    else:
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        counted = [o for o in objects if o.colour == colour]
        question = f"How many {colour} shapes are there?"
    return question, str(len(counted)), counted


def _existence(rng: np.random.Generator, objects: list[SceneObject]) -> Question:
    if rng.random() < 0.5:
        obj = objects[rng.integers(len(objects))]
        return f"Is there {_a(obj.colour)} {obj.name}?", "yes", [obj]
    present = {(o.colour, o.shape) for o in objects}
    colours, shapes = {o.colour for o in objects}, {o.shape for o in objects}
    hard = sorted((c, s) for c in colours for s in shapes if (c, s) not in present)
    absent = hard or sorted((c, s) for c in COLOURS for s in SHAPES if (c, s) not in present)
    colour, shape = absent[rng.integers(len(absent))]
    return f"Is there {_a(colour)} {colour} {shape}?", "no", []


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_QUESTIONS = {"fine_detail": _fine_detail, "spatial": _spatial, "counting": _counting, "existence": _existence}
