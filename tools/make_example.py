"""Write the example shipped with the package: ``vpt_agent/assets/example.png`` and ``example.json``.

    python3 tools/make_example.py

The example is a fine_detail question of the synthetic stream 7 (neither a training nor the
default evaluation stream). It is the second: the bundled model reads the first one's character
wrong ('0' read as 'C', in the right region; it reads 0.91 of held-out fine_detail questions right),
and the README's command should show what the model does most of the time.
"""
from __future__ import annotations

import json

from PIL import Image

from vpt_agent.data.synthetic import make_item
from vpt_agent.example import ASSETS, EXAMPLE_IMAGE

SEED, INDEX = 7, 1


def main() -> None:
    item = make_item(SEED, INDEX, ("fine_detail",))
    ASSETS.mkdir(parents=True, exist_ok=True)
    Image.fromarray(item.image.permute(1, 2, 0).numpy()).save(EXAMPLE_IMAGE, optimize=True)
    record = {"question": item.question, "answer": item.answer, "seed": SEED, "index": INDEX,
              "box": list(item.box), "cells": list(item.cells)}
    (ASSETS / "example.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"{EXAMPLE_IMAGE} ({EXAMPLE_IMAGE.stat().st_size / 2**10:.0f} KiB): {record}")


if __name__ == "__main__":
    main()
