"""`Batch`: rounds of several conversations decoding together over one padded KV cache.

KV cache layout: one `DynamicCache` for the whole batch, (rows, kv heads, positions, head dim) per
layer and left-padded. Row i's tokens sit in the columns where ``valid[i]`` is true; every query
attends to its row's valid columns up to itself, and a padding query only to itself, so rows never
see each other. Rows join and leave between decode steps:

* join: each newcomer's own cache (a `Conversation` keeps its fed positions between rounds) is
  left-padded to a common length and stacked; their next segments (the new user turns,
  left-padded to a common width) run through one prefill forward; the result is concatenated to
  the batch along the rows, the shorter side left-padded.
* step: every row chooses a token (one batched argmax, one device sync); rows that stop leave, the
  others feed their token in one forward that appends one valid column for every row.
* leave: a row that stops (end of turn, action end, token budget) hands its conversation a dense
  copy of its valid columns; the remaining rows are selected and the leading columns none of them
  uses are cut off, so finished rows never pad the batch.

Why this layout: per-run caches stacked at every step would copy every row's whole cache at every
decode step, and a paged cache needs attention kernels that read a block table, which transformers'
Qwen2-VL attention does not have. Here copies happen when rows join or leave (twice per round of a
conversation) and decode steps append to the batch cache as `generate` does. Positions never need
rewriting: keys are stored rotated at their own row's M-RoPE positions.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..errors import InputMismatchError, VPTError
from ..perception.qwen_image import qwen_pixel_values
from .conversation import KV, Conversation, Stop, Turn
from .static_decode import StaticDecoder


@dataclass(eq=False)
class Round:
    """One round of one conversation: feed its next segment, then decode greedily.

    Stops at `<|im_end|>`/eos ("eos"), at a re-encoding action end ("action") or after
    `max_new_tokens` ("length"); the stop token stays `pending` in the conversation. `forced` tokens
    are emitted first (teacher forcing); `suppress` ids are never chosen greedily (placeholder
    tokens never are)."""

    conversation: Conversation
    max_new_tokens: int
    forced: Sequence[int] = ()
    suppress: Iterable[int] = ()
    on_token: Callable[[int], None] | None = None
    """Called with every token as it is chosen (in the thread that runs the batch)."""
    tokens: list[int] = field(default_factory=list)
    stop: Stop | None = None
    error: BaseException | None = None
    """Why the round failed (its conversation is then unusable)."""
    cancelled: bool = False
    """Set by the caller: the batch drops the row at its next step."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputMismatchError(f"a round generates at least one token, got max_new_tokens={self.max_new_tokens}")
        placeholders = set(self.conversation.chat.placeholders)
        if set(self.forced) & placeholders:
            raise InputMismatchError("forced tokens contain placeholder tokens")
        self.forced = list(self.forced)
        self.suppress = tuple(sorted({*placeholders, *self.suppress}))

    def turn(self) -> Turn:
        """What the round generated; raises its error if it failed."""
        if self.error is not None:
            raise self.error
        if self.stop is None:
            raise VPTError("the round has not ended")
        text = self.conversation.tokenizer.decode(self.tokens, skip_special_tokens=False)
        return Turn(list(self.tokens), text, self.stop)


