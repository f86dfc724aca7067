"""`Conversation`: one multi-round VPT conversation as token ids, M-RoPE positions and a KV cache.

A round feeds the conversation's next segment (the prompt with its image, a user turn showing
crops or conditioned features or text, or the token a round cut by its token budget stopped at)
and then decodes greedily; `vpt_agent.model.batch.Batch` runs rounds of many conversations in one
batch. Between rounds a conversation holds its own KV cache (its fed positions only), so it can
wait for a tool without holding a place in a batch.

Positions continue exactly as `get_rope_index` numbers the whole conversation. The conditioning
vector of a re-encoding action is the final hidden state at its action-start token, produced
while decoding the action: no extra forward pass.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import InputMismatchError, VPTError
from ..perception.qwen_image import num_image_tokens, qwen_grid, qwen_size
from ..prompts import DEFAULT_SYSTEM, first_turn_ids, reencode_turn_ids, region_turn_ids, text_turn_ids
from ..tokens import BRANCHES

Stop = Literal["eos", "action", "length"]
KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per LLM layer: keys and values, (rows, kv heads, positions, head dim)."""


@dataclass
class Turn:
    """What one round generated."""

    token_ids: list[int]
    text: str
    stop: Stop


@dataclass
class Segment:
    """Tokens a conversation feeds at once, with what replaces their embeddings."""

    ids: list[int]
    images: list[torch.Tensor] = field(default_factory=list)
    """The segment's uint8 (3, H, W) images, in order (the global image, or crops): the batch resizes
    and encodes them (for all the rows it prefills at once)."""
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    """Branch -> raw encoder features: the batch projects them, conditioned on the conversation's
    action of that branch."""
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)
    """Branch -> (1, hidden) input embedding of the segment's action token."""


@dataclass(frozen=True)
class ChatIds:
    """The token ids a conversation and its rounds depend on, for one model config and tokenizer."""

    im_end: int
    pad: int
    stops: Mapping[int, Stop]
    """Tokens that end a round: `<|im_end|>` and eos ("eos"), a re-encoding action end ("action")."""
    actions: Mapping[int, str]
    """`<|X_action|>` id -> branch, for the branches of the model."""
    placeholders: tuple[int, ...]
    """Image, video and branch placeholder ids: only the template writes them, greedy decoding never."""

    @classmethod
    def of(cls, config, tokenizer) -> ChatIds:
        text = config.text_config
        eos = text.eos_token_id if isinstance(text.eos_token_id, (list, tuple)) else [text.eos_token_id]
        stops: dict[int, Stop] = {i: "eos" for i in (*eos, config.para_end_id) if i is not None}
        for branch in config.branches:
            stops[tokenizer.convert_tokens_to_ids(BRANCHES[branch].action_end)] = "action"
        return cls(
            im_end=config.para_end_id,
            pad=text.pad_token_id if text.pad_token_id is not None else 0,
            stops=stops,
            actions={getattr(config, BRANCHES[b].action_field): b for b in config.branches},
            placeholders=tuple(sorted({config.image_token_id, config.video_token_id,
                                       *(getattr(config, b.pad_field) for b in BRANCHES.values())})),
        )


