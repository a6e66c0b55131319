"""Packing: token layout, targets, document and image boundaries, first-fit placement, collation."""

from __future__ import annotations

import torch

from fusionlab.batch import DATA_TYPES, IGNORE_INDEX
from fusionlab.data.formats import Document
from fusionlab.data.packing import Packer, collate_rows
from fusionlab.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
SIZE = 4


def image(value: int = 0) -> torch.Tensor:
    return torch.full((3, SIZE, SIZE), value, dtype=torch.uint8)


def doc(*segments, data_type="caption", key="k") -> Document:
    return Document(key, "shard.tar", data_type, list(segments))


def check_row_invariants(row, tokens_per_image):
    """Targets stay inside their document, images are whole, positions restart per document."""
    T = row.tokens.shape[0]
    for i in range(T):
        target = row.targets[i].item()
        if row.document[i] < 0 or row.image_index[i] >= 0:
            assert target == IGNORE_INDEX
            continue
        if target != IGNORE_INDEX:
            assert i + 1 < T
            assert row.document[i + 1] == row.document[i]
            assert target == row.tokens[i + 1]
            assert row.image_index[i + 1] < 0
    for index in range(row.images.shape[0]):
        where = (row.image_index == index).nonzero().flatten()
        assert len(where) == tokens_per_image
        assert (where == torch.arange(where[0], where[0] + tokens_per_image)).all()
        assert row.tokens[where[0] - 1] == TOK.boi_id
        assert row.tokens[where[-1] + 1] == TOK.eoi_id
        assert (row.patch_index[where] == torch.arange(tokens_per_image)).all()
    for d in row.document.unique():
        if d >= 0:
            assert (row.positions[row.document == d] == torch.arange(int((row.document == d).sum()))).all()


def test_layout_and_targets():
    packer = Packer(16, 2, TOK, image_size=SIZE)
    (row,) = packer.add(doc(image(7), "hi")) + packer.flush()
    b, e, i, s, t = TOK.boi_id, TOK.eoi_id, TOK.image_id, TOK.bos_id, TOK.eos_id
    h, letter_i = ord("h"), ord("i")
    expected = [s, b, i, i, e, h, letter_i, t]
    assert row.tokens[:8].tolist() == expected
    assert row.tokens[8:].tolist() == [TOK.pad_id] * 8
    ignore = IGNORE_INDEX
    # bos predicts boi; boi and the patches take no loss; eoi predicts the first text token.
    assert row.targets[:8].tolist() == [b, ignore, ignore, ignore, h, letter_i, t, ignore]
    assert row.image_index[:8].tolist() == [-1, -1, 0, 0, -1, -1, -1, -1]
    assert row.patch_index[:8].tolist() == [-1, -1, 0, 1, -1, -1, -1, -1]
    assert row.positions[:8].tolist() == list(range(8))
    assert row.document.tolist() == [0] * 8 + [-1] * 8
    assert row.source.tolist() == [DATA_TYPES.index("caption")] * 8 + [-1] * 8
    assert row.stats == {"positions": 16, "padding": 8, "documents": 1, "images": 1,
                         "tokens/caption": 8, "tokens/image": 2}
    assert torch.equal(row.images, image(7)[None])


def test_two_documents_do_not_leak():
    packer = Packer(32, 4, TOK, image_size=SIZE)
    rows = packer.add(doc("first", data_type="text")) + packer.add(doc(image(), "second")) + packer.flush()
    (row,) = rows
    assert row.document.max() == 1
    second = (row.document == 1).nonzero().flatten()
    assert row.positions[second[0]] == 0
    last_of_first = second[0] - 1
    assert row.targets[last_of_first] == IGNORE_INDEX  # the eos of A does not predict B's bos
    assert row.source[0] == DATA_TYPES.index("text")
    assert row.source[second[0]] == DATA_TYPES.index("caption")
    check_row_invariants(row, 4)


def test_image_never_split():
    # 4 patches per image, 6 text tokens, one image, 6 text tokens, context 8.
    packer = Packer(8, 4, TOK, image_size=SIZE)
    rows = packer.add(doc("abcdef", image(3), "ghijkl", data_type="interleaved")) + packer.flush()
    assert sum(row.images.shape[0] for row in rows) == 1
    for row in rows:
        check_row_invariants(row, 4)
        assert (row.tokens == TOK.image_id).sum() == 4 * row.images.shape[0]
    # A full row is emitted at once, ahead of older open rows, so compare the text as a multiset.
    text = "".join(chr(t) for row in rows for t in row.tokens.tolist() if t < 256)
    assert sorted(text) == list("abcdefghijkl")


def test_literal_placeholder_stays_text():
    packer = Packer(64, 4, TOK, image_size=SIZE)
    rows = packer.add(doc(image(), "see <image> and <|image|> here")) + packer.flush()
    (row,) = rows
    assert (row.tokens == TOK.image_id).sum() == 4
    assert (row.image_index >= 0).sum() == 4


def test_oversized_image_dropped_and_counted():
    packer = Packer(8, 16, TOK, image_size=SIZE)
    rows = packer.add(doc(image(), "cap")) + packer.flush()
    assert sum(row.stats.get("images_dropped", 0) for row in rows) == 1
    assert all(row.images.shape == (0, 3, SIZE, SIZE) for row in rows)
    assert all((row.tokens == TOK.image_id).sum() == 0 for row in rows)


