"""The shipped example and the README's main command; the bundled demo model's acceptance tests
(it loads by default, clears the benchmark's thresholds in every mode on a fixed held-out slice,
answers the example)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vpt_agent.cli import main
from vpt_agent.evaluation.datasets import synthetic_dataset
from vpt_agent.evaluation.runner import EvalSpec, evaluate
from vpt_agent.graph import build_graph
from vpt_agent.data.synthetic import FAMILIES, make_item
from vpt_agent.images import load_image
from vpt_agent.example import ASSETS, example
from vpt_agent.model.demo import DEMO_DIR, default_model

README = Path(__file__).parents[1] / "README.md"
HELD_OUT_SEED = 1000
"""The CLI's default held-out stream; the demo model trained on streams 0 and 1."""
MODES = ("region", "reencode", "free", "direct")


def test_the_example_is_a_held_out_fine_detail_question():
    shipped = example()
    record = json.loads((ASSETS / "example.json").read_text(encoding="utf-8"))  # tools/make_example.py's choice
    assert record["seed"] not in (0, 1)  # the training streams
    item = make_item(record["seed"], record["index"], ("fine_detail",))
    assert (shipped.question, shipped.answer) == (item.question, item.answer)
    assert load_image(str(shipped.image)).equal(item.image)  # lossless


def test_the_bundle_is_small_and_loads_by_default():
    size = sum(f.stat().st_size for f in DEMO_DIR.parent.rglob("*") if f.is_file())
    assert size < 25 * 2**20
    model, tokenizer = default_model()
    assert model.config.branches == ("dino", "clip") and model.config.image_max_pixels == 224 * 224
    assert model.config.reencode_max_pixels == 512 * 512  # the clip branch sees what the global view cannot
    assert not model.training and len(tokenizer) == model.get_input_embeddings().num_embeddings


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """50 questions per family (items 0-199 of the held-out stream) in the four modes."""
    out = tmp_path_factory.mktemp("held_out")
    spec = EvalSpec(metric="exact")
    summary = evaluate(synthetic_dataset(HELD_OUT_SEED, 50), out, modes=list(MODES), spec=spec, progress=False)
    return {mode: {family: c["score"] for family, c in m["categories"].items()} | {"well_formed": m["well_formed"]}
            for mode, m in summary["modes"].items()}


def test_region_selection_reads_the_fine_detail_that_direct_answering_misses(held_out):
    region, direct = held_out["region"], held_out["direct"]
    assert region["fine_detail"] >= 0.90, held_out
    assert region["fine_detail"] - direct["fine_detail"] >= 0.40, held_out


def test_region_selection_does_not_hurt_the_spatial_control(held_out):
    assert abs(held_out["region"]["spatial"] - held_out["direct"]["spatial"]) <= 0.02 + 1e-9, held_out  # 1 item in 50


def test_reencoding_reads_the_fine_detail_and_costs_no_family_more_than_an_item(held_out):
    reencode, direct = held_out["reencode"], held_out["direct"]
    assert reencode["fine_detail"] - direct["fine_detail"] >= 0.15, held_out
    assert all(reencode[family] >= direct[family] - 0.02 - 1e-9 for family in FAMILIES), held_out


def test_free_mode_is_as_good_as_the_better_perception(held_out):
    free = held_out["free"]
    assert all(free[family] >= max(held_out["region"][family], held_out["reencode"][family]) - 0.02 - 1e-9
               for family in FAMILIES), held_out  # 1 item in 50; at 500 the README reads "as good" with the sign test


def test_outputs_are_well_formed(held_out):
    assert all(held_out[mode]["well_formed"] >= 0.99 for mode in MODES), held_out


def test_readme_main_command_prints_the_right_answer_and_the_region(capsys):
    assert "vpt-agent ask --example" in README.read_text()
    assert main(["ask", "--example"]) == 0
    out = capsys.readouterr().out.splitlines()
    shipped = example()
    assert out[:3] == [str(shipped.image), f"Q: {shipped.question}", f"A: {shipped.answer}"]
    assert re.fullmatch(r"region: cells x \d-\d, y \d-\d of 8x8 -> crop \(\d+, \d+\)-\(\d+, \d+\) px", out[3])


def test_the_example_through_the_graph():
    shipped = example()
    result = build_graph().invoke({"image": str(shipped.image), "q": shipped.question})
    assert result["answer"] == shipped.answer and len(result["regions"]) == 1 and result["error"] is None
