"""What every benchmark shares: the source tree on the import path, and the common flags."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # run from a checkout without installing
DEFAULT_DATA = os.environ.get("PREFIXTUNE_DATA") or str(HERE.parent.parent / "shared" / "data")


def at_least(minimum: float, kind=int, exclusive: bool = False):
    """An argparse type: a number >= `minimum` (> with `exclusive`), else a usage error, not a traceback at its
    first use (some came only after the whole run: a division by zero rounds)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (value > minimum if exclusive else value >= minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if exclusive else '>='} {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def benchmark_parser(doc: str, threads: int = 0, threads_help: str = "torch threads (0: PyTorch's default)",
                     min_threads: int = 0) -> argparse.ArgumentParser:
    """--model, --data-dir, --threads and --json, the flags every benchmark takes. `min_threads` 1 where the
    threads are other processes' (0, PyTorch's default, means nothing there)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=DEFAULT_DATA, help="datasets (default: $PREFIXTUNE_DATA)")
    parser.add_argument("--threads", type=at_least(min_threads), default=threads, help=threads_help)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    return parser
