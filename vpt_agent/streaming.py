"""The graph's custom stream (``stream_mode="custom"``): typed, JSON-ready events.

- ``{"type": "text", "round": k, "text": delta}``: text of round k (0 = the first round of the run) as
  the model generates it, special tokens left out. When the run answers, the deltas of its last round
  join to its ``answer``.
- ``{"type": "perception", "round": k, "action": {...}, "accepted": bool, "error": str | None}``: one
  per perception request, after its round: the parsed request (as in ``actions``); not accepted when
  the run refused it (``error`` says why; the question is then asked again).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

Writer = Callable[[dict[str, Any]], None]


class TextDeltas:
    """`on_tokens` for one round: writes the new text of the round's tokens as ``text`` events.

    The whole round is decoded again at each call (rounds are short), so a character split across
    tokens comes out whole; the text is stripped like the answer, and a trailing partial character
    waits for the tokens that complete it."""

    def __init__(self, tokenizer: Any, round_index: int, write: Writer) -> None:
        self.tokenizer, self.round, self.write = tokenizer, round_index, write
        self.tokens: list[int] = []
        self.sent = ""

    def __call__(self, tokens: list[int]) -> None:
        self.tokens += tokens
        self._send(self.text().rstrip("\ufffd"))

    def finish(self) -> None:
        """Write what is left of the round's final text."""
        self._send(self.text())

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.write({"type": "text", "round": self.round, "text": text[len(self.sent):]})
            self.sent = text


def perception_event(round_index: int, action: dict[str, Any], error: str | None) -> dict[str, Any]:
    """The event of a perception request the model made in round `round_index`."""
    return {"type": "perception", "round": round_index, "action": action, "accepted": error is None, "error": error}
