"""`--help` and `--version`: every command's help fits 80 columns without cutting a name or value."""
from __future__ import annotations

from importlib import metadata

import pytest
import typer
from typer.testing import CliRunner

from prefixtune.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", [""] + COMMANDS)
def test_help_at_80_columns_cuts_nothing(command):
    args = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.output, result.output
    if command:
        for param in typer.main.get_command(app).commands[command].params:
            for name in param.opts + param.secondary_opts:
                if name.startswith("--"):
                    assert name in result.output, f"{command}: {name} is cut or missing"


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"prefixtune {metadata.version('prefixtune')}"
