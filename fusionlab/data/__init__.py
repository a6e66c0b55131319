"""Shards -> samples -> packed batches: tokenizers, image decoding, shard formats, packing, the DataModule.

Names are imported on first access, so that `fusionlab.data.build` (writing shards) loads neither
torch nor Lightning.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "datamodule": ("FusionDataModule", "Source", "expand_shards"),
    "errors": ("ShardReadError", "SkipCounter", "SkipSample", "StrictDataError"),
    "formats": ("Document", "SampleDecoder", "decode_samples", "sample_texts", "tar_samples"),
    "inspection": ("inspect_shards",),
    "loader": ("StreamPosition", "TrainLoader"),
    "images": ("decode_image", "image_to_tensor", "patchify", "to_rgb"),
    "packing": ("Packer", "Row", "collate_rows"),
    "stats": ("data_metrics",),
    "streams": ("BatchStream", "RowStream"),
    "tokenizer": ("ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer", "train_bpe"),
    "writers": ("build_captions", "build_interleaved"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
