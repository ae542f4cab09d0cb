"""The `microser` command line: one short function per command (parse, call the library, print)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from microser.errors import MicroserError

app = typer.Typer(
    help="Find, compress and export micro speech-emotion-recognition models for hearing-aid firmware.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="Build and inspect teacher caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

# Shared option types, so the same option reads the same in every command.
InputSeconds = Annotated[
    float,
    typer.Option("--input-seconds", help="Audio duration (s) at which MACs and peak RAM are measured."),
]
StudyOpt = Annotated[str, typer.Option("--study", help="Optuna study name.")]
StorageOpt = Annotated[
    Optional[str],
    typer.Option(
        "--storage",
        help="Study storage: sqlite:///FILE.db, a journal file (FILE.log or journal:FILE), or postgresql://... "
        "Default: sqlite file studies/<study>.db.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


# ---- commands (each section: parse, call one library function, render with microser.show) ----


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning MicroserError into a one-line message (exit 2)."""
    try:
        app(args=argv, standalone_mode=False)
    except MicroserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: completed work is kept; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort,):
        sys.exit(1)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
