"""Tokenizers: byte-level default, Hugging Face files, special ids never produced by user text."""

from __future__ import annotations

import pickle

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from fusionlab.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, load_tokenizer, special_ids

TRICKY = "a caption with <image> and <|image|><|bos|> spelled out, <|eoi|> too: é ✓"


def write_bpe(path, specials=tuple(SPECIAL_TOKENS.values()), extra_plain=()):
    """Train a tiny byte-level BPE with the given special tokens and save it to `path`."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["a red seven on the left of a blue two"] * 20, trainer=trainer)
    if extra_plain:
        tok.add_tokens(list(extra_plain))  # registered as added tokens that are *not* special
    tok.save(str(path))
    return path


def assert_no_special(tokenizer, ids):
    assert not set(special_ids(tokenizer).values()) & set(ids)


def test_byte_roundtrip_and_specials():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    assert tok.decode(tok.encode(text)) == text
    ids = special_ids(tok)
    assert len(set(ids.values())) == 6
    assert all(256 <= i < tok.vocab_size for i in ids.values())
    assert tok.vocab_size == 264


def test_byte_never_encodes_special():
    tok = ByteTokenizer()
    ids = tok.encode(TRICKY)
    assert max(ids) < 256
    assert_no_special(tok, ids)
    assert tok.decode([tok.bos_id, *tok.encode("x"), tok.image_id]) == "<|bos|>x<|image|>"


def test_hf_literal_specials_stay_text(tmp_path):
    tok = HFTokenizer(write_bpe(tmp_path / "tok.json"))
    ids = tok.encode(TRICKY)
    assert_no_special(tok, ids)
    assert tok.decode(ids) == TRICKY
    assert tok.vocab_size > max(special_ids(tok).values())


def test_hf_non_special_added_tokens(tmp_path):
    # A file that registers <|image|> as a plain added token still must not yield its id from text.
    path = write_bpe(tmp_path / "tok.json", specials=[t for t in SPECIAL_TOKENS.values() if t != "<|image|>"],
                     extra_plain=["<|image|>"])
    tok = HFTokenizer(path)
    ids = tok.encode("look: <|image|>")
    assert tok.image_id not in ids
    assert tok.decode(ids) == "look: <|image|>"


def test_hf_pickle_keeps_behaviour(tmp_path):
    tok = HFTokenizer(write_bpe(tmp_path / "tok.json"))
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode(TRICKY) == tok.encode(TRICKY)
    assert special_ids(copy) == special_ids(tok)
    assert copy.vocab_size == tok.vocab_size


def test_hf_missing_special_named(tmp_path):
    path = write_bpe(tmp_path / "short.json", specials=["<|pad|>", "<|bos|>", "<|eos|>"])
    with pytest.raises(ValueError) as caught:
        HFTokenizer(path)
    assert "short.json" in str(caught.value)
    assert "<|image|>" in str(caught.value)


def test_hf_unreadable_file_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        HFTokenizer(path)


def test_load_tokenizer_specs(tmp_path):
    assert isinstance(load_tokenizer(), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    path = write_bpe(tmp_path / "tok.json")
    assert isinstance(load_tokenizer(str(path)), HFTokenizer)
    with pytest.raises(ValueError, match="gpt2"):
        load_tokenizer("gpt2")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_byte_tokenizer_pickles():
    tok = pickle.loads(pickle.dumps(ByteTokenizer()))
    assert tok.encode("ab") == [97, 98]
    assert tok.image_id == ByteTokenizer().image_id
