"""`VPTSession`: multi-round VPT conversations over one shared KV cache.

Round 1 prefills the prompt and decodes greedily until the end of the turn or a re-encoding
action. The next round appends only the new tokens (the crop(s) as a new user turn, or the
re-encoding turn with conditioned features) to the SAME cache, with Qwen2-VL M-RoPE positions
continued exactly as `get_rope_index` would number the whole conversation. The conditioning
vector of an action is the final hidden state at its action-start token, already produced
while decoding round 1: no extra forward pass.

Rows of a batch append segments of different lengths; each segment is left-padded and the
padding is masked out of every later attention (pads only ever see themselves).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache

from ..errors import ConfigError, InputMismatchError, VPTError
from ..perception.qwen_image import qwen_pixel_values
from ..tokens import BRANCHES, second_round_user_text
from .modeling import VPTForConditionalGeneration
from .tokenizer import encode_user_text

DEFAULT_SYSTEM = "You are a helpful assistant."
Stop = Literal["eos", "action", "length"]


@dataclass
class Turn:
    """What one row generated in one round."""

    token_ids: list[int]
    text: str
    stop: Stop


@dataclass
class _Row:
    ids: list[int] = field(default_factory=list)  # every token fed to the cache, in order
    next_pos: int = 0  # next M-RoPE text position
    pending: int | None = None  # last generated token, not yet fed
    logits: torch.Tensor | None = None  # next-token logits after the last fed token
    hidden: torch.Tensor | None = None  # final hidden state of the last fed token
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)  # branch -> h at action start
    finished: bool = False


@dataclass
class _Segment:
    """Tokens one row appends, with what replaces their embeddings."""

    ids: list[int]
    pixels: tuple[torch.Tensor, torch.Tensor] | None = None  # (pixel rows, grid_thw) of its images
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # branch -> projected pad rows
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)  # branch -> action embedding


class VPTSession:
    """Multi-round VPT conversation for a batch of rows over one shared KV cache."""

    def __init__(
        self,
        model: VPTForConditionalGeneration,
        tokenizer,
        *,
        system_prompt: str = DEFAULT_SYSTEM,
        suppress: Sequence[int] = (),
    ):
        """``suppress``: more token ids greedy decoding never picks (the graph's direct mode passes
        the action start tokens); placeholder tokens are always suppressed."""
        cfg = model.config
        if cfg.para_mask_id:
            raise ConfigError("para_mask_id is a training option; set it to 0 to run a session")
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt = system_prompt
        self.max_pixels = cfg.image_max_pixels
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.im_end = cfg.para_end_id
        self.pad_id = cfg.text_config.pad_token_id if cfg.text_config.pad_token_id is not None else 0
        self.stop_ids = {self.im_end, *_as_list(cfg.text_config.eos_token_id)}
        self.action_end_ids = {
            tokenizer.convert_tokens_to_ids(BRANCHES[b].action_end): b for b in cfg.branches
        }
        self.action_ids = {getattr(cfg, BRANCHES[b].action_field): b for b in cfg.branches}
        # placeholder tokens only ever come from the template; a model never generates them
        self.suppressed = sorted(
            {cfg.image_token_id, cfg.video_token_id, *(getattr(cfg, b.pad_field) for b in BRANCHES.values())}
        )
        self._suppressed = torch.tensor(sorted({*self.suppressed, *suppress}), device=self.device)
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)  # (B, cached length)
        self._queued: dict[int, _Segment] = {}  # turns added since the last forward

    # ---------------------------------------------------------------- prompts
    def _text(self, text: str) -> list[int]:
        """Trusted template text (special tokens allowed)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _vision(self, n_tokens: int, pad_id: int | None = None) -> list[int]:
        cfg = self.model.config
        pad = cfg.image_token_id if pad_id is None else pad_id
        return [cfg.vision_start_token_id, *[pad] * n_tokens, cfg.vision_end_token_id]

    def _close_turn(self, row: _Row) -> list[int]:
        """The pending token, then `<|im_end|>` if the turn did not end with it, then a new user turn."""
        ids = [row.pending] if row.pending is not None else []
        if row.pending != self.im_end:
            ids.append(self.im_end)
        return ids + self._text("\n<|im_start|>user\n")

    def _assistant(self) -> list[int]:
        return self._text("<|im_end|>\n<|im_start|>assistant\n")

    # ------------------------------------------------------------------ rounds
    @torch.no_grad()
    def start(self, images: Sequence[torch.Tensor], questions: Sequence[str]) -> None:
        """Prefill round 1 for a batch: one full-resolution uint8 (3,H,W) image and one question per row."""
        if len(images) != len(questions) or not images:
            raise InputMismatchError(f"{len(images)} images for {len(questions)} questions")
        self.rows = [_Row() for _ in images]
        self.cache = DynamicCache()
        self.valid = torch.zeros(len(images), 0, dtype=torch.bool, device=self.device)
        head = self._text(f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n<|im_start|>user\n")
        segments = {}
        for i, (image, question) in enumerate(zip(images, questions)):
            pixels = qwen_pixel_values([image], max_pixels=self.max_pixels)
            ids = head + self._vision(_n_tokens(pixels[1][0])) + self._text("\n")
            ids += encode_user_text(self.tokenizer, question) + self._assistant()
            segments[i] = _Segment(ids, pixels=pixels)
        self._append(segments)

    def add_regions(self, row: int, crops: Sequence[torch.Tensor]) -> None:
        """Show uint8 (3,h,w) crops as the next user turn (reference format) and open the answer turn."""
        state = self._row(row)
        pixels = qwen_pixel_values(list(crops), max_pixels=self.max_pixels)
        ids = self._close_turn(state)
        for i, part in enumerate(second_round_user_text(len(crops)).split("<image>")):
            ids += self._text(part) if part else []
            if i < len(crops):
                ids += self._vision(_n_tokens(pixels[1][i]))
        self._queued[row] = _Segment(ids + self._assistant(), pixels=pixels)

    def add_reencode(self, row: int, branch: str, features: torch.Tensor) -> None:
        """Inject raw encoder features (dino (256,d), sam (C,64,64), clip (n,hidden)), projected
        and conditioned on the hidden state of this row's action-start token."""
        state = self._row(row)
        if branch not in state.conditions:
            raise InputMismatchError(f"row {row} generated no {branch} action to condition the features on")
        cond = state.conditions[branch]
        projected = self.model.project_branch(branch, [features.to(self.device, self.dtype)], cond[None])
        pad = getattr(self.model.config, BRANCHES[branch].pad_field)
        ids = self._close_turn(state) + self._vision(projected.shape[0], pad) + self._assistant()
        self._queued[row] = _Segment(ids, features={branch: projected})

    def add_text(self, row: int, text: str) -> None:
        """A plain user turn (user text: no special tokens) and a new assistant turn, e.g. to ask
        again for a direct answer after a perception request that could not be served."""
        state = self._row(row)
        ids = self._close_turn(state) + encode_user_text(self.tokenizer, text) + self._assistant()
        self._queued[row] = _Segment(ids)

    def finish(self, row: int) -> None:
        """No more rounds for this row."""
        self._row(row).finished = True
        self._queued.pop(row, None)

    def conversation(self, row: int) -> list[int]:
        """Every token of this row so far: fed, pending and queued for the next round."""
        state = self.rows[row]
        if row in self._queued:
            return state.ids + self._queued[row].ids
        return state.ids + ([state.pending] if state.pending is not None else [])

    @torch.no_grad()
    def generate(
        self,
        max_new_tokens: int = 64,
        *,
        forced: Mapping[int, Sequence[int]] | None = None,
        on_text: Callable[[int, str], None] | None = None,
    ) -> dict[int, Turn]:
        """Decode greedily for every row that is not finished, after feeding queued turns (and the
        last token of rows that stopped at `max_new_tokens`, which continue their turn).

        `forced[row]` token ids are emitted first (teacher forcing), then greedy decoding goes on.
        Stops per row at `<|im_end|>`/eos ("eos"), at a re-encoding action end ("action"), or
        after `max_new_tokens` ("length").
        """
        feed = dict(self._queued)
        for i, row in enumerate(self.rows):  # rows cut off by max_new_tokens continue their turn
            ended = row.pending in self.stop_ids or row.pending in self.action_end_ids
            if not row.finished and i not in feed and row.pending is not None and not ended:
                feed[i] = self._decode_segment(row, row.pending)
        if feed:
            self._append(feed)
        forced = forced or {}
        for row, tokens in forced.items():
            if set(tokens) & set(self.suppressed):
                raise InputMismatchError(f"forced tokens for row {row} contain placeholder tokens")
        active = [i for i, r in enumerate(self.rows) if not r.finished and r.pending is None]
        out = {i: [] for i in active}
        stops: dict[int, Stop] = {}
        for step in range(max_new_tokens):
            feed: dict[int, _Segment] = {}
            for i in list(active):
                row = self.rows[i]
                token = forced[i][step] if step < len(forced.get(i, ())) else self._greedy(row.logits)
                out[i].append(token)
                if on_text is not None:
                    on_text(i, self.tokenizer.decode([token], skip_special_tokens=False))
                if token in self.stop_ids or token in self.action_end_ids:
                    stops[i] = "eos" if token in self.stop_ids else "action"
                    row.pending = token
                    active.remove(i)
                elif step == max_new_tokens - 1:
                    row.pending = token
                else:
                    feed[i] = self._decode_segment(row, token)
            if not feed:
                break
            self._append(feed)
        return {
            i: Turn(ids, self.tokenizer.decode(ids, skip_special_tokens=False), stops.get(i, "length"))
            for i, ids in out.items()
        }

    # --------------------------------------------------------------- internals
    def _greedy(self, logits: torch.Tensor) -> int:
        return int(logits.index_fill(0, self._suppressed, float("-inf")).argmax())

    def _decode_segment(self, row: _Row, token: int) -> _Segment:
        """One decoded token; an action token's embedding is the hidden state of the token before
        it (the action start), which also conditions that branch's features later."""
        branch = self.action_ids.get(token)
        if branch is None:
            return _Segment([token])
        row.conditions[branch] = row.hidden
        return _Segment([token], conditions={branch: row.hidden[None]})

    def _row(self, row: int) -> _Row:
        if not 0 <= row < len(self.rows):
            raise VPTError(f"no row {row} in this session ({len(self.rows)} rows)")
        state = self.rows[row]
        if state.finished:
            raise VPTError(f"row {row} is finished")
        return state

    def _positions(self, row: _Row, seg: _Segment, grids: list[torch.Tensor]) -> torch.Tensor:
        """(3, n) M-RoPE ids of a segment, continuing the row's numbering like `get_rope_index`."""
        merge = self.model.config.vision_config.spatial_merge_size
        image_token = self.model.config.image_token_id
        parts, i, grid_iter = [], 0, iter(grids)
        ids = seg.ids
        while i < len(ids):
            j = i
            is_image = ids[i] == image_token
            while j < len(ids) and (ids[j] == image_token) == is_image:
                j += 1
            if is_image:
                grid = next(grid_iter)
                parts.append(self.model.model.get_vision_position_ids(row.next_pos, grid, 1, merge, device=self.device))
                row.next_pos += int(max(grid[1], grid[2])) // merge
            else:
                parts.append(torch.arange(row.next_pos, row.next_pos + j - i, device=self.device).expand(3, -1))
                row.next_pos += j - i
            i = j
        return torch.cat(parts, dim=1)

    def _append(self, segments: dict[int, _Segment]) -> None:
        """Feed one segment per listed row (others get padding) through one cached forward."""
        segments = dict(segments)
        self._queued.clear()
        batch, width = len(self.rows), max(len(s.ids) for s in segments.values())
        past = self.valid.shape[1]
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long, device=self.device)
        pos = torch.zeros(3, batch, width, dtype=torch.long, device=self.device)
        new_valid = torch.zeros(batch, width, dtype=torch.bool, device=self.device)
        images, features, conditions = [], {}, {}
        for i in sorted(segments):  # row-major order matches masked_scatter
            seg, row = segments[i], self.rows[i]
            pixel_grids = []
            if seg.pixels is not None:
                images.append(seg.pixels)
                pixel_grids = list(seg.pixels[1])
            n = len(seg.ids)
            ids[i, width - n :] = torch.tensor(seg.ids, device=self.device)
            pos[:, i, width - n :] = self._positions(row, seg, pixel_grids)
            new_valid[i, width - n :] = True
            for target, src in ((features, seg.features), (conditions, seg.conditions)):
                for branch, value in src.items():
                    target.setdefault(branch, []).append(value)
            row.ids += seg.ids
            row.pending = None
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        pixel_values = torch.cat([p for p, _ in images]).to(self.device) if images else None
        grid_thw = torch.cat([g for _, g in images]).to(self.device) if images else None
        out = self.model(
            input_ids=ids,
            attention_mask={"full_attention": self._mask(past, width)},
            position_ids=pos,
            cache=self.cache,
            use_cache=True,
            pixel_values=pixel_values,
            image_grid_thw=grid_thw,
            injected_features={b: torch.cat(v) for b, v in features.items()},
            action_conditions={b: torch.cat(v) for b, v in conditions.items()},
            logits_to_keep=1,
        )
        hidden = out.last_hidden_state[:, -1]
        for i in segments:
            self.rows[i].logits = out.logits[i, -1].float()
            self.rows[i].hidden = hidden[i]

    def _mask(self, past: int, width: int) -> torch.Tensor:
        """Additive (B,1,width,past+width) mask: causal, valid keys only, and each pad sees itself."""
        total = past + width
        keys = torch.arange(total, device=self.device)
        queries = torch.arange(past, total, device=self.device)
        allowed = (keys[None, :] <= queries[:, None])[None] & self.valid[:, None, :]
        allowed |= (keys[None, :] == queries[:, None])[None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None]


def _n_tokens(grid_thw: torch.Tensor) -> int:
    """LLM tokens of one image: t*h*w patches merged 2x2."""
    return int(grid_thw.prod()) // 4


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
