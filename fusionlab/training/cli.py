"""LightningCLI for fusionlab: recipes, argument links and the callbacks every run has."""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fusionlab import plugins
from fusionlab.data.datamodule import FusionDataModule
from fusionlab.data.tokenizer import load_tokenizer
from fusionlab.training.checkpoint import FinalModelCheckpoint
from fusionlab.training.module import FusionModule
from fusionlab.training.routing import RoutingStatistics
from fusionlab.training.summary import RunSummary
from fusionlab.training.throughput import ThroughputMonitor


def tokenizer_vocab_size(spec: str) -> int:
    return load_tokenizer(spec).vocab_size


class FusionCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data section owns the tokenizer and the image geometry; the backbone receives them,
        # so a recipe states each value once.
        parser.link_arguments("data.tokenizer", "model.backbone.init_args.vocab_size", compute_fn=tokenizer_vocab_size)
        parser.link_arguments("data.image_size", "model.backbone.init_args.image_size")
        parser.link_arguments("data.patch_size", "model.backbone.init_args.patch_size")
        parser.add_lightning_class_args(FinalModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.save_last": True,
            "checkpoint.every_n_train_steps": 500,
        })
        parser.add_lightning_class_args(RunSummary, "run_summary")
        parser.add_lightning_class_args(ThroughputMonitor, "throughput")
        parser.add_lightning_class_args(RoutingStatistics, "routing")


def run_lightning_cli(argv: list[str], run: bool = True) -> FusionCLI:
    """Run LightningCLI on `argv`; with run=False, parse and instantiate without a subcommand."""
    # Importing the plugins first lets recipes name their backbones by class name alone.
    plugins.discover()
    return FusionCLI(
        FusionModule,
        FusionDataModule,
        args=argv,
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "fusionlab"},
            },
            "log_every_n_steps": 10,
            "check_val_every_n_epoch": None,
        },
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        run=run,
    )
