"""The data pipeline alone: samples/s and tokens/s with 0, 1 and 2 DataLoader workers.

Measured in one run, on the quickstart recipe's data settings (45-45-10 mixture of the bundled
sample shards, 32x32 images in 4x4 patches, context 512, batch 8):

- the training loader (FusionDataModule.train_dataloader) with each worker count: batches,
  samples (packed documents), tokens (non-padding positions) and images per second;
- plain image decoding of the same shards' images (Pillow open + RGB conversion, one process),
  the cost of decoding alone, next to which the loader's per-image cost can be read;
- the quickstart model's training speed in tokens/s on one loader batch repeated (no data
  loading), which the loader must exceed at least twice with 2 workers.

    python benchmarks/loader_throughput.py [--data DIR] [--batches 60] [--workers 0 1 2]
        [--train-steps 12] [--json results.json]

Without --data the recipe's own shard folder is read, and when it lacks the shards a small sample
set is written to a temporary folder first. Ratios printed: loader tokens/s over training
tokens/s, and loader images/s over plain decoding images/s.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from itertools import islice
from pathlib import Path

import lightning as L
import torch
import yaml
from PIL import Image

from common import RepeatedBatches
from fusionlab.batch import DATA_TYPES
from fusionlab.data.datamodule import FusionDataModule, Source, expand_shards
from fusionlab.data.formats import IMAGE_EXTENSIONS, tar_samples
from fusionlab.models import EarlyFusion
from fusionlab.training.module import FusionModule

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def recipe_data_dir(recipe: dict) -> Path:
    """Return the folder of the recipe's sample set, whose shard patterns read FOLDER/TYPE/PATTERN."""
    return ROOT / Path(recipe["data"]["train"][0]["urls"]).parent.parent


def recipe_datamodule(recipe: dict, data_dir: Path, num_workers: int) -> FusionDataModule:
    """Build the recipe's DataModule, with its shard patterns moved to `data_dir`/TYPE/PATTERN."""
    config = dict(recipe["data"])
    for split in ("train", "val"):
        config[split] = [
            Source(**{**source, "urls": str(data_dir.joinpath(*Path(source["urls"]).parts[-2:]))})
            for source in config.get(split) or []
        ]
    config["num_workers"] = num_workers
    return FusionDataModule(**config)


def loader_rates(dm: FusionDataModule, n_batches: int, warmup: int = 2) -> dict[str, float]:
    """Per-second rates over `n_batches` batches, after `warmup` batches that start the workers."""
    batches = iter(dm.train_dataloader())
    for batch in islice(batches, warmup):
        pass
    totals = {"batches": 0, "samples": 0, "tokens": 0, "images": 0}
    start = time.perf_counter()
    for batch in islice(batches, n_batches):
        stats = batch.stats
        totals["batches"] += 1
        totals["samples"] += stats.get("documents", 0)
        totals["tokens"] += sum(stats.get(f"tokens/{name}", 0) for name in DATA_TYPES)
        totals["images"] += stats.get("images", 0)
    seconds = time.perf_counter() - start
    rates = {f"{name}_per_s": value / seconds for name, value in totals.items()}
    rates["image_token_share"] = totals["images"] * dm.tokens_per_image / max(1, totals["tokens"])
    return rates


def decode_rate(shards: list[str], max_images: int) -> float:
    """Images per second of plain Pillow decoding (open, convert to RGB) of the shards' images."""
    images = []
    for sample in tar_samples(shards):
        images += [data for extension, data in sample.items()
                   if not extension.startswith("__") and extension.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
        if len(images) >= max_images:
            break
    start = time.perf_counter()
    for data in images:
        with Image.open(io.BytesIO(data)) as img:
            img.convert("RGB")
    return len(images) / (time.perf_counter() - start)


class _StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module) -> None:
        self.end = time.perf_counter()


def training_rate(recipe: dict, dm: FusionDataModule, steps: int, warmup: int = 2) -> float:
    """Tokens (non-padding positions) per second that the recipe's model trains on, data loading excluded."""
    batch = next(iter(dm.train_dataloader()))
    tokens = sum(batch.stats.get(f"tokens/{name}", 0) for name in DATA_TYPES)
    torch.manual_seed(0)
    init_args = recipe["model"]["backbone"]["init_args"]
    backbone = EarlyFusion(vocab_size=dm.vocab_size, image_size=dm.image_size, patch_size=dm.patch_size, **init_args)
    timer = _StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=recipe["trainer"].get("precision", "32-true"),
        max_steps=warmup + steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer],
    )
    loader = torch.utils.data.DataLoader(RepeatedBatches(batch), batch_size=None)
    trainer.fit(FusionModule(backbone, warmup_steps=1), train_dataloaders=loader)
    return tokens * steps / (timer.end - timer.start)


def sample_dir(requested: Path | None) -> Path:
    if requested is not None and (requested / "caption").is_dir():
        return requested
    from fusionlab.data.build import write_sample_set

    out = Path(tempfile.mkdtemp(prefix="fusionlab-loader-bench-"))
    print(f"writing a small sample set to {out} (pass --data DIR to use existing shards)")
    write_sample_set(out, seed=0, variant="simple", image_size=32, n_train_scenes=1200, n_val_scenes=32,
                     n_train_docs=300, n_val_docs=8, n_train_texts=120, n_val_texts=8)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="sample shards (default: the folder the recipe reads)")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="recipe whose data settings are used")
    parser.add_argument("--batches", type=int, default=60, help="batches timed per worker count (60)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts (0 1 2)")
    parser.add_argument("--train-steps", type=int, default=12, help="training steps timed (12)")
    parser.add_argument("--decode-images", type=int, default=2000, help="images decoded for the plain rate (2000)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    recipe = yaml.safe_load(args.recipe.read_text())
    data = sample_dir(args.data or recipe_data_dir(recipe))
    results: dict = {"recipe": str(args.recipe), "data": str(data), "threads": torch.get_num_threads()}
    image_shards = expand_shards(str(data / "caption" / "train-*.tar")) + expand_shards(str(data / "interleaved" / "train-*.tar"))
    results["decode_images_per_s"] = decode_rate(image_shards, args.decode_images)
    results["loader"] = {str(w): loader_rates(recipe_datamodule(recipe, data, w), args.batches) for w in args.workers}
    results["train_tokens_per_s"] = training_rate(recipe, recipe_datamodule(recipe, data, 0), args.train_steps)
    for workers, rates in results["loader"].items():
        rates["tokens_over_training"] = rates["tokens_per_s"] / results["train_tokens_per_s"]
        rates["images_over_plain_decoding"] = rates["images_per_s"] / results["decode_images_per_s"]

    print(f"plain image decoding: {results['decode_images_per_s']:,.0f} images/s")
    print(f"training ({args.recipe.name}, data loading excluded): {results['train_tokens_per_s']:,.0f} tokens/s")
    print(f"{'workers':>8}{'batches/s':>11}{'samples/s':>11}{'tokens/s':>11}{'images/s':>10}"
          f"{'image share':>13}{'x training':>12}{'x decoding':>12}")
    for workers, rates in results["loader"].items():
        print(f"{workers:>8}{rates['batches_per_s']:>11.1f}{rates['samples_per_s']:>11,.0f}{rates['tokens_per_s']:>11,.0f}"
              f"{rates['images_per_s']:>10,.0f}{rates['image_token_share']:>13.2f}"
              f"{rates['tokens_over_training']:>12.2f}{rates['images_over_plain_decoding']:>12.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
