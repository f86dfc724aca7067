"""`VPTSession`: multi-round VPT conversations for a batch of rows, run together in this thread.

Each row is a `Conversation`: round 1 prefills the prompt and decodes greedily until the end of the
turn or a re-encoding action; the next round appends only the new tokens (the crop(s) as a new user
turn, or the re-encoding turn with conditioned features) to the row's KV cache, with M-RoPE
positions continued exactly as `get_rope_index` would number the whole conversation. `generate`
runs the rounds of all rows with something to feed in one `Batch`: rows that stop leave it, the
others decode on. The graph uses `vpt_agent.model.engine` instead, which batches rounds of
concurrent runs as they come.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..errors import ConfigError, InputMismatchError, VPTError
from ..prompts import DEFAULT_SYSTEM
from .batch import Batch, Round
from .conversation import ChatIds, Conversation, Turn
from .modeling import VPTMixin
from .static_decode import static_decoder


class VPTSession:
    """Multi-round VPT conversations of a batch of rows over their own KV caches."""

    def __init__(
        self,
        model: VPTMixin,
        tokenizer,
        *,
        system_prompt: str = DEFAULT_SYSTEM,
        suppress: Sequence[int] = (),
        compile: bool = False,
    ):
        """``suppress``: more token ids greedy decoding never picks (the graph's direct mode passes
        the action start tokens); placeholder tokens are always suppressed. ``compile``: decode over a
        static cache with compiled steps (`vpt_agent.model.static_decode`)."""
        if model.config.para_mask_id:
            raise ConfigError("para_mask_id is a training option; set it to 0 to run a session")
        self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
        self.chat = ChatIds.of(model.config, tokenizer)
        self.suppress = tuple(suppress)
        self.compile = compile
        self.rows: list[Conversation] = []
        self._finished: set[int] = set()

    @property
    def suppressed(self) -> tuple[int, ...]:
        """Placeholder ids: greedy decoding never picks them."""
        return self.chat.placeholders

    @property
    def stop_ids(self) -> set[int]:
        return {token for token, stop in self.chat.stops.items() if stop == "eos"}

    @property
    def action_end_ids(self) -> set[int]:
        return {token for token, stop in self.chat.stops.items() if stop == "action"}

    def start(self, images: Sequence[torch.Tensor], questions: Sequence[str]) -> None:
        """Queue round 1 for a batch: one full-resolution uint8 (3,H,W) image and one question per row."""
        if len(images) != len(questions) or not images:
            raise InputMismatchError(f"{len(images)} images for {len(questions)} questions")
        self.rows = [Conversation(self.model, self.tokenizer, system_prompt=self.system_prompt, chat=self.chat)
                     for _ in images]
        self._finished = set()
        for conversation, image, question in zip(self.rows, images, questions):
            conversation.start(image, question)

    def add_regions(self, row: int, crops: Sequence[torch.Tensor]) -> None:
        """Show uint8 (3,h,w) crops as the next user turn (reference format) and open the answer turn."""
        self._row(row).add_regions(crops)

    def add_reencode(self, row: int, branch: str, features: torch.Tensor) -> None:
        """Inject raw encoder features (dino (256,d), sam (C,64,64), clip (n,hidden)), projected
        and conditioned on the hidden state of this row's action-start token."""
        self._row(row).add_reencode(branch, features)

    def add_text(self, row: int, text: str) -> None:
        """A plain user turn (no special tokens) and a new assistant turn."""
        self._row(row).add_text(text)

    def finish(self, row: int) -> None:
        """No more rounds for this row."""
        self._row(row).queued = None
        self._finished.add(row)

    def conversation(self, row: int) -> list[int]:
        """Every token of this row so far: fed, pending and queued for the next round."""
        return self.rows[row].tokens()

    def generate(
        self,
        max_new_tokens: int = 64,
        *,
        forced: Mapping[int, Sequence[int]] | None = None,
        on_text: Callable[[int, str], None] | None = None,
    ) -> dict[int, Turn]:
        """One round for every row with something to feed (a queued turn, or a round cut by
        `max_new_tokens`, which continues its turn); `forced[row]` token ids are emitted first."""
        forced = forced or {}
        rounds = {}
        for i, conversation in enumerate(self.rows):
            if i not in self._finished and conversation.can_continue():
                rounds[i] = Round(conversation, max_new_tokens, forced=forced.get(i, ()), suppress=self.suppress,
                                  on_token=_texts(on_text, i, self.tokenizer))
        batch = Batch(self.model, static_decoder(self.model) if self.compile else None)
        with torch.no_grad():
            ended = batch.join(list(rounds.values()))
            while batch.rounds:
                ended += batch.step()
        for round_ in ended:
            if round_.error is not None:
                raise round_.error
        return {i: round_.turn() for i, round_ in rounds.items()}

    def _row(self, row: int) -> Conversation:
        if not 0 <= row < len(self.rows):
            raise VPTError(f"no row {row} in this session ({len(self.rows)} rows)")
        if row in self._finished:
            raise VPTError(f"row {row} is finished")
        return self.rows[row]


def _texts(on_text: Callable[[int, str], None] | None, row: int, tokenizer) -> Callable[[int], None] | None:
    if on_text is None:
        return None
    return lambda token: on_text(row, tokenizer.decode([token], skip_special_tokens=False))
