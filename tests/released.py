"""Checkpoints in the layout the paper's released models have, built from the reference fixtures."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from vpt_agent.model.tokenizer import build_bpe_tokenizer, special_ids
from vpt_agent.tokens import ALL_SPECIAL_TOKENS

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
ENCODERS = json.loads((FIXTURES / "encoders.json").read_text())
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PREPROCESSOR = {  # Qwen2-VL-2B-Instruct's preprocessor_config.json, as the released models ship it
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor",
    "max_pixels": 12845056, "min_pixels": 3136, "merge_size": 2, "patch_size": 14,
    "processor_class": "Qwen2VLProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"max_pixels": 12845056, "min_pixels": 3136}, "temporal_patch_size": 2,
}


def write_shards(state: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    """`pytorch_model-0000i-of-0000n.bin` pickles and their index, as transformers 4.45 saved them."""
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, out / name)
        weight_map.update({k: name for k in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def released_checkpoint(out: Path, variant: str = "dino", shards: int = 3) -> Path:
    """The reference fixture `variant` in the released layout: its 4.45 config.json and key names in
    sharded `.bin` pickles (no tokenizer: the fixture's ids are hand-made)."""
    out.mkdir(parents=True)
    shutil.copy(FIXTURES / variant / "config.json", out / "config.json")
    write_shards(load_file(FIXTURES / variant / "model.safetensors"), out, shards)
    return out


def released_vpt_model(out: Path, *, seed: int = 0, shards: int = 2) -> Path:
    """A complete released-style VPT-Det checkpoint with random weights: the dino fixture's 4.45
    config.json and weights (DINOv2 in transformers' key names; the tiny DINOv2 spelled out in the
    config), the vocabulary grown to a Qwen-style tokenizer's (byte-level BPE, then the chat and VPT
    tokens, which the random head never chooses: it answers in plain text; vocab.json, merges.txt, tokenizer.json, a 4.45 tokenizer_config.json, added_tokens.json,
    special_tokens_map.json), sharded `.bin` weights and Qwen2-VL's preprocessor_config.json."""
    out.mkdir(parents=True)
    tokenizer = build_bpe_tokenizer(
        ["What is written on the sign? The sign says STOP.", "A red car, a blue bus; 3 birds! Yes no."] * 20,
        vocab_size=320,
    )
    _write_qwen_tokenizer(tokenizer, out)
    vocab = -(-len(tokenizer) // 64) * 64  # padded like Qwen's embeddings (151936 rows for 151657 tokens)

    config = json.loads((FIXTURES / "dino" / "config.json").read_text())
    ids = special_ids(tokenizer)
    config.update({field: ids[field] for field in config if field in ids})
    config.update(vocab_size=vocab, bos_token_id=ids["pad_token_id"], architectures=["VPT_Qwen2VLForConditionalGeneration"],
                  torch_dtype="bfloat16", detection_encoder_config=ENCODERS["dino"]["config"])
    (out / "config.json").write_text(json.dumps(config, indent=2))

    state = load_file(FIXTURES / "dino" / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = torch.randn(vocab, state[key].shape[1], generator=generator) * 0.1
    state["lm_head.weight"][len(tokenizer) - len(ALL_SPECIAL_TOKENS):] = 0  # random text, never a special token
    write_shards(state, out, shards)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    return out


def _write_qwen_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save_pretrained(out)
    model = json.loads((out / "tokenizer.json").read_text())["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {token.content: i for i, token in tokenizer.added_tokens_decoder.items()}
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for t, i in added.items()}
    extra = [t for t in added if t not in ("<|endoftext|>", "<|im_end|>")]
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": extra, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({  # transformers 4.45's words
        "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": extra, "bos_token": None, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "padding_side": "right", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }, indent=2))
