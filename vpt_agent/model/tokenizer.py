"""Tokenizers: the character-level tokenizer of the tiny test models, the byte-level BPE of the
bundled demo model, VPT token registration, safe encoding of user text and decoding of generated ids."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..errors import ConfigError
from ..tokens import ALL_SPECIAL_TOKENS, CONFIG_TOKEN_FIELDS, ENDOFTEXT, IM_END

CHAR_ALPHABET = "\n" + "".join(chr(code) for code in range(0x20, 0x7F))
"""The characters of the char tokenizer, ids 0…95: newline, then printable ASCII."""
UNK_TOKEN = "<unk>"
"""Any other character (id 96); the special tokens follow in ALL_SPECIAL_TOKENS order (97…133)."""


def build_char_tokenizer(special: Sequence[str] = ALL_SPECIAL_TOKENS) -> PreTrainedTokenizerFast:
    """A deterministic character-level tokenizer with the ``special`` tokens (default every VPT / chat
    one: 134 ids; ``CHAT_TOKENS`` alone: a plain Qwen2-VL's, 104 ids).

    Pad is ``<|endoftext|>``, eos ``<|im_end|>``; decoding joins characters without spaces.
    """
    vocab = {char: i for i, char in enumerate(CHAR_ALPHABET)}
    for token in (UNK_TOKEN, *special):
        vocab[token] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (UNK_TOKEN, *special)])
    return _wrap(backend, special, unk_token=UNK_TOKEN)


def build_bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes; GPT-2 style) trained on ``corpus``, then every VPT / chat
    special token. The demo model's prompts and questions become a few tokens each."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ALL_SPECIAL_TOKENS])
    return _wrap(backend, ALL_SPECIAL_TOKENS)


def _wrap(backend: Tokenizer, special: Sequence[str], **tokens: str) -> PreTrainedTokenizerFast:
    """Pad ``<|endoftext|>``, eos ``<|im_end|>``, the other ``special`` tokens as extras."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=ENDOFTEXT,
        eos_token=IM_END,
        extra_special_tokens=[t for t in special if t not in (ENDOFTEXT, IM_END)],
        clean_up_tokenization_spaces=False,
        **tokens,
    )


def add_vpt_tokens(tokenizer: PreTrainedTokenizerFast) -> int:
    """Register every token of ALL_SPECIAL_TOKENS as a special token; return how many new ids were added.

    Tokens already present keep their ids (a released VPT tokenizer gains nothing); tokens present
    as plain added tokens, or special only in the backend, are marked special in both places.
    """
    special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    special &= set(tokenizer.all_special_tokens)
    needed = [t for t in ALL_SPECIAL_TOKENS if t not in special]
    if not needed:
        return 0
    before = len(tokenizer)
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in needed]},
        replace_extra_special_tokens=False,
    )
    return len(tokenizer) - before


def encode_user_text(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of user-supplied text in which no added token (special or not) is recognised.

    Runs the backend's normalizer, pre-tokenizer and model directly, skipping its added-token
    matching, so ``"<|im_end|>"`` typed by a user becomes ordinary text. Unlike
    ``split_special_tokens=True`` this also covers tokens registered as non-special and leaves the
    shared tokenizer state untouched (safe across threads). No bos/eos is added.
    """
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
    return [token.id for piece in pieces for token in backend.model.tokenize(piece)]


def decode_generated(tokenizer: PreTrainedTokenizerFast, ids: Sequence[int]) -> str:
    """Generated ids → text with the special tokens kept (what ``parse_actions`` reads)."""
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """VPT config field → id in this tokenizer (token fields of CONFIG_TOKEN_FIELDS, eos and pad)."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in CONFIG_TOKEN_FIELDS.values() if token not in vocab]
    if missing:
        raise ConfigError(f"the tokenizer lacks {missing}; call add_vpt_tokens first")
    ids = {field: vocab[token] for field, token in CONFIG_TOKEN_FIELDS.items()}
    for field in ("eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, field)
        if value is None:
            raise ConfigError(f"the tokenizer has no {field.removesuffix('_id')}")
        ids[field] = value
    return ids
