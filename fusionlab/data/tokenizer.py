"""Tokenizers: a byte-level default that needs no files, and Hugging Face `tokenizers` JSON files.

Both guarantee that `encode` never returns a special id, whatever the user text contains: a caption
that spells out "<|image|>" stays text and can never open an image slot.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

# Names under which HFTokenizer looks up the special tokens in the tokenizer file.
SPECIAL_TOKENS = {
    "pad_id": "<|pad|>",
    "bos_id": "<|bos|>",
    "eos_id": "<|eos|>",
    "image_id": "<|image|>",
    "boi_id": "<|boi|>",
    "eoi_id": "<|eoi|>",
}


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> ids, plus the special ids that packing uses (`image_id` fills image positions)."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    image_id: int
    boi_id: int
    eoi_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Return the special ids of `tokenizer` by attribute name."""
    return {name: getattr(tokenizer, name) for name in SPECIAL_TOKENS}


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the special tokens at 256..261; vocab_size 264.

    The two unused ids keep the vocabulary a multiple of 8. `decode` renders special ids by name
    (for example "<|image|>"), so decoding is for reading, not an inverse of `encode` on such text.
    """

    vocab_size = 264

    def __init__(self) -> None:
        for offset, name in enumerate(SPECIAL_TOKENS):
            setattr(self, name, 256 + offset)
        self._names = {256 + offset: token for offset, token in enumerate(SPECIAL_TOKENS.values())}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        parts: list[str] = []
        pending = bytearray()
        for i in ids:
            if i < 256:
                pending.append(i)
                continue
            parts.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            parts.append(self._names.get(i, f"<|{i}|>"))
        parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file whose special tokens are named as in SPECIAL_TOKENS.

    Text that spells a special token is encoded as ordinary text. The file's special tokens are
    encoded as text through `encode_special_tokens`. The strings in SPECIAL_TOKENS are also cut into
    single characters before encoding, because a file may register them as non-special tokens.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = os.fspath(path)
        try:
            tok = _HFTokenizer.from_file(self.path)
        except Exception as exn:  # the Rust side raises a bare Exception for unreadable files
            raise ValueError(f"cannot load tokenizer file {self.path!r}: {exn}") from exn
        self._setup(tok)

    def _setup(self, tok) -> None:
        tok.encode_special_tokens = True
        self._tok = tok
        for name, token in SPECIAL_TOKENS.items():
            token_id = tok.token_to_id(token)
            if token_id is None:
                raise ValueError(
                    f"tokenizer file {self.path!r} has no special token {token!r} (needed as {name}); "
                    f"add the tokens {list(SPECIAL_TOKENS.values())} to it, for example with "
                    "tokenizers' Tokenizer.add_special_tokens, and save it again"
                )
            setattr(self, name, token_id)
        self._special = set(special_ids(self).values())
        # Added tokens can have ids past the base vocabulary: the embedding must cover them all.
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(self._special) + 1)
        self._literal = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS.values()) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self._literal.split(text)):
            # Odd parts are literal special strings: encode them one character at a time.
            pieces = list(part) if i % 2 else [part]
            for piece in pieces:
                if piece:
                    ids.extend(self._tok.encode(piece, add_special_tokens=False).ids)
        leaked = self._special.intersection(ids)
        if leaked:
            raise ValueError(f"tokenizer file {self.path!r} encoded text {text[:80]!r} to special ids {sorted(leaked)}")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    # The Rust tokenizer loses `encode_special_tokens` when pickled: rebuild it from its JSON.
    def __getstate__(self) -> dict:
        return {"path": self.path, "json": self._tok.to_str()}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = state["path"]
        self._setup(_HFTokenizer.from_str(state["json"]))


def train_bpe(texts: Iterable[str], vocab_size: int = 50_432, *, min_frequency: int = 2, multiple_of: int = 64):
    """Train a byte-level BPE (a `tokenizers.Tokenizer`) with SPECIAL_TOKENS on `texts`.

    The vocabulary, special tokens included, is padded with unused "<|reserved_N|>" special tokens
    to a multiple of `multiple_of`, because embedding and output matrices whose row count is a
    multiple of 64 run faster on GPUs. The result has `vocab_size` entries when the text contains
    enough distinct merges, and fewer otherwise.
    """
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least 256 + {len(SPECIAL_TOKENS)}")
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    size = tok.get_vocab_size(with_added_tokens=True)
    padded = -(-size // multiple_of) * multiple_of
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(padded - size)])
    return tok


def load_tokenizer(spec: str = "byte") -> Tokenizer:
    """Build the tokenizer that `spec` names: "byte", or the path of a `tokenizers` .json file."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"tokenizer file {spec!r} not found")
        return HFTokenizer(spec)
    raise ValueError(f"unknown tokenizer {spec!r}: use 'byte' or the path of a Hugging Face tokenizers .json file")
