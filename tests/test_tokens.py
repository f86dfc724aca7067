"""VPT vocabulary and parser: every reference region case, malformed sequences, properties."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from vpt_agent.errors import (
    BadImageError,
    BadModelOutputError,
    BadQuestionError,
    ConfigError,
    InputMismatchError,
    MissingBranchError,
)
from vpt_agent.tokens import (
    ALL_SPECIAL_TOKENS,
    BRANCHES,
    CHAT_TOKENS,
    CONFIG_TOKEN_FIELDS,
    NUM_CUT,
    REGION_END,
    REGION_START,
    VPT_SPECIAL_TOKENS,
    X_TOKENS,
    Y_TOKENS,
    ParsedOutput,
    ReEncode,
    RegionSelection,
    parse_actions,
    region_box,
)
from vpt_agent.prompts import REENCODE_PROMPT, REGION_PROMPT, build_question, second_round_user_text

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
CASES = json.loads((FIXTURES / "region_cases.json").read_text())
TOKENS = json.loads((FIXTURES / "tokens.json").read_text())
SIZES = [tuple(size) for size in CASES["image_sizes_wh"]]

# The reference's "finished" covers three outcomes here (see the tokens module docstring).
FINISHED_KIND = {
    "malformed_missing_end": "error",
    "malformed_out_of_range_index": "error",
    "malformed_space_inside": "error",
    "malformed_empty_region": "error",
    "malformed_unknown_axis": "error",
    "region_and_action_conflict": "finished_mixed",
    "plain_answer": "none",
}


def region(*cells: str) -> str:
    return REGION_START + "".join(cells) + REGION_END


# --- vocabulary ---------------------------------------------------------------------------------
def test_special_tokens_follow_the_reference_vocabulary_order():
    ids = TOKENS["special_tokens"]
    assert list(ALL_SPECIAL_TOKENS) == sorted(ids, key=ids.get)
    assert ALL_SPECIAL_TOKENS == (*CHAT_TOKENS, *VPT_SPECIAL_TOKENS)
    assert len(set(ALL_SPECIAL_TOKENS)) == len(ALL_SPECIAL_TOKENS) == 37


def test_config_fields_name_the_reference_tokens():
    ids = TOKENS["special_tokens"]
    assert {field: ids[tok] for field, tok in CONFIG_TOKEN_FIELDS.items()} == TOKENS["config_fields"]


def test_branch_table():
    assert [(b.name, b.prefix) for b in BRANCHES.values()] == [("dino", "detection"), ("clip", "clip"), ("sam", "seg")]
    dino = BRANCHES["dino"]
    assert dino.tokens == (
        "<|detection_action_start|>",
        "<|detection_action|>",
        "<|detection_action_end|>",
        "<|detection_image_pad|>",
    )
    assert dino.action_text == "<|detection_action_start|><|detection_action|><|detection_action_end|>"
    assert BRANCHES["sam"].config_fields == {
        "seg_action_start_id": "<|seg_action_start|>",
        "seg_action_id": "<|seg_action|>",
        "seg_image_token_id": "<|seg_image_pad|>",
    }


def test_placeholder_counts():
    assert BRANCHES["dino"].num_placeholders() == BRANCHES["sam"].num_placeholders() == 256
    assert BRANCHES["clip"].num_placeholders((1, 6, 4)) == 6  # the clip fixture's grid
    assert BRANCHES["clip"].num_placeholders((2, 10, 8)) == 40
    text = BRANCHES["clip"].placeholder_text((1, 4, 6))
    assert text == "<|vision_start|>" + "<|clip_image_pad|>" * 6 + "<|vision_end|>"
    with pytest.raises(InputMismatchError):
        BRANCHES["clip"].num_placeholders()
    with pytest.raises(InputMismatchError):
        BRANCHES["clip"].num_placeholders((1, 3, 3))
    with pytest.raises(InputMismatchError):
        BRANCHES["clip"].num_placeholders((0, 4, 4))


# --- prompts ------------------------------------------------------------------------------------
def test_build_question():
    assert build_question(" What is it? ", "region") == f"What is it?\n{REGION_PROMPT}."
    assert build_question("What is it?", "reencode") == f"What is it?\n{REENCODE_PROMPT}."
    assert build_question("What is it?\n", "free") == build_question("What is it?", "direct") == "What is it?"
    with pytest.raises(BadQuestionError):
        build_question("  \n", "free")
    with pytest.raises(BadQuestionError):
        build_question(None, "free")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        build_question("Why?", "loud")  # type: ignore[arg-type]


# --- every reference case -----------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: c["id"])
def test_reference_region_case(case, size):
    parsed = parse_actions(case["text"], size)
    expected = case["per_image_size"][f"{size[0]}x{size[1]}"]
    decision = case["decision"]
    assert expected["decision"] == decision

    if decision == "region":
        assert parsed.kind == "region"
        crops = expected["crops"]
        assert len(parsed.regions) == len(crops) == len(expected["second_round_images"]) - 1
        for got, crop, image in zip(parsed.regions, crops, expected["second_round_images"][1:]):
            assert list(got.cells) == crop["cells_selected"]
            assert list(got.cells_with_margin) == crop["cells_with_margin"]
            assert list(got.box) == crop["bbox_int"] == [int(v) for v in crop["bbox_float"]]
            assert [got.box[2] - got.box[0], got.box[3] - got.box[1]] == crop["crop_size_wh"]
            assert image.endswith(crop["path_suffix"])
        user_turn = expected["second_round_messages"][2]
        assert user_turn["role"] == "user"
        assert user_turn["content"] == second_round_user_text(len(parsed.regions))
    elif decision in BRANCHES:
        assert parsed.kind == "reencode" and parsed.reencode == ReEncode(branch=decision)
        assert expected["second_round_messages"][1]["content"] == BRANCHES[decision].action_text
    elif decision == "dropped_on_error":
        assert parsed.kind == "error" and parsed.error_type == "BadModelOutputError"
        assert isinstance(parsed.exception(), BadModelOutputError)
    else:
        assert decision == "finished"
        assert parsed.kind == FINISHED_KIND[case["id"]]
    if parsed.kind != "region":
        assert parsed.regions == ()


def test_every_finished_case_is_classified():
    finished = {c["id"] for c in CASES["cases"] if c["decision"] == "finished"}
    assert finished == set(FINISHED_KIND)


def test_second_round_user_text():
    assert second_round_user_text(1) == "<image>"
    assert second_round_user_text(3) == "Region 0: <image>\nRegion 1: <image>\nRegion 2: <image>\n"
    with pytest.raises(InputMismatchError):
        second_round_user_text(0)


# --- malformed and edge cases -------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, kind",
    [
        ("The <|x_3|> and <|y_2|> are stray.", "none"),
        ("<|region_token_end|><|x_1|><|y_1|>", "none"),
        ("<|detection_action|><|detection_action_end|>", "none"),
        ("<|detection_action_start|>", "reencode"),
        ("<|clip_action_start|><|clip_action|>", "reencode"),
        ("<|seg_action_start|><|seg_action|><|seg_action_end|>" * 2, "reencode"),
        ("<|detection_action_start|><|clip_action_start|>", "finished_mixed"),
        ("<|seg_action_start|>" + region("<|x_1|>", "<|y_1|>"), "finished_mixed"),
        (region("<|x_1|>", "<|y_1|>") + REGION_START + "<|x_2|>", "region"),
        (REGION_START + "<|x_2|><|y_2|>", "error"),
        (region("<|x_9|>") + " then " + REGION_START, "error"),
        (region("<|x_1|>", "<|y_1|>") + region("<|x_2|>"), "error"),
        ("", "none"),
    ],
)
def test_malformed_sequences(text, kind):
    assert parse_actions(text, (640, 480)).kind == kind


def test_error_messages():
    unclosed = parse_actions(REGION_START + "<|x_2|><|y_2|>")
    assert unclosed.error.startswith("unclosed region")
    assert isinstance(unclosed.exception(), BadModelOutputError)
    assert parse_actions(region()).error.startswith("malformed region")
    second_bad = parse_actions(region("<|x_1|>", "<|y_1|>") + region("<|y_2|>"))
    assert second_bad.error.startswith("region 1 ") and "no x cell" in second_bad.error
    assert parse_actions("fine").exception() is None


def test_allowed_branches():
    text = BRANCHES["sam"].action_text
    assert parse_actions(text, allowed_branches={"sam"}).kind == "reencode"
    refused = parse_actions(text, allowed_branches={"dino"})
    assert refused.kind == "error" and refused.error_type == "MissingBranchError"
    assert "'sam'" in refused.error and isinstance(refused.exception(), MissingBranchError)
    assert parse_actions(text, allowed_branches=set()).kind == "error"
    assert parse_actions(region("<|x_1|>", "<|y_1|>"), allowed_branches=set()).kind == "region"
    with pytest.raises(ConfigError):
        parse_actions(text, allowed_branches={"vit"})


def test_without_image_size_there_is_no_box():
    (sel,) = parse_actions(region("<|x_3|>", "<|y_4|>")).regions
    assert sel == RegionSelection(cells=(3, 4, 3, 4), cells_with_margin=(2, 3, 4, 5), box=None)


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (10.0, 10), (10,), "10x10", (True, 5)])
def test_bad_image_size(size):
    with pytest.raises(BadImageError):
        parse_actions("x", size)
    with pytest.raises(BadImageError):
        region_box((1, 1, 1, 1), size)


def test_region_box_rejects_bad_cells():
    for cells in [(2, 0, 1, 0), (0, 0, 8, 0), (-1, 0, 0, 0)]:
        with pytest.raises(InputMismatchError):
            region_box(cells, (100, 100))


def test_parsed_output_is_consistent_and_serializable():
    with pytest.raises(ValidationError):
        ParsedOutput(kind="region")
    with pytest.raises(ValidationError):
        ParsedOutput(kind="none", reencode=ReEncode(branch="dino"))
    with pytest.raises(ValidationError):
        ParsedOutput(kind="error", error="x")
    with pytest.raises(ValidationError):
        RegionSelection(cells=(0, 0, 8, 0), cells_with_margin=(0, 0, 7, 1))
    parsed = parse_actions(region("<|x_1|>", "<|y_1|>") + region("<|x_6|>", "<|x_7|>", "<|y_5|>"), (37, 211))
    assert ParsedOutput.model_validate_json(parsed.model_dump_json()) == parsed
    assert ReEncode(branch="clip").spec is BRANCHES["clip"]


# --- properties ---------------------------------------------------------------------------------
PIECES = st.one_of(
    st.sampled_from(
        [*ALL_SPECIAL_TOKENS, "<|x_8|>", "<|z_1|>", "<|x_", "<|", "|>", "<", "|", " ", "\n", "<image>", "x_1"]
    ),
    st.text(max_size=4),
)
SIZE = st.tuples(st.integers(1, 5000), st.integers(1, 5000))
CELLS = st.tuples(st.integers(0, 7), st.integers(0, 7), st.integers(0, 7), st.integers(0, 7)).map(
    lambda c: (min(c[0], c[2]), min(c[1], c[3]), max(c[0], c[2]), max(c[1], c[3]))
)


@given(
    st.lists(PIECES, max_size=30).map("".join),
    st.none() | SIZE,
    st.none() | st.sets(st.sampled_from(sorted(BRANCHES))),
)
def test_parse_never_raises(text, size, allowed):
    parsed = parse_actions(text, size, allowed)
    if REGION_START not in text and not any(b.action_start in text for b in BRANCHES.values()):
        assert parsed.kind == "none"
    for sel in parsed.regions:
        if size is not None:
            x0, y0, x1, y1 = sel.box
            assert 0 <= x0 <= x1 <= size[0] and 0 <= y0 <= y1 <= size[1]


@given(
    st.lists(
        st.tuples(
            st.sets(st.integers(0, 7), min_size=1),
            st.sets(st.integers(0, 7), min_size=1),
            st.randoms(use_true_random=False),
        ),
        min_size=1,
        max_size=4,
    ),
    st.text(alphabet="abc .,\n", max_size=5),
    SIZE,
)
def test_regions_are_read_as_sets_in_order(selections, filler, size):
    texts = []
    for xs, ys, rnd in selections:
        cells = [X_TOKENS[i] for i in xs] + [Y_TOKENS[j] for j in ys]
        rnd.shuffle(cells)
        texts.append(region(*cells))
    parsed = parse_actions(filler + filler.join(texts) + filler, size)
    assert parsed.kind == "region"
    assert [sel.cells for sel in parsed.regions] == [(min(xs), min(ys), max(xs), max(ys)) for xs, ys, _ in selections]
    assert [sel.box for sel in parsed.regions] == [region_box(sel.cells, size)[1] for sel in parsed.regions]


@given(CELLS, st.tuples(st.integers(8, 100_000), st.integers(8, 100_000)))
def test_region_box_is_inside_and_covers_the_selection(cells, size):
    """For W, H ≥ 8: 0 ≤ x0 < x1 ≤ W and 0 ≤ y0 < y1 ≤ H, and the box covers the selected cells."""
    (mx0, my0, mx1, my1), (x0, y0, x1, y1) = region_box(cells, size)
    width, height = size
    assert (mx0, my0) == (max(cells[0] - 1, 0), max(cells[1] - 1, 0))
    assert (mx1, my1) == (min(cells[2] + 1, NUM_CUT - 1), min(cells[3] + 1, NUM_CUT - 1))
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert x0 <= cells[0] * width / NUM_CUT and x1 >= (cells[2] + 1) * width / NUM_CUT
    assert y0 <= cells[1] * height / NUM_CUT and y1 >= (cells[3] + 1) * height / NUM_CUT


@given(CELLS, st.tuples(st.integers(1, 7), st.integers(1, 7)))
def test_region_box_on_tiny_images_stays_inside(cells, size):
    """Below 8 px a side the truncated box would be empty; it keeps 1 px and never leaves the image."""
    _, (x0, y0, x1, y1) = region_box(cells, size)
    assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]
