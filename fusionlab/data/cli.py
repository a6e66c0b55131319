"""`fusionlab data ...`: write the bundled sample set, inspect shards, build shards, train a tokenizer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MAX_PIXELS = 64 * 2**20


def add_parser(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="write, inspect and build shards; train a tokenizer")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    from fusionlab.data.build import add_sample_parser

    add_sample_parser(data_commands)
    _add_inspect_parser(data_commands)
    _add_build_parser(data_commands)
    _add_tokenizer_parser(data_commands)


# ---------------------------------------------------------------------------------------------
# inspect


def _add_inspect_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect",
        help="report samples per type, image sizes, token counts and every sample training would skip",
        description="Read shards as training does and report what they hold. PATTERN is a tar file, a "
        "folder of tars, a brace pattern (shards/{000..009}.tar), a glob, or several joined by '::'.",
    )
    add = parser.add_argument
    add("pattern", metavar="PATTERN", help="the shards to read")
    add("--type", choices=("caption", "interleaved", "text", "qa"),
        help="read every sample as this type (default: guess each sample's type from its members)")
    add("--tokenizer", default="byte", help="'byte' or a tokenizers .json file, for the token counts (byte)")
    add("--image-size", type=int, metavar="PX", help="with --patch-size: count packed positions per type")
    add("--patch-size", type=int, metavar="PX", help="patch side in pixels; see --image-size")
    add("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
        help=f"largest width * height accepted, as in training ({DEFAULT_MAX_PIXELS})")
    add("--max-listed", type=int, default=50, metavar="N", help="skipped samples listed one per line (50)")
    add("--json", action="store_true", help="print the report as JSON, listing every skipped sample")
    parser.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from fusionlab.data.datamodule import expand_shards
    from fusionlab.data.inspection import format_report, inspect_shards, report_json
    from fusionlab.data.tokenizer import load_tokenizer

    if (args.image_size is None) != (args.patch_size is None):
        print("error: give --image-size and --patch-size together", file=sys.stderr)
        return 2
    try:
        shards = expand_shards(args.pattern)
        tokenizer = load_tokenizer(args.tokenizer)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tokens_per_image = (args.image_size // args.patch_size) ** 2 if args.image_size else None
    report = inspect_shards(
        shards, tokenizer, data_type=args.type, image_size=args.image_size or 32, max_pixels=args.max_image_pixels
    )
    print(report_json(report, tokens_per_image) if args.json else format_report(report, tokens_per_image, args.max_listed))
    return 0


# ---------------------------------------------------------------------------------------------
# build


def _add_build_parser(commands: argparse._SubParsersAction) -> None:
    build = commands.add_parser("build", help="write shards from your own images, captions and documents")
    kinds = build.add_subparsers(dest="build_kind", required=True)

    captions = kinds.add_parser(
        "captions",
        help="an image folder and a captions table -> image-caption shards",
        description="Write img2dataset-layout caption shards ({key}.jpg, {key}.txt, {key}.json) from an "
        "image folder and a table of captions: a CSV file with a header row, or JSON lines.",
    )
    captions.add_argument("--images", required=True, type=Path, metavar="DIR", help="folder the image paths are relative to")
    captions.add_argument("--captions", required=True, type=Path, metavar="FILE", help="captions table (.csv or .jsonl)")
    captions.add_argument("--image-column", default="file_name", help="column holding the image path (file_name)")
    captions.add_argument("--caption-column", default="caption", help="column holding the caption (caption)")
    _add_output_arguments(captions, samples_per_shard=10_000)
    captions.set_defaults(func=run_build)

    interleaved = kinds.add_parser(
        "interleaved",
        help="OBELICS-schema documents with downloaded images -> interleaved shards",
        description="Write interleaved shards ({key}.json + {key}.img0.png, ...) from JSON lines of "
        '{"texts": [...], "images": [...]} (the OBELICS schema) whose images are already downloaded. '
        "Images are found through --url-map, or as paths inside --images. Images are never downloaded.",
    )
    interleaved.add_argument("--records", required=True, type=Path, metavar="FILE", help="documents (.jsonl)")
    interleaved.add_argument("--images", required=True, type=Path, metavar="DIR", help="folder of the downloaded images")
    interleaved.add_argument("--url-map", type=Path, metavar="FILE",
                             help="table (.csv or .jsonl) with columns url and file_name mapping image URLs to files")
    _add_output_arguments(interleaved, samples_per_shard=1000)
    interleaved.set_defaults(func=run_build)


def _add_output_arguments(parser: argparse.ArgumentParser, samples_per_shard: int) -> None:
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder for the shards")
    parser.add_argument("--prefix", default="train", help="shard file names: PREFIX-000000.tar, ... (train)")
    parser.add_argument("--samples-per-shard", type=int, default=samples_per_shard, metavar="N",
                        help=f"samples per shard ({samples_per_shard})")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help=f"largest width * height accepted, as in training ({DEFAULT_MAX_PIXELS})")


def run_build(args: argparse.Namespace) -> int:
    from fusionlab.data.writers import build_captions, build_interleaved

    output = dict(prefix=args.prefix, samples_per_shard=args.samples_per_shard, max_pixels=args.max_image_pixels)
    try:
        if args.build_kind == "captions":
            report = build_captions(args.images, args.captions, args.out, image_column=args.image_column,
                                    caption_column=args.caption_column, **output)
        else:
            report = build_interleaved(args.records, args.images, args.out, url_map=args.url_map, **output)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.written else 1


# ---------------------------------------------------------------------------------------------
# tokenizer


def _add_tokenizer_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "tokenizer",
        help="train a byte-level BPE on the text of shards",
        description="Train a byte-level BPE (Hugging Face tokenizers) on the text of the given shards, "
        "with fusionlab's special tokens, its vocabulary padded to a multiple of 64. Recipes use the "
        "written file as data.tokenizer.",
    )
    parser.add_argument("patterns", nargs="+", metavar="PATTERN", help="shards to read (as for inspect)")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE", help="tokenizer file to write (.json)")
    parser.add_argument("--vocab-size", type=int, default=50_432, metavar="N", help="vocabulary size (50432)")
    parser.add_argument("--min-frequency", type=int, default=2, metavar="N",
                        help="merges must occur at least this often (2)")
    parser.add_argument("--max-samples", type=int, metavar="N", help="read at most this many samples")
    parser.set_defaults(func=run_tokenizer)


def run_tokenizer(args: argparse.Namespace) -> int:
    from itertools import islice

    from fusionlab.data.datamodule import expand_shards
    from fusionlab.data.errors import SkipCounter
    from fusionlab.data.formats import sample_texts, tar_samples
    from fusionlab.data.tokenizer import HFTokenizer, train_bpe

    if args.out.suffix != ".json":
        print(f"error: --out {args.out} must end in .json, which load_tokenizer requires", file=sys.stderr)
        return 2
    try:
        shards = [shard for pattern in args.patterns for shard in expand_shards(pattern)]
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counter = SkipCounter()
    samples = islice(tar_samples(shards, counter.handler), args.max_samples)
    n_texts = 0

    def texts():
        nonlocal n_texts
        for sample in samples:
            for text in sample_texts(sample):
                n_texts += 1
                yield text

    try:
        tok = train_bpe(texts(), args.vocab_size, min_frequency=args.min_frequency)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out))
    size = HFTokenizer(args.out).vocab_size  # loads it back as training will
    note = "" if size >= args.vocab_size else f" (fewer than the {args.vocab_size} requested: the text has too few merges)"
    print(f"wrote {args.out}: vocabulary of {size:,} tokens{note}, trained on {n_texts:,} texts from {len(shards)} shard(s)")
    return 0
