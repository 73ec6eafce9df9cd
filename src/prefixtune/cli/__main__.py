"""`python -m prefixtune.cli` (and `torchrun ... -m prefixtune.cli`)."""
from . import app

app()