class Conversation:
    """One conversation with a VPT model: what it was fed, and the segment its next round feeds."""

    def __init__(self, model, tokenizer, *, system_prompt: str = DEFAULT_SYSTEM, chat: ChatIds | None = None):
        self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
        self.chat = chat or ChatIds.of(model.config, tokenizer)
        self.ids: list[int] = []
        """Every token fed, in order."""
        self.next_pos = 0
        """The M-RoPE position of the next text token."""
        self.pending: int | None = None
        """The token the last round stopped at, not fed yet (it opens the next segment)."""
        self.queued: Segment | None = None
        """The next user turn, once added."""
        self.cache: KV | None = None
        """Its KV cache (rows = 1) between rounds; None while a batch holds it, or before the first round."""
        self.logits: torch.Tensor | None = None
        """(vocab,) next-token logits after the last fed token."""
        self.hidden: torch.Tensor | None = None
        """(hidden,) final hidden state of the last fed token."""
        self.conditions: dict[str, torch.Tensor] = {}
        """Branch -> (hidden,) state at the branch's action-start token: what its features are conditioned on."""

    # ------------------------------------------------------------------------ turns
    def start(self, image: torch.Tensor, question: str) -> None:
        """Round 1: one full-resolution uint8 (3, H, W) image and the question (with its prompt suffix)."""
        if self.ids or self.queued is not None:
            raise VPTError("this conversation has started already")
        ids = first_turn_ids(self.tokenizer, question, num_image_tokens(self._grid(image)), self.system_prompt)
        self.queued = Segment(ids, images=[image])

    def add_regions(self, crops: Sequence[torch.Tensor]) -> None:
        """Show uint8 (3, h, w) crops as the next user turn (reference format) and open the answer turn."""
        tokens = [num_image_tokens(self._grid(crop)) for crop in crops]
        self._queue(Segment(self._close_turn() + region_turn_ids(self.tokenizer, tokens), images=list(crops)))

    def add_reencode(self, branch: str, features: torch.Tensor) -> None:
        """Inject raw encoder features (dino (256, d), sam (C, 64, 64), clip (n, hidden)), projected
        and conditioned on the hidden state of this conversation's action-start token."""
        if branch not in self.conditions:
            raise InputMismatchError(f"the conversation generated no {branch} action to condition the features on")
        placeholders = BRANCHES[branch].fixed_placeholders or features.shape[0]  # clip: one per merged token
        ids = self._close_turn() + reencode_turn_ids(self.tokenizer, branch, placeholders)
        self._queue(Segment(ids, features={branch: features}))

    def add_text(self, text: str) -> None:
        """A plain user turn (user text: no special tokens) and a new assistant turn, e.g. to ask
        again for a direct answer after a perception request that could not be served."""
        self._queue(Segment(self._close_turn() + text_turn_ids(self.tokenizer, text)))

    def tokens(self) -> list[int]:
        """Every token so far: fed, pending and queued for the next round."""
        pending = [self.pending] if self.pending is not None else []
        return self.ids + (self.queued.ids if self.queued is not None else pending)

    # ------------------------------------------------------------------------ feeding (by a batch)
    def can_continue(self) -> bool:
        """Whether a round has something to feed: a queued turn, or a round cut by its token budget."""
        return self.queued is not None or (self.pending is not None and self.pending not in self.chat.stops)

    def next_segment(self) -> Segment:
        """What the next round feeds (nothing changes until `fed`)."""
        if self.queued is not None:
            return self.queued
        if not self.can_continue():
            raise VPTError("the conversation has nothing to feed: add a user turn first")
        return self.token_segment(self.pending)

    def token_segment(self, token: int) -> Segment:
        """One generated token; an action token's embedding is the hidden state of the token before it
        (the action start)."""
        branch = self.chat.actions.get(token)
        if branch is None:
            return Segment([token])
        return Segment([token], conditions={branch: self.hidden[None]})

    def positions(self, segment: Segment) -> tuple[torch.Tensor, int]:
        """(3, n) M-RoPE ids of `segment` on the CPU, continuing this conversation, and the next text position."""
        config = self.model.config
        merge = config.vision_config.spatial_merge_size
        grids = iter(self.grids(segment))
        parts, i, pos, ids = [], 0, self.next_pos, segment.ids
        while i < len(ids):
            j = i
            is_image = ids[i] == config.image_token_id
            while j < len(ids) and (ids[j] == config.image_token_id) == is_image:
                j += 1
            if is_image:
                grid = next(grids)
                parts.append(self.model.model.get_vision_position_ids(pos, grid, 1, merge, device="cpu"))
                pos += int(max(grid[1], grid[2])) // merge
            else:
                parts.append(torch.arange(pos, pos + j - i).expand(3, -1))
                pos += j - i
            i = j
        return torch.cat(parts, dim=1), pos

    def fed(self, segment: Segment, next_pos: int) -> None:
        """Record `segment` as fed (its token conditions kept for the features)."""
        if segment is self.queued:
            self.queued = None
        self.pending = None
        self.ids += segment.ids
        self.next_pos = next_pos
        for branch, condition in segment.conditions.items():
            self.conditions[branch] = condition[0]

    def grids(self, segment: Segment) -> list[torch.Tensor]:
        """The (3,) Qwen2-VL grids the segment's images will have (its token ids are built for them)."""
        return [self._grid(image) for image in segment.images]

    def _grid(self, image: torch.Tensor) -> torch.Tensor:
        """The (3,) Qwen2-VL grid `image` will have, from its size."""
        processor = self.model.image_processor
        size = qwen_size(image.shape[1], image.shape[2], processor, max_pixels=self.model.config.image_max_pixels)
        return qwen_grid(size, processor)

    def _queue(self, segment: Segment) -> None:
        if not self.ids:
            raise VPTError("start the conversation before adding turns")
        self.queued = segment

    def _close_turn(self) -> list[int]:
        """The pending token, then `<|im_end|>` if the turn did not end with it."""
        ids = [self.pending] if self.pending is not None else []
        return ids if self.pending == self.chat.im_end else ids + [self.chat.im_end]
