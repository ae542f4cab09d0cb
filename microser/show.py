"""Everything the CLI prints: rich tables, progress, JSON. Library modules never print."""

from __future__ import annotations

import json
import sys

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def print_json(obj) -> None:
    """Print ``obj`` as indented JSON on stdout (plain, no colour), for scripts."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
