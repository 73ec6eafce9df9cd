"""The `prefixtune` command: a thin layer over the Python API.

Commands live by what they do: training.py (train, export, info), decoding.py (generate, eval,
score, demo), running.py (serve, experiment) and interop/commands.py (import, push, pull); each
registers itself on the one `app` (app.py), in the order `--help` lists them.
"""
from ..interop.commands import register as _register_interop
from .app import app
from . import training, decoding, running  # noqa: E402,F401,I001  (registers the commands, in --help's order)

_register_interop(app)  # import, push, pull

__all__ = ["app"]
