"""Rows grouped by user: records carrying meta["user"] (data/files.py) -> each user's training and dev examples.

Everything is per user, as a lone run on that user's rows alone would do it (`train.load_pairs`): the dev
rows held out of their own rows by seed, the samplers applied to their own rows. So one user's split
never depends on another user's rows, and `prefixtune train --data` on a file of one user's rows trains on
the same examples.
"""
from __future__ import annotations

from ..data.collate import check_chat_examples
from ..data.files import load_records, split_dev
from ..data.records import Record, sample_pairs, training_pairs


def group_by_user(records: list[Record]) -> dict[str, list[Record]]:
    """user -> their records, users in order of first appearance."""
    grouped: dict[str, list] = {}
    for record in records:
        grouped.setdefault(str(record.meta["user"]), []).append(record)
    return grouped


def user_examples(train: dict[str, list[Record]], dev: dict[str, list[Record]] | None, config) -> tuple[dict, dict]:
    """(train, dev): user -> examples (pairs, or chat conversations). Without `dev`, each user's dev rows
    are `config.dev_fraction` of their own rows, held out by `config.seed`; `config.dev_size` 0: none."""
    if dev is None:
        split = {user: split_dev(records, config.dev_fraction, config.seed) for user, records in train.items()}
        train, dev = {u: s[0] for u, s in split.items()}, {u: s[1] for u, s in split.items()}
    return ({u: sample_pairs(training_pairs(r), config.train_size, config.seed) for u, r in train.items()},
            {u: sample_pairs(training_pairs(dev.get(u, [])), config.dev_size, config.seed) if config.dev_size else []
             for u in train})


def load_user_pairs(config, tokenizer=None) -> tuple[dict, dict]:
    """(train, dev), each user -> examples, from `config.data` (and `config.dev_data`) with `config.user_field`."""
    fields = dict(source_field=config.source_field, target_field=config.target_field, user_field=config.user_field)
    train = group_by_user(load_records(config.data, **fields))
    dev = None
    if config.dev_data:
        dev = group_by_user(load_records(config.dev_data, **fields))
        unknown = [user for user in dev if user not in train]
        if unknown:
            raise ValueError(f"{config.dev_data}: user {unknown[0]!r} has dev rows but no training rows in {config.data}")
    train, dev = user_examples(train, dev, config)
    # every user's chat rows against the chat template, before the model loads and before any user trains
    check_chat_examples(config.model, [e for examples in (*train.values(), *dev.values()) for e in examples],
                        config.max_source_len, config.max_target_len, tokenizer)
    return train, dev
