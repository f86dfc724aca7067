"""Reading and writing VPT checkpoints: the released layout (transformers-4.45 key names, sharded
`pytorch_model-*.bin` pickles or safetensors) and our own safetensors saves."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import Qwen2VLImageProcessor

from ..errors import CheckpointError, ConfigError
from ..perception.dino import convert_hf_dinov2_state_dict
from ..perception.sam import convert_hf_sam_vision_state_dict
from ..tokens import ALL_SPECIAL_TOKENS, CONFIG_TOKEN_FIELDS
from .config import VPT_CONFIGS, VPTFields, config_class_for
from .projectors import UNUSED_PROJECTOR_KEYS

# 4.45-era Qwen2-VL names -> transformers 5 names (prefix renames, first match wins).
KEY_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "model.language_model."),
    ("model.visual.", "model.visual."),
    ("model.", "model.language_model."),
    ("visual.", "model.visual."),
)


def resolve_checkpoint_dir(path_or_id: str | Path) -> Path:
    """A local directory as is; otherwise a hub id fetched with huggingface_hub (never in tests)."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_id).startswith((".", "/")) or str(path_or_id).count("/") != 1:
        raise CheckpointError(f"checkpoint directory not found: {path_or_id}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id)))
    except Exception as exc:  # network or missing repo: say which
        raise CheckpointError(f"could not fetch '{path_or_id}' from the hub: {exc}") from exc


def load_tokenizer(path_or_id: str | Path, config: VPTFields | None = None):
    """The checkpoint's tokenizer, never extended: every VPT token must already be in it (a
    `CheckpointError` names the missing ones); they are marked special, which adds no id. With the
    model's `config`, each config token-id field must name its token and the tokenizer must fit the
    embedding (`len(tokenizer) <= vocab_size`)."""
    from transformers import AutoTokenizer

    from .tokenizer import add_vpt_tokens

    path = resolve_checkpoint_dir(path_or_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} holds no loadable tokenizer: {str(exc).splitlines()[0]}") from exc
    vocab = tokenizer.get_vocab()
    missing = [token for token in ALL_SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise CheckpointError(
            f"the tokenizer in {path} lacks the VPT tokens {missing}: a VPT checkpoint's tokenizer holds "
            "them all (vpt-agent never adds tokens to a released tokenizer)"
        )
    add_vpt_tokens(tokenizer)  # marks present tokens special; adds nothing
    if config is not None:
        wrong = sorted(f for f, token in CONFIG_TOKEN_FIELDS.items() if getattr(config, f, None) != vocab[token])
        if wrong:
            shown = ", ".join(f"{f}={getattr(config, f, None)} ({CONFIG_TOKEN_FIELDS[f]} is {vocab[CONFIG_TOKEN_FIELDS[f]]})"
                              for f in wrong)
            raise CheckpointError(f"the tokenizer in {path} disagrees with the model config on {wrong}: {shown}")
        if len(tokenizer) > config.text_config.vocab_size:
            raise CheckpointError(
                f"the tokenizer in {path} has {len(tokenizer)} tokens, more than the model's "
                f"vocab_size {config.text_config.vocab_size}"
            )
    return tokenizer


def load_image_processor(path: Path, config: VPTFields) -> Qwen2VLImageProcessor:
    """The checkpoint's `preprocessor_config.json` when present (min/max pixels, mean/std), else
    transformers' Qwen2-VL defaults; its patch, merge and temporal patch must be the vision tower's.
    The paper's regularisation (longer side <= 512) is applied before it either way."""
    vision = config.vision_config
    if not (path / "preprocessor_config.json").is_file():
        return image_processor_for(config)
    try:
        processor = Qwen2VLImageProcessor.from_pretrained(path)
    except Exception as exc:  # invalid JSON or fields: transformers raises several types
        raise CheckpointError(f"{path / 'preprocessor_config.json'} is not a Qwen2-VL image processor config: "
                              f"{' '.join(str(exc).split())}") from exc
    wrong = [f"{name}={getattr(processor, name)} (vision tower: {getattr(vision, field)})"
             for name, field in _PROCESSOR_FIELDS if getattr(processor, name) != getattr(vision, field)]
    if wrong:
        raise CheckpointError(f"{path / 'preprocessor_config.json'} disagrees with config.json: {', '.join(wrong)}")
    return processor


def image_processor_for(config: VPTFields) -> Qwen2VLImageProcessor:
    """transformers' Qwen2-VL image processor with the vision tower's patch, merge and temporal patch."""
    vision = config.vision_config
    return Qwen2VLImageProcessor(**{name: getattr(vision, field) for name, field in _PROCESSOR_FIELDS})


_PROCESSOR_FIELDS = (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                     ("temporal_patch_size", "temporal_patch_size"))


def load_config(path: Path, **overrides: Any) -> VPTFields:
    """Read config.json, check it describes a VPT model (on Qwen2-VL or Qwen2.5-VL: the VPT config
    class of its `model_type`), apply keyword overrides."""
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} holds a JSON {type(raw).__name__}, not an object")
    model_type = raw.get("model_type")
    config_class = config_class_for(model_type)
    if config_class is None:
        raise ConfigError(f"{file} is a '{model_type}' checkpoint, not a VPT one ({', '.join(map(repr, VPT_CONFIGS))})")
    raw.update(overrides)
    raw["model_type"] = config_class.model_type
    try:
        config = config_class(**{k: v for k, v in raw.items() if k != "transformers_version"})
    except Exception as exc:  # field validation (transformers, huggingface_hub) raises several types
        raise ConfigError(f"{file}: {' '.join(str(exc).split())}") from exc
    config.validate_vpt()
    return config


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint: those an index names, else the usual single/sharded names."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            try:
                names = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:  # not JSON, or no weight_map
                raise CheckpointError(f"{path / index} is not a weight index ({type(exc).__name__}: {exc})") from exc
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise CheckpointError(f"{path / index} names shards that are missing: {missing}")
            return [path / n for n in names]
    for pattern in ("model.safetensors", "model-*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"{path} holds no model weights (model*.safetensors or pytorch_model*.bin)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, memory-mapped where the format allows (file-backed: they
    take anonymous memory only once copied or cast): safetensors (single or sharded) or `.bin` pickles
    (loaded with `weights_only=True`; a pickle that tries to run code is refused)."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        state.update(read_weight_file(file))
    return state


def read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of one `.safetensors` file, else of a tensor pickle (`.bin`, `.pth`: `weights_only=True`);
    a `CheckpointError` naming the file for anything else."""
    safetensors = file.suffix == ".safetensors"
    try:
        state = _read_safetensors(file) if safetensors else _read_pickle(file)
    except Exception as exc:  # foreign data fails in many ways (unpickling, zip, header, I/O)
        kind = "safetensors file" if safetensors else "plain tensor pickle"
        reason = f"{type(exc).__name__}: " + str(exc).partition("\n")[0]
        raise CheckpointError(f"refused to load {file.name}: not a {kind} ({reason})") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"refused to load {file.name}: it does not map names to tensors")
    return state


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(file, framework="pt", device="cpu") as tensors:
        return {key: tensors.get_tensor(key) for key in tensors.keys()}


def _read_pickle(file: Path) -> Any:
    try:  # the zip format torch.save writes: tensors mapped from the file
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # a legacy (non-zip) pickle cannot be mapped: read it whole
            raise
        return torch.load(file, map_location="cpu", weights_only=True)


def convert_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Released (4.45 / transformers-encoder) key names -> this library's module names."""
    out: dict[str, torch.Tensor] = {}
    branch_parts: dict[str, dict[str, torch.Tensor]] = {"detection_model.": {}, "seg_model.": {}}
    for key, value in state.items():
        prefix = next((p for p in branch_parts if key.startswith(p)), None)
        if prefix is not None:
            branch_parts[prefix][key[len(prefix):]] = value
            continue
        for old, new in KEY_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    for prefix, converter, attr in (
        ("detection_model.", convert_hf_dinov2_state_dict, "detection_model"),
        ("seg_model.", convert_hf_sam_vision_state_dict, "seg_model"),
    ):
        part, module = branch_parts[prefix], getattr(model, attr, None)
        if part and module is not None and not set(part) <= set(module.state_dict()):
            part = converter(part, module)  # transformers naming (released checkpoints)
        out.update({prefix + k: v for k, v in part.items()})
    for branch, keys in UNUSED_PROJECTOR_KEYS.items():
        for key in keys:
            out.pop(f"{'seg' if branch == 'sam' else branch}_projector.{key}", None)
    return out


def check_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise `CheckpointError` naming missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if keys:
            shown = ", ".join(keys[:8]) + (f" … (+{len(keys) - 8})" if len(keys) > 8 else "")
            problems.append(f"{len(keys)} {title}: {shown}")
    if problems:
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(problems))


def resolve_device(device_map: str | torch.device | None) -> torch.device:
    """`None` -> cpu, "auto" -> cuda when available, else the device named."""
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        raise CheckpointError("device_map dicts (multi-device sharding) are not supported; name one device")
    return torch.device(device_map)
