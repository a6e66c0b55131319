"""Shards -> samples -> packed batches: tokenizers, image decoding, shard formats, packing, the DataModule."""

from fusionlab.data.datamodule import FusionDataModule, RowStream, Source, expand_shards
from fusionlab.data.errors import ShardReadError, SkipCounter, SkipSample, StrictDataError
from fusionlab.data.formats import Document, SampleDecoder, decode_samples, tar_samples
from fusionlab.data.images import decode_image, image_to_tensor, patchify, to_rgb
from fusionlab.data.packing import Packer, Row, collate_rows
from fusionlab.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "Document",
    "FusionDataModule",
    "HFTokenizer",
    "Packer",
    "Row",
    "RowStream",
    "SampleDecoder",
    "ShardReadError",
    "SkipCounter",
    "SkipSample",
    "Source",
    "StrictDataError",
    "Tokenizer",
    "collate_rows",
    "decode_image",
    "decode_samples",
    "expand_shards",
    "image_to_tensor",
    "load_tokenizer",
    "patchify",
    "tar_samples",
    "to_rgb",
]
