"""The paper's released checkpoints as users run them: their file layout, their own tokenizer (never
extended) and image processor, on any device and dtype."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from vpt_agent import build_graph, load_model
from vpt_agent.cli import main
from vpt_agent.errors import CheckpointError
from vpt_agent.perception.qwen_image import qwen_pixel_values
from vpt_agent.streaming import TextDeltas

from released import released_vpt_model


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return released_vpt_model(tmp_path_factory.mktemp("hub") / "Qwen2-VL-2b-VPT-Det")


@pytest.fixture
def edited(released, tmp_path):
    """A copy of the released checkpoint to change."""
    return shutil.copytree(released, tmp_path / "edited")


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_released_checkpoint_answers_through_build_graph(released, photo, dtype):
    graph = build_graph(str(released), dtype=dtype)
    result = graph.invoke({"image": str(photo), "q": "What is written on the sign?"},
                          {"configurable": {"thread_id": dtype}})
    assert result["answer"] and not result["error"] and not result["warnings"]
    assert torch.get_default_dtype() == torch.float32


def test_a_released_checkpoint_answers_through_the_cli(released, photo, capsys):
    assert main(["ask", str(photo), "What is written on the sign?", "--model", str(released),
                 "--dtype", "bfloat16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"]


def test_streamed_text_is_the_answer_without_special_tokens(released, photo):
    graph = build_graph(str(released), max_new_tokens=40)
    events = list(graph.stream({"image": str(photo), "q": "What is written on the sign?"},
                               stream_mode=["custom", "values"]))
    answer = [data for mode, data in events if mode == "values"][-1]["answer"]
    texts = [data["text"] for mode, data in events if mode == "custom" and data["type"] == "text"]
    assert answer and "".join(texts) == answer


def test_text_deltas_join_to_the_decoded_text_token_by_token(released):
    """Byte-level BPE splits characters across tokens: no delta holds half of one."""
    tokenizer = AutoTokenizer.from_pretrained(released)
    end = tokenizer.convert_tokens_to_ids(["<|im_end|>"])
    text = "Café 東京, naïve 🙂 STOP"
    rng = np.random.default_rng(0)
    cases = [tokenizer(text, add_special_tokens=False)["input_ids"] + end]
    cases += [[int(i) for i in rng.integers(0, 300, 30)] + end for _ in range(10)]  # any bytes, valid or not
    for ids in cases:
        assert "".join(_deltas(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True).strip()
    first = _deltas(tokenizer, cases[0])
    assert "".join(first) == text and len(first) > 5 and not any("\ufffd" in delta for delta in first)


def _deltas(tokenizer, ids: list[int]) -> list[str]:
    events = []
    deltas = TextDeltas(tokenizer, 0, events.append)
    for i in ids:
        deltas([i])
    deltas.finish()
    return [e["text"] for e in events]


def test_the_released_tokenizer_and_processor_are_used_as_shipped(released):
    model, tokenizer = load_model(released)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and len(tokenizer) <= model.config.text_config.vocab_size
    assert tokenizer.convert_tokens_to_ids("<|detection_action|>") == model.config.detection_action_id
    assert tokenizer("<|x_3|><|im_end|>", add_special_tokens=False)["input_ids"] == [
        tokenizer.convert_tokens_to_ids("<|x_3|>"), model.config.para_end_id]
    assert model.image_processor.size == {"shortest_edge": 3136, "longest_edge": 12845056}


def test_the_checkpoint_preprocessor_config_sets_pixels_and_normalisation(edited):
    config = json.loads((edited / "preprocessor_config.json").read_text())
    config.update(image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=112 * 112,
                  size={"min_pixels": 112 * 112, "max_pixels": 12845056})
    (edited / "preprocessor_config.json").write_text(json.dumps(config))
    model, _ = load_model(edited)
    image = torch.full((3, 56, 56), 255, dtype=torch.uint8)
    pixels, grid = qwen_pixel_values([image], model.image_processor)
    assert grid.tolist() == [[1, 8, 8]]  # raised to the checkpoint's 112x112 minimum (default: 56x56)
    assert torch.allclose(pixels, torch.ones_like(pixels))  # white with mean 0.5, std 0.5


def test_a_preprocessor_that_disagrees_with_the_vision_tower_is_refused(edited):
    config = json.loads((edited / "preprocessor_config.json").read_text())
    (edited / "preprocessor_config.json").write_text(json.dumps({**config, "patch_size": 16}))
    with pytest.raises(CheckpointError, match=r"patch_size=16 \(vision tower: 14\)"):
        load_model(edited)


def test_a_tokenizer_lacking_a_vpt_token_is_refused_not_extended(edited, photo, capsys):
    for token in ("<|seg_action_end|>", "<|x_7|>"):
        _remove_token(edited, token)
    with pytest.raises(CheckpointError, match=r"lacks the VPT tokens \['<\|x_7\|>', '<\|seg_action_end\|>'\]"):
        build_graph(str(edited))
    assert main(["ask", str(photo), "Q?", "--model", str(edited)]) == 1
    assert "lacks the VPT tokens" in capsys.readouterr().err


def test_a_tokenizer_larger_than_the_embedding_is_refused(edited):
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    with pytest.raises(CheckpointError, match=r"has 3\d\d tokens, more than the model's vocab_size 300"):
        load_model(edited)


def _remove_token(path, token: str) -> None:
    """Take `token` out of every tokenizer file of a checkpoint."""
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != token]
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {i: t for i, t in config["added_tokens_decoder"].items() if t["content"] != token}
    config["additional_special_tokens"].remove(token)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    added = json.loads((path / "added_tokens.json").read_text())
    del added[token]
    (path / "added_tokens.json").write_text(json.dumps(added))
    specials = json.loads((path / "special_tokens_map.json").read_text())
    specials["additional_special_tokens"].remove(token)
    (path / "special_tokens_map.json").write_text(json.dumps(specials))
