"""The `fusionlab` command.

Training subcommands (fit, validate, test) go through LightningCLI, so recipes are YAML over the
typed signatures of FusionModule, FusionDataModule and the Trainer. Tool subcommands (data, scaling,
sweep, plugins and the others in TOOL_MODULES) are plain argparse commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test")

OVERVIEW = """usage: fusionlab COMMAND [options]

Train and study native multimodal models.

training (LightningCLI; `fusionlab fit --help` lists every option):
  fit         train from a recipe:  fusionlab fit --config recipes/quickstart.yaml
  validate    run validation of a checkpoint:  fusionlab validate --config RECIPE --ckpt_path CKPT
  test        run the test loop of a checkpoint

tools:
  data        shards: write the sample set (data sample), report on shards (data inspect),
              write shards from your files (data build), train a BPE tokenizer (data tokenizer)
  scaling     fit scaling laws and predict compute-optimal sizes (scaling fit, scaling predict)
  plugins     list installed architectures (built-in and plugins) and any that failed to load
  sweep       plan a scaling-law study, run it locally or on SLURM, watch it (sweep plan|run|status)
  compare     train several recipes and print losses, FLOPs, time and memory side by side:
              fusionlab compare recipes/tiny_early.yaml recipes/tiny_late.yaml
  routing     MoE expert routing and specialisation of a checkpoint on shards (PNG + JSON)
  predict     caption images from a folder or caption shards with a checkpoint (JSON lines):
              fusionlab predict CKPT --shards 'sample/caption/val-*.tar' --out captions.jsonl
  downstream  caption scores, question-answering fine-tuning and scores of several checkpoints
              as one table: fusionlab downstream --config configs/sft_qa.yaml --checkpoint early=CKPT ...

`fusionlab COMMAND --help` shows the options of a command.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(OVERVIEW)
        return 0
    if argv[0] in LIGHTNING_COMMANDS:
        from fusionlab.training.cli import run_lightning_cli

        run_lightning_cli(argv)
        return 0
    if argv[0] in TOOL_MODULES:
        return run_tool(argv)
    print(f"fusionlab: unknown command {argv[0]!r}\n\n{OVERVIEW}", file=sys.stderr)
    return 2


# Each tool command lives in its own module, which adds its argparse parser and sets `func`.
TOOL_MODULES = {
    "data": "fusionlab.data.cli",
    "scaling": "fusionlab.scaling.cli",
    "plugins": "fusionlab.plugins_cli",
    "sweep": "fusionlab.scaling.sweep_cli",
    "compare": "fusionlab.training.compare",
    "routing": "fusionlab.training.routing_cli",
    "predict": "fusionlab.evaluation.predict",
    "downstream": "fusionlab.evaluation.downstream",
}


def run_tool(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fusionlab")
    commands = parser.add_subparsers(dest="command", required=True)
    # Only the requested command's module is imported: `fusionlab scaling` never loads torch.
    importlib.import_module(TOOL_MODULES[argv[0]]).add_parser(commands)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
