"""What the model reads around the images: the paper's prompt suffixes and Qwen2-VL's chat template,
as text and as token ids. The session and the training conversations build every turn here.

A conversation, as the released models were trained on it::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<image>\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{round 1}<|im_end|>\\n<|im_start|>user\\n{crops, features or text}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>

Every ``<image>`` becomes ``<|vision_start|>``, one placeholder per merged image token, ``<|vision_end|>``.
Template text is tokenized with special tokens recognised; the user's question never is.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from types import MappingProxyType
from typing import Literal

from .errors import BadQuestionError, ConfigError, InputMismatchError
from .tokens import BRANCHES, IMAGE_PAD, IMAGE_PLACEHOLDER, VISION_END, VISION_START

DEFAULT_SYSTEM = "You are a helpful assistant."
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
"""Closes a user turn and opens the assistant's."""
NEXT_USER = "\n<|im_start|>user\n"
"""Follows an assistant turn's ``<|im_end|>``."""

# --- the paper's prompt suffixes --------------------------------------------------------------------
REGION_PROMPT = "Identify the region that can help you answer the question, and then answer the question"
REENCODE_PROMPT = "Require additional perception features, and then answer the question"
PromptMode = Literal["region", "reencode", "free", "direct"]
"""region / reencode: ask for that kind of action; free: the model decides (the -NoPrompt model);
direct: a plain question, no VPT prompt."""
PROMPT_SUFFIXES: Mapping[str, str | None] = MappingProxyType(
    {"region": REGION_PROMPT, "reencode": REENCODE_PROMPT, "free": None, "direct": None}
)


def build_question(question: str, mode: PromptMode) -> str:
    """The user's question with the mode's suffix: ``"<question>\\n<suffix>."``.

    The question is stripped; "free" and "direct" add nothing.
    """
    if not isinstance(question, str) or not question.strip():
        raise BadQuestionError("the question must be a non-empty string")
    if mode not in PROMPT_SUFFIXES:
        raise ConfigError(f"unknown prompt mode {mode!r}; expected one of {sorted(PROMPT_SUFFIXES)}")
    suffix = PROMPT_SUFFIXES[mode]
    question = question.strip()
    return question if suffix is None else f"{question}\n{suffix}."


def second_round_user_text(n_regions: int) -> str:
    """User turn showing the crops: ``"<image>"`` for one, ``"Region i: <image>\\n"`` × n for several."""
    if n_regions < 1:
        raise InputMismatchError(f"a region turn needs at least one region, got {n_regions}")
    if n_regions == 1:
        return IMAGE_PLACEHOLDER
    return "".join(f"Region {i}: {IMAGE_PLACEHOLDER}\n" for i in range(n_regions))


# --- turns as token ids ------------------------------------------------------------------------------
def first_turn_ids(tokenizer, question: str, image_tokens: int, system_prompt: str = DEFAULT_SYSTEM) -> list[int]:
    """Round 1: the system turn, the user turn (image, "\\n", question) and the opened assistant
    turn. ``question`` carries its mode's suffix; it is user text (special tokens not recognised)."""
    from .model.tokenizer import encode_user_text  # the suffixes above stay importable without transformers

    head = f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n{IMAGE_PLACEHOLDER}\n"
    return [*template_ids(tokenizer, head, [image_tokens]), *encode_user_text(tokenizer, question),
            *template_ids(tokenizer, ASSISTANT)]


def region_turn_ids(tokenizer, image_tokens: Sequence[int]) -> list[int]:
    """After the assistant's ``<|im_end|>``: the user turn showing one crop per entry of
    ``image_tokens`` (its merged token count), and the opened assistant turn."""
    return template_ids(tokenizer, NEXT_USER + second_round_user_text(len(image_tokens)) + ASSISTANT, image_tokens)


def reencode_turn_ids(tokenizer, branch: str, placeholders: int) -> list[int]:
    """After the assistant's ``<|im_end|>``: the user turn holding `branch`'s feature placeholders,
    and the opened assistant turn."""
    pad = tokenizer.convert_tokens_to_ids(BRANCHES[branch].image_pad)
    return [*template_ids(tokenizer, NEXT_USER), *_vision_ids(tokenizer, placeholders, pad),
            *template_ids(tokenizer, ASSISTANT)]


def text_turn_ids(tokenizer, text: str) -> list[int]:
    """After the assistant's ``<|im_end|>``: a user turn of plain user text, and the opened assistant turn."""
    from .model.tokenizer import encode_user_text

    return [*template_ids(tokenizer, NEXT_USER), *encode_user_text(tokenizer, text), *template_ids(tokenizer, ASSISTANT)]


def template_ids(tokenizer, text: str, image_tokens: Sequence[int] = ()) -> list[int]:
    """Token ids of trusted template text (special tokens recognised) in which the i-th
    ``<image>`` becomes a vision block of ``image_tokens[i]`` image placeholders."""
    parts = text.split(IMAGE_PLACEHOLDER)
    if len(parts) != len(image_tokens) + 1:
        raise InputMismatchError(f"{len(parts) - 1} images in the template, {len(image_tokens)} token counts")
    ids = list(_ids(tokenizer, parts[0]))
    pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    for n, part in zip(image_tokens, parts[1:]):
        ids += _vision_ids(tokenizer, n, pad) + list(_ids(tokenizer, part))
    return ids


def _vision_ids(tokenizer, n: int, pad: int) -> list[int]:
    start, end = tokenizer.convert_tokens_to_ids([VISION_START, VISION_END])
    return [start, *[pad] * n, end]


@lru_cache(maxsize=1024)
def _ids(tokenizer, text: str) -> tuple[int, ...]:
    """Template pieces repeat in every conversation: each is tokenized once per tokenizer."""
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()
