"""The ``vlmkit`` command line. Heavy imports (torch, transformers) happen inside commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Assemble, inspect and run small VLMs.")
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _is_yaml(source: str) -> bool:
    return source.endswith((".yaml", ".yml"))


@app.command()
def inspect(
    source: str = typer.Argument(..., help="A checkpoint folder, a Hub repo id, or a model YAML file."),
    weights: Optional[bool] = typer.Option(None, "--weights/--no-weights", help="Load weights (default: when the source has them)."),
) -> None:
    """Print the assembled model: slots, plugins, params, parameter counts and one image's shapes."""
    from .inspect import describe

    describe(source, load_weights=weights, console=_console())


@app.command()
def plugins() -> None:
    """List every registered component and the package that provides it."""
    from rich.table import Table

    from .plugins import failures, get_registry, plugin_sources

    sources = plugin_sources()
    table = Table(title="vlmkit components")
    for col in ("slot", "name", "plugin", "distribution"):
        table.add_column(col)
    for entry in get_registry().entries():
        table.add_row(entry.slot, entry.name, entry.plugin, sources.get(entry.plugin, "?"))
    console = _console()
    console.print(table)
    for fail in failures():
        console.print(f"[red]failed[/red] plugin {fail.name!r} from {fail.distribution}: {fail.error}")


@app.command()
def schema(output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write to this file.")) -> None:
    """Print the JSON schema of model YAML files (every registered component)."""
    from .spec import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output is None:
        sys.stdout.write(text + "\n")
    else:
        output.write_text(text + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, printing vlmkit errors as one line plus a hint."""
    from .errors import VlmkitError

    try:
        app(args=argv, standalone_mode=False)
    except VlmkitError as exc:
        if _state["debug"]:
            raise
        err = _console(stderr=True)
        err.print(f"[bold red]error:[/bold red] {exc.message}", markup=True)
        if exc.hint:
            err.print(f"[yellow]hint:[/yellow] {exc.hint}")
        err.print("(run with --debug for the traceback)")
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        return 1
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
