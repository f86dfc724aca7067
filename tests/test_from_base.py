"""`vpt-agent train` from a plain Qwen2-VL / Qwen2.5-VL checkpoint (transformers' own save, a tokenizer
without the VPT tokens): the VPT tokens, fields, encoder and projector are added, the base's weights
kept, and the trained result is a VPT checkpoint the graph runs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_sft import MAX_PIXELS, STEPS, data, losses, options  # noqa: F401  (data: a fixture)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from vpt_agent import build_graph
from vpt_agent.cli import main
from vpt_agent.errors import CheckpointError
from vpt_agent.model.from_base import is_plain_base, vpt_from_base
from vpt_agent.model.loading import image_processor_for, load_tokenizer
from vpt_agent.model.modeling import VPTForConditionalGeneration
from vpt_agent.model.tiny import TINY_DINO, TINY_SAM, tiny_base_fields, tiny_config
from vpt_agent.model.tokenizer import build_char_tokenizer
from vpt_agent.perception.dino import build_dino_encoder
from vpt_agent.perception.sam import build_sam_encoder
from vpt_agent.tokens import ALL_SPECIAL_TOKENS, CHAT_TOKENS
from vpt_agent.training.data import read_sft_items
from vpt_agent.training.trainer import train

PLAIN = {"qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
         "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)}
KEPT = ("model.visual.blocks.0.attn.qkv.weight", "model.language_model.layers.1.input_layernorm.weight")
"""Base weights that no training method here changes (the ViT; an LLM norm LoRA does not target)."""


def plain_base(path: Path, arch: str = "qwen2_vl", tied: bool = False) -> Path:
    """A tiny plain `arch` checkpoint (its head tied to the embedding with `tied`, as Qwen2-VL-2B's) as
    transformers saves it, with a tokenizer of the chat tokens alone and its image processor."""
    tokenizer = build_char_tokenizer(CHAT_TOKENS)
    config_class, model_class = PLAIN[arch]
    torch.manual_seed(0)
    config = config_class(**{**tiny_base_fields(tokenizer, arch=arch), "tie_word_embeddings": tied})
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor_for(tiny_config(build_char_tokenizer(), arch=arch)).save_pretrained(path)
    return path


def tiny_dino(path: Path) -> Path:
    """A tiny DINOv2 (timm names) in a safetensors file."""
    torch.manual_seed(1)
    save_file(build_dino_encoder(TINY_DINO).state_dict(), path)
    return path


@pytest.mark.parametrize("arch, branch, tied", [("qwen2_vl", "clip", True), ("qwen2_vl", "dino", False),
                                               ("qwen2_5_vl", "clip", False)])
def test_a_plain_base_trains_to_a_vpt_graph_model(data, tmp_path, arch, branch, tied):  # noqa: F811
    base = plain_base(tmp_path / "base", arch, tied)
    assert is_plain_base(base)
    extra = dict(dino=str(tiny_dino(tmp_path / "dino.safetensors")), dino_config=TINY_DINO) if branch == "dino" else {}
    out = train(options(base, data, tmp_path / "out", branch=None if branch == "clip" else branch, method="lora",
                        save_steps=STEPS, **extra))
    curve = losses(out)
    assert len(curve) == STEPS and sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3

    trained = VPTForConditionalGeneration.from_pretrained(out)
    assert trained.config.branches == (branch,) and trained.config.tie_word_embeddings == tied and not is_plain_base(out)
    start = PLAIN[arch][1].from_pretrained(base).state_dict()  # transformers saves the 4.45 names
    state = trained.state_dict()
    assert all(torch.equal(state[key], start[key]) for key in KEPT)
    assert any(not torch.equal(state[key], start[key]) for key in start if ".q_proj." in key)
    if branch == "dino":
        assert torch.equal(state["detection_model.blocks.0.attn.qkv.weight"],
                           load_file(tmp_path / "dino.safetensors")["blocks.0.attn.qkv.weight"])
    assert set(ALL_SPECIAL_TOKENS) <= set(load_tokenizer(out, trained.config).get_vocab())

    item = read_sft_items([data[0]], (branch,))[0]
    result = build_graph(out, device="cpu").invoke({"image": item.image, "q": item.question})
    assert result["steps"][-1]["node"] == "answer"
    assert result["error"] is None or result["error"].startswith("BadModelOutputError: ")


def test_a_sam_checkpoint_gives_the_sam_branch_its_encoder(tmp_path):
    """segment-anything's checkpoint layout (the whole SAM: its image encoder is taken), as a .pth; the
    new tokens' embedding and head rows start as the mean of the base's rows."""
    torch.manual_seed(2)
    encoder = build_sam_encoder(TINY_SAM).state_dict()
    torch.save({**{f"image_encoder.{k}": v for k, v in encoder.items()}, "mask_decoder.x": torch.zeros(1)},
               tmp_path / "sam.pth")
    model, tokenizer = vpt_from_base(plain_base(tmp_path / "base"), ["sam"], {"sam": tmp_path / "sam.pth"},
                                     {"sam": TINY_SAM})
    assert model.config.branches == ("sam",) and set(ALL_SPECIAL_TOKENS) <= set(tokenizer.get_vocab())
    assert all(torch.equal(model.seg_model.state_dict()[key], value) for key, value in encoder.items())
    start = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "base")
    known = len(build_char_tokenizer(CHAT_TOKENS))
    for rows, base_rows in ((model.get_input_embeddings().weight, start.get_input_embeddings().weight),
                            (model.lm_head.weight, start.lm_head.weight)):
        assert len(rows) == len(tokenizer) > known and torch.equal(rows[:known], base_rows)
        assert torch.allclose(rows[known:], base_rows.mean(0).expand(len(rows) - known, -1))


@pytest.mark.parametrize("argv, message", [
    (["--branch", "dino", "--dino", "missing.safetensors"], "error: --dino: no such file: missing.safetensors"),
    (["--branch", "dino"], "--branch dino on a plain base needs its encoder's weights: --dino FILE"),
])
def test_a_bad_encoder_file_fails_in_one_line(data, tmp_path, capsys, argv, message):  # noqa: F811
    base = plain_base(tmp_path / "base")
    capsys.readouterr()  # transformers' progress bar of the save
    assert main(["train", "--base", str(base), "--data", str(data[0]), "--out", str(tmp_path / "out"), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_mismatched_encoder_file_names_the_file_and_key(data, tmp_path):  # noqa: F811
    """The default architecture (the released DINOv2-L) does not fit a tiny DINOv2's weights."""
    dino = tiny_dino(tmp_path / "dino.safetensors")
    with pytest.raises(CheckpointError, match=rf"^--dino {re.escape(str(dino))}: weights do not fit: missing \['blocks\.") as error:
        train(options(plain_base(tmp_path / "base"), data, tmp_path / "out", branch="dino", dino=str(dino)))
    assert "\n" not in str(error.value)
