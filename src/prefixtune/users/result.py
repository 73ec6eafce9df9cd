"""What a many-users job reports: one row per user (examples, steps, best dev loss, ...) as JSON and CSV,
and a table to print."""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import finite_json
from ..atomic import atomic_write_bytes
from ..run_dir import USERS_CSV, USERS_SUMMARY

COLUMNS = ["user", "prefix", "examples", "dev_examples", "steps", "best_step", "best_dev_loss", "final_dev_loss",
           "last_train_loss", "stop_reason"]


@dataclass
class UsersResult:
    output_dir: str
    store: str                   # `prefixtune serve --store STORE`
    tenant: str                  # the tenant owning the prefixes: give it an API key
    users: list = field(default_factory=list)   # one row per user, in the order they finished
    tokens_per_s: float = 0.0    # real (unpadded) tokens of training steps per second
    train_seconds: float = 0.0   # training rounds only (no model load, no dev loss, no export)
    tokens: int = 0
    padded_tokens: int = 0
    resident_users: int = 0      # users whose state was held at once
    state_bytes_per_user: int = 0      # measured: parameters + AdamW moments + best state of one user
    budget_bytes_per_user: int = 0     # what the resident budget assumed (the above plus a gradient)
    dev_seconds: float = 0.0     # the users' dev losses
    export_seconds: float = 0.0  # writing the users' prefixes into the store
    removed_users: list = field(default_factory=list)  # --resume: users no longer in the data, deleted from the store

    def to_json(self) -> dict:
        return asdict(self)

    def table(self, limit: int = 50) -> str:
        """The summary as aligned text: user, examples, steps, best dev loss (the first `limit` users)."""
        head = ["user", "prefix", "examples", "steps", "best_step", "best_dev_loss", "stop_reason"]
        shown = sorted(self.users, key=lambda r: r["user"])[:limit]
        cells = [[_cell(r[c]) for c in head] for r in shown]
        widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        if len(self.users) > limit:
            lines.append(f"... and {len(self.users) - limit} more users (all in users.csv)")
        return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_summary(result: UsersResult, out: Path):
    """OUT/users.json (the whole result) and OUT/users.csv (one row per user), each written atomically. A
    non-finite number (a diverged user's NaN loss) is null in the JSON (`NaN` is no JSON), an empty CSV cell."""
    rows = finite_json.finite(sorted(result.users, key=lambda r: r["user"]))
    atomic_write_bytes(out / USERS_SUMMARY, finite_json.dumps({**result.to_json(), "users": rows}, indent=2).encode())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / USERS_CSV, text.getvalue().encode())
