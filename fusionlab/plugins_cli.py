"""`fusionlab plugins`: list the installed architectures, built-in and third-party, and any failures.

fusionlab plugins            # a table: name, class path, distribution, version, status
fusionlab plugins --json     # the same as JSON lines, for scripts
fusionlab plugins --debug    # raise the first plugin error with its traceback
"""

from __future__ import annotations

import argparse
import json
import os

from fusionlab import plugins

COLUMNS = ("name", "class_path", "distribution", "version", "status")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plugins",
        help="list installed architectures and any that failed to load",
        description=f"List the architectures registered in the entry-point group {plugins.GROUP}: "
        "fusionlab's built-ins and those of installed plugin distributions. Use a class path (or "
        "its class name alone) as model.backbone.class_path in a recipe.",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per architecture instead of a table"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"raise the first plugin error with its traceback (the same as {plugins.DEBUG_ENV}=1)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.debug:
        os.environ[plugins.DEBUG_ENV] = "1"
        plugins.refresh()
    registry = plugins.scan()
    rows = [_row(arch, arch.status) for arch in registry.architectures.values()]
    for arch in registry.conflicts:
        owner = registry.architectures[arch.name]
        rows.append(
            _row(arch, f"conflict: ignored, the name belongs to {owner.distribution} ({owner.target})")
        )
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    if not rows:
        print(f"no architecture is installed in the entry-point group {plugins.GROUP}")
        return 0
    print(format_table(rows))
    return 0


def _row(arch: plugins.Architecture, status: str) -> dict[str, str]:
    return {
        "name": arch.name,
        "class_path": arch.class_path,
        "distribution": arch.distribution,
        "version": arch.version,
        "status": status,
    }


def format_table(rows: list[dict[str, str]]) -> str:
    """Align the rows in columns under an upper-case header; the status column is left unpadded."""
    widths = {column: max(len(column), *(len(row[column]) for row in rows)) for column in COLUMNS[:-1]}
    lines = []
    for row in [{column: column.upper() for column in COLUMNS}, *rows]:
        cells = [row[column].ljust(widths[column]) for column in COLUMNS[:-1]]
        lines.append("  ".join([*cells, row["status"]]))
    return "\n".join(lines)
