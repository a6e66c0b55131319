"""`fusionlab data ...`: write the bundled sample set (and, later, inspect and build shards)."""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="build and inspect shards")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    from fusionlab.data.build import add_sample_parser

    add_sample_parser(data_commands)