def test_long_document_split_into_pieces():
    text = "".join(chr(ord("a") + i % 26) for i in range(20))
    packer = Packer(8, 2, TOK, open_rows=1, image_size=SIZE)
    rows = packer.add(doc(text, data_type="text")) + packer.flush()
    assert len(rows) == 3  # bos + 20 tokens + eos = 22 positions
    for row in rows:
        check_row_invariants(row, 2)
    assert rows[0].targets[7] == IGNORE_INDEX  # its next token starts the next piece
    assert rows[0].targets[6] == rows[0].tokens[7]
    assert rows[1].positions[0] == 0
    assert rows[2].targets[rows[2].document.ge(0).sum() - 1] == IGNORE_INDEX  # the real end
    assert rows[2].stats["padding"] == 2


def test_first_fit_fills_earlier_rows():
    packer = Packer(10, 2, TOK, open_rows=2)
    emitted = []
    for text in ("aaaaaa", "bbbbbb", "c"):  # 8, 8 and 3 positions
        emitted += packer.add(doc(text, data_type="text"))
    assert len(emitted) == 1  # "c" fits in neither open row: the fullest ("a", first of a tie) goes
    assert emitted[0].tokens[1] == ord("a")
    emitted += packer.flush()
    assert [row.tokens[1].item() for row in emitted] == [ord("a"), ord("b"), ord("c")]
    assert all(row.document.max() == 0 for row in emitted)
    packer = Packer(12, 2, TOK, open_rows=2)
    rows = []
    for text in ("aaaaaa", "bbbbbbbbbb", "c"):  # 8, 12 (fills a row at once) and 3 positions
        rows += packer.add(doc(text, data_type="text"))
    rows += packer.flush()
    assert rows[0].tokens[1] == ord("b")
    assert rows[0].stats["padding"] == 0
    assert rows[1].tokens[1] == ord("a")
    assert rows[1].document.max() == 1  # "c" joined the "a" row


def test_packing_is_deterministic():
    documents = [doc("x" * n, image(n), "y" * (n % 5), data_type="interleaved") for n in range(1, 30)]

    def run():
        packer = Packer(24, 4, TOK, image_size=SIZE)
        return list(packer.pack(documents))

    first, second = run(), run()
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.images, b.images)
        check_row_invariants(a, 4)


def test_stats_reach_exactly_one_row():
    packer = Packer(8, 2, TOK, image_size=SIZE)
    packer.add_stats({"skipped/empty_text": 2})
    rows = packer.add(doc("abcdefghij", data_type="text"))
    packer.add_stats({"skipped/empty_text": 1})
    rows += packer.flush()
    assert sum(row.stats.get("skipped/empty_text", 0) for row in rows) == 3


def test_collate_rebases_images():
    packer = Packer(16, 2, TOK, open_rows=1, image_size=SIZE)
    rows = []
    for value in (10, 20, 30):
        rows += packer.add(doc(image(value), "abcdef" * 2))  # 17 positions: one row each, split
    rows += packer.flush()
    batch = collate_rows(rows)
    assert batch.tokens.shape == (len(rows), 16)
    assert batch.images.shape == (3, 3, SIZE, SIZE)
    assert batch.images[:, 0, 0, 0].tolist() == [10, 20, 30]
    for b in range(len(rows)):
        indices = batch.image_index[b][batch.image_index[b] >= 0].unique().tolist()
        for index in indices:
            assert batch.images[index, 0, 0, 0] == rows[b].images[0, 0, 0, 0]
    assert batch.stats["positions"] == 16 * len(rows)
    assert batch.stats["images"] == 3
    assert batch.stats["padding"] == int((batch.document < 0).sum())


def test_collate_without_images():
    packer = Packer(8, 2, TOK, image_size=SIZE)
    batch = collate_rows(packer.add(doc("abc", data_type="text")) + packer.flush())
    assert batch.images.shape == (0, 3, SIZE, SIZE)
    assert (batch.image_index == -1).all()


def test_question_answering_targets_answers_only():
    from fusionlab.data.formats import Answer

    document = doc(image(), " Q: a?", Answer(" yes"), " Q: b?", Answer(" 2"), data_type="qa")
    (row,) = Packer(64, tokens_per_image=4, tokenizer=TOK).pack([document])
    check_row_invariants(row, 4)
    targeted = row.targets[row.targets != IGNORE_INDEX].tolist()
    assert targeted == [*b" yes", *b" 2", TOK.eos_id]
    # each answer is predicted from the position before it, the end of the question
    first = (row.targets != IGNORE_INDEX).nonzero().flatten()[0]
    assert row.tokens[first] == ord("?")
    assert row.source[0] == DATA_TYPES.index("qa")


def test_documents_without_answers_keep_every_target():
    plain = doc(" a b", data_type="text")
    (row,) = Packer(16, tokens_per_image=4, tokenizer=TOK).pack([plain])
    assert row.targets[row.targets != IGNORE_INDEX].tolist() == [*b" a b", TOK.eos_id]
