"""`error is None` implies a non-empty answer: over fuzzed model outputs (random sequences of VPT and
text tokens forced through the graph as its rounds) and over a few hundred unusual but valid
images and questions on the bundled demo model, in every prompt mode."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vpt_agent import build_graph
from vpt_agent.model.tiny import tiny_vpt_model
from vpt_agent.tokens import BRANCHES, IM_END, REGION_TOKENS

PIECES = [*REGION_TOKENS, *(t for b in BRANCHES.values() for t in (b.action_start, b.action, b.action_end)),
          IM_END, "A", "cat", " ", "7", "\n"]
"""What a model can generate: VPT tokens, the end of a turn, text (never a placeholder)."""
MODEL_OUTPUT_ERRORS = ("BadModelOutputError", "PerceptionLimitError", "MissingBranchError")


def assert_invariant(result: dict) -> None:
    assert result["steps"][-1]["node"] == "answer" or result["steps"][-1]["node"] == "perceive"
    if result["error"] is None:
        assert result["answer"].strip() and "<|" not in result["answer"], result
    else:
        assert result["answer"] == "", result


@pytest.fixture(scope="module")
def tiny_graph():
    model, tokenizer = tiny_vpt_model()
    return build_graph(model, tokenizer=tokenizer, max_new_tokens=3)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(rounds=st.lists(st.lists(st.sampled_from(PIECES), max_size=10).map("".join), min_size=1, max_size=4))
def test_fuzzed_model_outputs_never_give_an_empty_answer_without_an_error(tiny_graph, rounds):
    image = np.full((40, 56, 3), 90, dtype=np.uint8)
    result = tiny_graph.invoke({"image": image, "q": "What is it?"}, {"configurable": {"force": rounds}})
    assert_invariant(result)
    assert result["error"] is None or result["error"].startswith(MODEL_OUTPUT_ERRORS)


def unusual_images() -> list:
    rng = np.random.default_rng(0)
    noise = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    images = [noise(h, w) for h, w in [(1, 900), (900, 1), (1, 1), (2, 5000), (5000, 3), (3, 3), (7, 2000)]]
    images += [np.full((240, 320, 3), value, np.uint8) for value in (0, 120, 255)]
    images += [Image.fromarray(noise(50, 70)).convert(mode) for mode in ("L", "P", "RGBA", "I;16", "F", "1", "CMYK")]
    images += [Image.fromarray(noise(8, 8)).resize((640, 480), Image.NEAREST), noise(300, 20), noise(20, 300)]
    return images


QUESTIONS = [
    "What colour is it?", "What character is in the yellow square?", "?", "Is there a red circle?",
    "How many shapes are there?", "<|region_token_start|><|x_1|><|y_1|><|region_token_end|>",
    "<|im_end|>", "Qu'est-ce que c'est ? 这是什么？ 🙂", "left or right of the blue triangle?", "a " * 300,
]


def test_unusual_images_and_questions_on_the_demo_model():
    graph = build_graph()
    cases = [(image, question, mode) for i, image in enumerate(unusual_images())
             for j, question in enumerate(QUESTIONS) for mode in ("region", "reencode", "free", "direct")
             if (i + j + len(mode)) % 4 == 0]
    assert len(cases) >= 200
    results = graph.batch([{"image": image, "q": question} for image, question, _ in cases],
                          [{"configurable": {"mode": mode}} for *_, mode in cases])
    for result in results:
        assert_invariant(result)
    answered = sum(r["error"] is None for r in results)
    print(f"\n{len(cases)} unusual questions: {answered} answered, {len(cases) - answered} without a usable answer")
