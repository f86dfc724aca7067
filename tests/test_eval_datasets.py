"""Reading the VPT_Datasets format (tests/fixtures/vpt_datasets) and exporting the synthetic benchmark."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpt_agent.evaluation.datasets import DatasetError, export_synthetic, read_dataset, split_prompt
from vpt_agent.prompts import REENCODE_PROMPT, REGION_PROMPT

FIXTURES = Path(__file__).parent / "fixtures" / "vpt_datasets"


def test_region_split():
    data = read_dataset(FIXTURES / "TextVQA_region_test.json")
    assert data.name == "TextVQA_region_test" and data.prompt_mode == "region" and data.problems == ()
    first, second, third = data.items
    assert first.question == "What colour is the sign?"  # placeholder and suffix gone
    assert second.question == "What shape is on the ball?\nAnswer the question using a single word or phrase."
    assert first.prompt_mode == "region" and first.answers == ("red",)
    assert third.answers == ("nothing",)  # "Now answer the question.\n" is not part of the answer
    assert first.image == str(FIXTURES.resolve() / "images" / "sign.png")  # relative to the dataset file
    assert all(item.problem is None for item in data.items)
    assert [item.index for item in data.items] == [0, 1, 2]


def test_derived_ids_are_stable_and_given_ids_are_kept(tmp_path):
    data = read_dataset(FIXTURES / "TextVQA_region_test.json")
    assert data.items[0].id.startswith("0-") and len({item.id for item in data.items}) == 3
    copy = tmp_path / "copy.json"
    copy.write_text((FIXTURES / "TextVQA_region_test.json").read_text())
    assert [item.id for item in read_dataset(copy).items] == [item.id for item in data.items]
    pope = read_dataset(FIXTURES / "POPE_action_test.json")
    assert [item.id for item in pope.items] == ["pope-1", "pope-2", "pope-3", "pope-4"]
    assert pope.prompt_mode == "reencode" and pope.items[1].question == "Is there a dog in the image?"


def test_absolute_image_paths_and_extra_keys(tmp_path):
    image = (FIXTURES / "images" / "ball.png").resolve()
    record = {
        "id": 7, "category": "shapes", "answers": ["circle", "round"], "images": [str(image)],
        "messages": [{"role": "user", "content": "<image>What shape?"}, {"role": "assistant", "content": "circle"}],
    }
    path = tmp_path / "elsewhere" / "set.json"
    path.parent.mkdir()
    path.write_text(json.dumps([record]))
    (item,) = read_dataset(path).items
    assert (item.id, item.image, item.question, item.prompt_mode) == ("7", str(image), "What shape?", "free")
    assert item.answers == ("circle", "round") and item.category == "shapes" and item.problem is None


def test_bad_items_are_reported_not_fatal():
    data = read_dataset(FIXTURES / "bad_data_test.json")
    problems = {item.id: item.problem for item in data.items}
    assert problems["good"] is None
    assert problems["missing-image"].startswith("image not found: ")
    assert problems["corrupt-image"] is None  # decoding is the graph's job: perceive reports it
    assert problems["empty-question"] == "empty question"
    assert problems["no-answer"] == "no ground truth (no assistant turn)"
    assert [p for i, p in problems.items() if i.startswith("6-")] == ["not a JSON object: str"]
    assert data.problems == ("item 4: duplicate id 'good' (first at item 0), left out",)
    assert [item.question for item in data.items if item.id == "good"] == ["What colour is the sign?"]


@pytest.mark.parametrize("content", ['{"messages": []}', "not json", ""])
def test_a_file_that_is_not_a_json_list_is_an_error(tmp_path, content):
    path = tmp_path / "set.json"
    path.write_text(content)
    with pytest.raises(DatasetError):
        read_dataset(path)


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset file"):
        read_dataset(tmp_path / "missing.json")


def test_split_prompt():
    assert split_prompt(f"<image>\nHow many?\n{REGION_PROMPT}.") == ("How many?", "region")
    assert split_prompt(f"How many? {REENCODE_PROMPT}") == ("How many?", "reencode")
    assert split_prompt("<image><image>\nHow many?") == ("How many?", "free")


def test_synthetic_export_round_trip(tmp_path):
    path = export_synthetic(tmp_path / "synthetic_region_test.json", 2, seed=3)
    data = read_dataset(path)
    assert [item.id for item in data.items] == ["synthetic-3-0", "synthetic-3-1"]
    assert data.prompt_mode == "region" and all(item.problem is None for item in data.items)
    assert all(item.category in ("fine_detail", "spatial", "counting", "existence") for item in data.items)
    record = json.loads(path.read_text())[0]
    assert [m["role"] for m in record["messages"]] == ["user", "assistant", "user", "assistant"]
    assert record["messages"][1]["content"].startswith("<|region_token_start|>")
    assert len(record["images"]) == 2 and all((tmp_path / image).is_file() for image in record["images"])
