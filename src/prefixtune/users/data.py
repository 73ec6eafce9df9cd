"""Rows grouped by user: from records carrying meta["user"] (data/files.py), with each user's dev rows."""
from __future__ import annotations

import hashlib
import random

from ..data.records import Record, training_pairs


def group_by_user(records: list[Record]) -> dict[str, list[tuple[str, str]]]:
    """user -> (source, target) pairs, users in order of first appearance, one pair per reference."""
    grouped: dict[str, list] = {}
    for record in records:
        grouped.setdefault(str(record.meta["user"]), []).extend(training_pairs([record]))
    return grouped


def split_dev(pairs: dict[str, list], fraction: float, seed: int) -> tuple[dict, dict]:
    """Hold out `fraction` of each user's pairs as their dev data, chosen by seed and user alone (so one
    user's split never depends on another's rows); a user keeps at least one training pair."""
    train, dev = {}, {}
    for user, rows in pairs.items():
        held = min(round(fraction * len(rows)), len(rows) - 1)
        digest = hashlib.sha256(f"{seed}\0{user}".encode()).digest()
        order = list(range(len(rows)))
        random.Random(digest).shuffle(order)
        chosen = set(order[:held])
        train[user] = [r for i, r in enumerate(rows) if i not in chosen]
        dev[user] = [r for i, r in enumerate(rows) if i in chosen]
    return train, dev


def load_user_pairs(config) -> tuple[dict, dict]:
    """(train, dev), each user -> pairs, from `config.data` (and `config.dev_data`) with `config.user_field`."""
    from ..data.files import load_records

    fields = dict(source_field=config.source_field, target_field=config.target_field, user_field=config.user_field)
    train = group_by_user(load_records(config.data, **fields))
    if config.dev_data:
        dev = group_by_user(load_records(config.dev_data, **fields))
        unknown = sorted(set(dev) - set(train))
        if unknown:
            raise ValueError(f"{config.dev_data}: user {unknown[0]!r} has dev rows but no training rows")
        return train, dev
    return split_dev(train, config.dev_fraction, config.seed)
