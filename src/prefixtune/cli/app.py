"""The `prefixtune` Typer app and what its commands share: failing with one line, the common options."""
from __future__ import annotations

from typing import Optional

import typer

# Help is click's plain layout: it wraps to the terminal (up to 120 columns) and never cuts a name or a
# value, where rich's boxed table cut them at 80 columns ("--gradient-checkpo…"); a test checks every command.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"max_content_width": 120},
                  help="Prefix-tuning of frozen language models: train, export, generate, evaluate, serve.")

DATA_HELP = "data directory (default: $PREFIXTUNE_DATA, else ./data or ../shared/data)"
DATA_FILE_HELP = ("your own data: a .jsonl/.json, .csv, .tsv or .parquet file, a dataset folder (save_to_disk) or a "
                  "Hugging Face dataset id; rows of source and target, or chat rows (messages)")
SOURCE_FIELD_HELP = "the source field of --data (default: detected: source, input, prompt, question, ...)"
TARGET_FIELD_HELP = "the target field of --data (default: detected: target, output, completion, answer, ...)"


def _version(value: bool):
    if value:
        from .. import __version__

        typer.echo(f"prefixtune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")):
    pass


def _fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _device_option():
    return typer.Option("auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | mps")


def _load_model(name: str, device: str = "auto"):
    """The base model, or one `error:` line (no traceback) when it cannot be loaded."""
    from ..models import load_base_model

    try:
        return load_base_model(name, device=device)
    except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
        _fail(str(e))


def _task_options(train_from: Optional[str], subset: Optional[str], scheme: Optional[str]) -> dict:
    options = {"train_from": train_from, "subset": subset, "scheme": scheme}
    return {k: v for k, v in options.items() if v is not None}
