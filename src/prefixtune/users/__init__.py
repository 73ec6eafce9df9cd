"""Many users in one job: one frozen model, one prefix per user, written into a prefix store.

    from prefixtune.users import UsersConfig, train_users
    result = train_users(TrainConfig(output_dir="runs/users", method="prefix-flat"), model, tokenizer,
                         train={"alice": [(source, target), ...], "bob": [...]}, dev={...})
    print(result.table())        # then: prefixtune serve --store runs/users/store

config.py (`UsersConfig`), names.py (user -> prefix name), state.py (one user's optimizer, schedule,
batches, best step), step.py (a joint step: rows of many users, each with its own prefix), trainer.py
(the rounds, export into the store), result.py (the summary table), data.py (rows grouped by user).
See docs/users.md.
"""
from .config import UsersConfig
from .data import load_user_pairs
from .result import UsersResult
from .trainer import check_users, resumed_users_config, store_dir, train_users

__all__ = ["UsersConfig", "UsersResult", "check_users", "load_user_pairs", "resumed_users_config", "store_dir",
           "train_users"]
