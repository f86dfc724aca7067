"""Decode steps over a static KV cache, compiled once per shape bucket (CUDA graphs on a GPU).

A `Batch` decodes on a dynamic cache that grows by one column per step: on a GPU each step is a few
hundred small kernel launches, and the GPU waits for Python. `StaticDecoder` keeps the batch's cache
in preallocated buffers of a bucketed shape (rows rounded up to a power of two, columns to a power
of two from 256), as transformers' `StaticCache` layers, and runs the language model's one-token
step on them through `torch.compile(mode="reduce-overhead")`, which replays the step as one CUDA
graph. New image sizes, rounds and batch sizes land in the same few buckets, so they do not
recompile; the compiled steps live as long as the process.

The batch's cache stays the authority: after a step its layers are views of the buffers, and when
rows join or leave (the batch then holds new tensors) the next step copies them in, as the joins and
leaves already copy. The extra rows and columns of a bucket are masked, so the tokens are those of
the dynamic path on the same device and dtype (up to the summation order of attention kernels).
On the CPU nothing is compiled: the same static steps run eagerly (the option is a no-op for speed).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers import StaticCache

MIN_COLUMNS = 256
_RECOMPILES = {"recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit": 64}
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _Bucket:
    cache: StaticCache
    valid: torch.Tensor
    """(rows, columns) bool: which columns hold each row's tokens."""


class StaticDecoder:
    """One-token decode steps of `model` over static buffers; get it with `static_decoder(model)`."""

    def __init__(self, model, *, compile: bool | None = None) -> None:
        param = next(model.parameters())
        self.model, self.device, self.dtype = model, param.device, param.dtype
        self.compiled = self.device.type == "cuda" if compile is None else compile
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._step = torch.compile(self._forward, mode="reduce-overhead", dynamic=False) if self.compiled else self._forward
        self._held: tuple[int, int, int] | None = None
        """(data pointer of layer 0's keys, rows, columns) the batch cache had after the last step."""

    def step(self, cache, valid: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor
             ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append one token per row: `cache` (the batch's layers, (rows, heads, n, dim) each) and
        `valid` (rows, n), `embeds` (rows, 1, hidden), M-RoPE `positions` (3, rows, 1). Returns the
        new layers and valid (views of the buffers, n + 1 columns), and each row's float32 logits and
        final hidden state."""
        rows, n = valid.shape
        bucket = self._bucket(rows, n + 1)
        size = bucket.valid.shape[0]
        if self._held != (cache.layers[0].keys.data_ptr(), rows, n) or bucket.valid.data_ptr() != valid.data_ptr():
            self._load(bucket, cache, valid)
        bucket.valid[:, n] = True
        padded = embeds.new_zeros(size, 1, embeds.shape[-1])
        padded[:rows] = embeds
        where = positions.new_zeros(3, size, 1)
        where[:, :rows] = positions
        with torch._dynamo.config.patch(**_RECOMPILES):  # one compile per bucket, not the default 8 at most
            logits, hidden = self._step(bucket.cache, bucket.valid, padded, where)
        layers = [(layer.keys[:rows, :, : n + 1], layer.values[:rows, :, : n + 1]) for layer in bucket.cache.layers]
        self._held = (bucket.cache.layers[0].keys.data_ptr(), rows, n + 1)
        return layers, bucket.valid[:rows, : n + 1], logits[:rows].clone(), hidden[:rows].clone()

    def _bucket(self, rows: int, columns: int) -> _Bucket:
        key = (1 << (rows - 1).bit_length(), max(MIN_COLUMNS, 1 << (columns - 1).bit_length()))
        if key not in self._buckets:
            size, length = key
            text = self.model.config.text_config
            cache = StaticCache(config=text, max_cache_len=length)
            heads = text.num_key_value_heads
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            for layer in cache.layers:
                layer.lazy_initialization(*[torch.empty(size, heads, 1, head_dim, device=self.device, dtype=self.dtype)] * 2)
            valid = torch.zeros(size, length, dtype=torch.bool, device=self.device)
            if self.compiled:
                torch._dynamo.mark_static_address(valid)
            self._buckets[key] = _Bucket(cache, valid)
        return self._buckets[key]

    def _load(self, bucket: _Bucket, cache, valid: torch.Tensor) -> None:
        """Copy the batch's layers and valid mask into the bucket (columns 0..n-1)."""
        rows, n = valid.shape
        for layer, source in zip(bucket.cache.layers, cache.layers):  # other columns are masked: left as they are
            layer.keys[:rows, :, :n] = source.keys
            layer.values[:rows, :, :n] = source.values
            layer.cumulative_length.fill_(n)
        bucket.valid.zero_()
        bucket.valid[:rows, :n] = valid

    def _forward(self, cache: StaticCache, valid: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row over the whole bucket: keys where `valid` is false are masked out."""
        mask = torch.zeros(valid.shape, dtype=self.dtype, device=valid.device)
        mask = mask.masked_fill(~valid, torch.finfo(self.dtype).min)[:, None, None, :]
        out = self.model.model.language_model(
            inputs_embeds=embeds, attention_mask={"full_attention": mask}, position_ids=positions,
            cache=cache, use_cache=True,
        )
        hidden = out.last_hidden_state[:, -1]
        return self.model.lm_head(hidden).float(), hidden


def static_decoder(model) -> StaticDecoder:
    """The static decoder of `model` where it is now (a new one if the model moved or changed dtype)."""
    param = next(model.parameters())
    decoder = _DECODERS.get(model)
    if decoder is None or (decoder.device, decoder.dtype) != (param.device, param.dtype):
        decoder = _DECODERS[model] = StaticDecoder(model)
    return decoder
