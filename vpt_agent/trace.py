"""A picture of a run: the original image with the selected regions, each crop beside it, the
re-encoding steps, the question and the answer."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .images import load_image

MAIN_SIDE = 480
CROP_SIDE = 160
PAD = 12
MIN_WIDTH = 400
COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def render_trace(image: Any, result: Mapping[str, Any], path: str | Path | None = None) -> Image.Image:
    """Draw a run: `image` as it was given to the graph and its result (question, regions, steps and
    answer); save it as PNG to `path` if given."""
    original = Image.fromarray(load_image(image).permute(1, 2, 0).numpy())
    regions = [tuple(box) for box in result.get("regions") or []]
    font = ImageFont.load_default(size=15)

    main = ImageOps.contain(original, (MAIN_SIDE, MAIN_SIDE))
    scale = main.width / original.width
    draw = ImageDraw.Draw(main)
    for i, box in enumerate(regions):
        color = COLORS[i % len(COLORS)]
        scaled = [round(v * scale) for v in box]
        draw.rectangle(scaled, outline=color, width=3)
        draw.text((scaled[0] + 4, scaled[1] + 2), str(i + 1), fill=color, font=font)

    thumbs = [ImageOps.contain(original.crop(box), (CROP_SIDE, CROP_SIDE)) for box in regions]
    column = CROP_SIDE + 2 * PAD if thumbs else 0
    width = max(main.width + 2 * PAD + column, MIN_WIDTH)
    lines = _text_lines(result, font, width - 2 * PAD)
    line_height = 20
    top = max(main.height, len(thumbs) * (CROP_SIDE + 26)) + 2 * PAD
    canvas = Image.new("RGB", (width, top + line_height * len(lines) + PAD), "white")
    canvas.paste(main, (PAD, PAD))

    draw = ImageDraw.Draw(canvas)
    y = PAD
    for i, thumb in enumerate(thumbs):
        x = main.width + 2 * PAD + PAD
        color = COLORS[i % len(COLORS)]
        draw.text((x, y), f"Region {i + 1}", fill=color, font=font)
        canvas.paste(thumb, (x, y + 20))
        draw.rectangle([x - 2, y + 18, x + thumb.width + 1, y + 21 + thumb.height], outline=color, width=2)
        y += CROP_SIDE + 26
    for i, line in enumerate(lines):
        draw.text((PAD, top + i * line_height), line, fill="black", font=font)

    if path is not None:
        canvas.save(path, format="PNG")
    return canvas


def _text_lines(result: Mapping[str, Any], font: ImageFont.ImageFont, width: int) -> list[str]:
    steps = result.get("steps") or []
    reencoded = [f"{s['node']} features {tuple(s['feature_shape'])}" for s in steps if s.get("feature_shape")]
    paragraphs = [
        f"Q: {result.get('q', '')}",
        f"A: {result.get('answer', '')}",
        "Steps: " + " -> ".join(s["node"] for s in steps),
    ]
    if reencoded:
        paragraphs.append("Re-encoded: " + "; ".join(reencoded))
    if result.get("error"):
        paragraphs.append(f"Note: {result['error']}")
    lines: list[str] = []
    for paragraph in paragraphs:
        lines += _wrap(paragraph, font, width)
    return lines


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (over-long words are cut)."""
    lines, current = [], ""
    for word in text.replace("\n", " ").split(" "):
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while font.getlength(word) > width:
            cut = max(1, int(len(word) * width / font.getlength(word)))
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    return lines + [current] if current else lines