class Batch:
    """Rows (one `Round` each) decoding together over one padded KV cache; see the module docstring."""

    def __init__(self, model, decoder: StaticDecoder | None = None) -> None:
        """`decoder`: decode steps over its static cache (`static_decode`) instead of the dynamic one."""
        self.model, self.decoder = model, decoder
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.rounds: list[Round] = []
        self.cache = DynamicCache()
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        """(rows, positions): which cache columns hold a row's tokens."""
        self.logits: torch.Tensor | None = None
        """(rows, vocab) float32 next-token logits."""
        self.hidden: torch.Tensor | None = None
        """(rows, hidden) final hidden state of each row's last token."""

    def __len__(self) -> int:
        return len(self.rounds)

    # -------------------------------------------------------------------------------- membership
    def join(self, rounds: Sequence[Round]) -> list[Round]:
        """Prefill each round's next segment (one forward for all) and add the rows. Returns the rounds
        that failed, each with its `error`: a failed joint prefill is retried round by round, so a
        bad round fails alone."""
        if not rounds:
            return []
        try:
            newcomers = Batch(self.model)
            newcomers._prefill(list(rounds))
        except Exception as exc:
            if len(rounds) == 1:
                rounds[0].error = exc
                return list(rounds)
            return [failed for one in rounds for failed in self.join([one])]
        self._merge(newcomers)
        return []

    def drop(self, rounds: Iterable[Round]) -> None:
        """Remove rows without keeping their caches (cancelled rounds)."""
        gone = set(map(id, rounds))
        self._leave([i for i, r in enumerate(self.rounds) if id(r) in gone], keep_cache=False)

    # ------------------------------------------------------------------------------------ decode
    def step(self) -> list[Round]:
        """One token for every row: the rows that stop leave (their conversations keep their caches),
        the others feed their token in one forward. Returns the rounds that ended (stopped or failed)."""
        if not self.rounds:
            return []
        ended, feeding = [], []
        for i, (round_, token) in enumerate(zip(self.rounds, self._choose())):
            round_.tokens.append(token)
            if round_.on_token is not None:
                round_.on_token(token)
            stop = round_.conversation.chat.stops.get(token)
            if stop is None and len(round_.tokens) == round_.max_new_tokens:
                stop = "length"
            if stop is None:
                feeding.append(token)
            else:
                round_.stop, round_.conversation.pending = stop, token
                ended.append(i)
        done = [self.rounds[i] for i in ended]
        self._leave(ended)
        if not feeding:
            return done
        kept = [(layer.keys, layer.values) for layer in self.cache.layers]
        try:
            self._decode(feeding)
        except Exception:  # find the row(s) at fault: park every row, then rejoin one forward, then one by one
            self._set_layers(kept)
            rows = list(self.rounds)
            for round_, token in zip(rows, feeding):
                round_.conversation.pending = token
            self._leave(range(len(rows)))
            done += self.join(rows)
        return done

    def _choose(self) -> list[int]:
        """Each row's next token: forced, else greedy over the logits without its suppressed ids."""
        scores = self.logits.clone()
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, round_ in enumerate(self.rounds):
            groups.setdefault(round_.suppress, []).append(i)
        for ids, rows in groups.items():
            rows_t = torch.tensor(rows, device=self.device)[:, None]
            scores[rows_t, torch.tensor(ids, device=self.device)[None]] = float("-inf")
        greedy = scores.argmax(-1).tolist()
        return [r.forced[len(r.tokens)] if len(r.tokens) < len(r.forced) else greedy[i]
                for i, r in enumerate(self.rounds)]

    def _decode(self, tokens: list[int]) -> None:
        """Feed one token per row (all rows); an action token's embedding is its row's hidden state."""
        convs = [r.conversation for r in self.rounds]
        conditions: dict[str, list[torch.Tensor]] = {}
        for i, (conv, token) in enumerate(zip(convs, tokens)):
            if (branch := conv.chat.actions.get(token)) is not None:
                conditions.setdefault(branch, []).append(self.hidden[i])
        rows = len(tokens)
        ids = torch.tensor(tokens, device=self.device)[:, None]
        positions = torch.tensor([c.next_pos for c in convs], device=self.device).view(1, rows, 1).expand(3, -1, -1)
        hidden = self.hidden
        conditions = {b: torch.stack(v) for b, v in conditions.items()}
        if self.decoder is not None:
            layers, self.valid, self.logits, self.hidden = self.decoder.step(
                self.cache, self.valid, self.model.token_embeds(ids, conditions), positions)
            self._set_layers(layers)
        else:
            self._forward(ids, positions, torch.ones(rows, 1, dtype=torch.bool, device=self.device),
                          conditions=conditions)
        for i, (conv, token) in enumerate(zip(convs, tokens)):
            conv.ids.append(token)
            conv.next_pos += 1
            if (branch := conv.chat.actions.get(token)) is not None:
                conv.conditions[branch] = hidden[i].clone()

    # ------------------------------------------------------------------------------- internals
    def _prefill(self, rounds: list[Round]) -> None:
        """On an empty batch: stack the conversations' caches and feed their next segments."""
        convs = [r.conversation for r in rounds]
        if any(c.ids and c.cache is None for c in convs):
            raise VPTError("a conversation in another batch, or a failed one, cannot join")
        segments = [c.next_segment() for c in convs]
        placed = [c.positions(s) for c, s in zip(convs, segments)]
        past = max(len(c.ids) for c in convs)
        if past:
            like = next(c.cache for c in convs if c.cache is not None)
            layers = []
            for layer, (k_like, v_like) in enumerate(like):
                keys = [self._placed(c.cache[layer][0] if c.cache else k_like[:, :, :0], past) for c in convs]
                values = [self._placed(c.cache[layer][1] if c.cache else v_like[:, :, :0], past) for c in convs]
                layers.append((torch.cat(keys), torch.cat(values)))
            self._set_layers(layers)
        self.valid = torch.stack([_left_pad_mask(len(c.ids), past) for c in convs]).to(self.device)

        rows, width = len(convs), max(len(s.ids) for s in segments)
        ids = torch.full((rows, width), convs[0].chat.pad, dtype=torch.long)
        positions = torch.zeros(3, rows, width, dtype=torch.long)
        for i, (segment, (pos, _)) in enumerate(zip(segments, placed)):
            n = len(segment.ids)
            ids[i, width - n :] = torch.tensor(segment.ids)
            positions[:, i, width - n :] = pos
        # images, features and conditions in row order, as the model scatters them
        images = [image for segment in segments for image in segment.images]
        if images:
            pixel_values, grid = qwen_pixel_values(images, self.model.image_processor,
                                                 max_pixels=self.model.config.image_max_pixels)
            if not torch.equal(grid, torch.stack([g for c, s in zip(convs, segments) for g in c.grids(s)])):
                raise VPTError("an image was encoded at another size than its conversation planned")
        features: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        conditions: dict[str, list[torch.Tensor]] = {}
        for conv, segment in zip(convs, segments):
            for branch, raw in segment.features.items():
                raws, conds = features.setdefault(branch, ([], []))
                raws.append(raw.to(self.device, self.dtype))
                conds.append(conv.conditions[branch].to(self.device, self.dtype))
            for branch, value in segment.conditions.items():
                conditions.setdefault(branch, []).append(value.to(self.device, self.dtype))
        self._forward(
            ids.to(self.device), positions.to(self.device),
            torch.stack([_left_pad_mask(len(s.ids), width) for s in segments]).to(self.device),
            pixel_values=pixel_values.to(self.device) if images else None,
            image_grid_thw=grid.to(self.device) if images else None,
            features={b: self.model.project_branch(b, raws, torch.stack(conds))
                      for b, (raws, conds) in features.items()},
            conditions={b: torch.cat(v) for b, v in conditions.items()},
        )
        for conv, segment, (_, next_pos) in zip(convs, segments, placed):
            conv.fed(segment, next_pos)
            conv.cache = None  # the batch holds it now
        self.rounds = rounds

    def _forward(self, ids, positions, new_valid, *, pixel_values=None, image_grid_thw=None,
                 features=None, conditions=None) -> None:
        valid = torch.cat([self.valid, new_valid], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask={"full_attention": _mask(valid, ids.shape[1], self.dtype)},
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            injected_features=features,
            action_conditions=conditions,
            logits_to_keep=1,
        )
        self.valid = valid
        self.logits = out.logits[:, -1].float()
        self.hidden = out.last_hidden_state[:, -1]

    def _leave(self, indices: Iterable[int], keep_cache: bool = True) -> None:
        """Remove rows; with `keep_cache` each conversation gets a dense copy of its row's cache."""
        leaving = sorted(set(indices))
        if not leaving:
            return
        layers = [(layer.keys, layer.values) for layer in self.cache.layers]
        for i in leaving:
            conv = self.rounds[i].conversation
            if keep_cache:
                columns = self.valid[i].nonzero().squeeze(1)
                conv.cache = [(k[i : i + 1].index_select(2, columns), v[i : i + 1].index_select(2, columns))
                              for k, v in layers]
                conv.logits, conv.hidden = self.logits[i].clone(), self.hidden[i].clone()
        keep = [i for i in range(len(self.rounds)) if i not in set(leaving)]
        self.rounds = [self.rounds[i] for i in keep]
        if not keep:
            self.cache = DynamicCache()
            self.valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
            self.logits = self.hidden = None
            return
        rows = torch.tensor(keep, device=self.device)
        valid = self.valid.index_select(0, rows)
        first = int(valid.any(0).to(torch.uint8).argmax())  # columns before it hold no remaining row's token
        self._set_layers([(k.index_select(0, rows)[:, :, first:], v.index_select(0, rows)[:, :, first:])
                          for k, v in layers])
        self.valid = valid[:, first:]
        self.logits, self.hidden = self.logits.index_select(0, rows), self.hidden.index_select(0, rows)

    def _merge(self, other: Batch) -> None:
        """Append `other`'s rows, the shorter cache left-padded."""
        if not self.rounds:
            self.cache, self.valid, self.logits, self.hidden = other.cache, other.valid, other.logits, other.hidden
            self.rounds = other.rounds
            return
        length = max(self.valid.shape[1], other.valid.shape[1])
        self._set_layers([
            (torch.cat([_left_pad(ka, length), _left_pad(kb, length)]),
             torch.cat([_left_pad(va, length), _left_pad(vb, length)]))
            for (ka, va), (kb, vb) in zip(
                [(layer.keys, layer.values) for layer in self.cache.layers],
                [(layer.keys, layer.values) for layer in other.cache.layers],
            )
        ])
        self.valid = torch.cat([_left_pad_valid(self.valid, length), _left_pad_valid(other.valid, length)])
        self.logits = torch.cat([self.logits, other.logits])
        self.hidden = torch.cat([self.hidden, other.hidden])
        self.rounds = self.rounds + other.rounds

    def _placed(self, kv: torch.Tensor, length: int) -> torch.Tensor:
        """A parked cache left-padded to `length`, on the model's device and dtype (which may have
        changed since it was parked)."""
        return _left_pad(kv.to(self.device, self.dtype), length)

    def _set_layers(self, layers: KV) -> None:
        """Make `layers` the batch cache (the tensors themselves, not copies)."""
        cache = DynamicCache(ddp_cache_data=[(k[:, :, :0], v[:, :, :0]) for k, v in layers])
        for layer, (keys, values) in zip(cache.layers, layers):
            layer.keys, layer.values = keys, values
        self.cache = cache


def _left_pad(kv: torch.Tensor, length: int) -> torch.Tensor:
    """(rows, heads, n, dim) -> (rows, heads, length, dim) with zeros in front."""
    return torch.nn.functional.pad(kv, (0, 0, length - kv.shape[2], 0))


def _left_pad_mask(n: int, length: int) -> torch.Tensor:
    """(length,) bool: the last n true."""
    return torch.arange(length) >= length - n


def _left_pad_valid(valid: torch.Tensor, length: int) -> torch.Tensor:
    pad = torch.zeros(valid.shape[0], length - valid.shape[1], dtype=torch.bool, device=valid.device)
    return torch.cat([pad, valid], dim=1)


def _mask(valid: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (rows, 1, width, total) mask for the last `width` columns of `valid` (rows, total):
    causal, valid keys only, and each padding query sees itself."""
    total = valid.shape[1]
    keys = torch.arange(total, device=valid.device)
    queries = torch.arange(total - width, total, device=valid.device)
    allowed = (keys[None, :] <= queries[:, None])[None] & valid[:, None, :]
    allowed |= (keys[None, :] == queries[:, None])[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
