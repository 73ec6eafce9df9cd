"""A run's directory: what it holds (train_config.json, checkpoint.pt, result.json), continuing it, and
what it trained on.

`train --resume` continues *the run in the directory*: its saved config, never rewritten; an option the
caller set that contradicts it is refused naming both values; a finished run is not trained again.
The data a run trained on (`data_provenance`) is kept in its checkpoint and its export's metadata, for
`info` and the model card.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, fields, replace
from pathlib import Path

from .atomic import remove_stale_temps
from .checkpoint import CHECKPOINT, Checkpoint
from .data import DATA_ENV, resolve_data_dir
from .train_config import TrainConfig

# What `train` writes for each method, named for what the file holds. Prefix files are the shipped
# format (`prefixtune.prefix/1`); the others hold the trained weights (`prefixtune.weights/1`).
EXPORT_FILES: dict[str, str] = {
    "prefix": "prefix.safetensors", "prefix-flat": "prefix.safetensors",
    "embedding-only": "prompt-embeddings.safetensors", "infix": "infix.safetensors",
    "finetune": "finetuned-model.safetensors", "finetune-top2": "finetuned-top2-layers.safetensors",
    "adapter": "adapters.safetensors",
}

RESULT = "result.json"
TRAIN_CONFIG = "train_config.json"
# Where and on what a resumed run goes on; they may differ from the saved config without contradicting it.
NOT_THE_RUN = ("output_dir", "device")
# A many-users job (users/trainer.py, `train --user-field`) writes its prefixes into OUT/store, its summary
# into OUT/users.json and .csv, and its UsersConfig under this key of train_config.json.
USERS_KEY, USERS_STORE, USERS_SUMMARY, USERS_CSV = "users", "store", "users.json", "users.csv"


def holds_single_run(out_dir: Path) -> bool:
    """Whether OUT_DIR holds a finished or interrupted `train` run (one prefix, or one method's weights)."""
    return (out_dir / RESULT).is_file() or (out_dir / CHECKPOINT).is_file()


def holds_users_run(out_dir: Path) -> bool:
    """Whether OUT_DIR holds a many-users job that wrote something: its summary, or users' prefixes."""
    return (out_dir / USERS_SUMMARY).is_file() or any((out_dir / USERS_STORE).glob("*/*.safetensors"))


def run_files() -> list[str]:
    """The files a run, single or many-users, writes into OUT_DIR itself (a many-users job's store aside)."""
    return [CHECKPOINT, RESULT, TRAIN_CONFIG, USERS_SUMMARY, USERS_CSV, *sorted(set(EXPORT_FILES.values()))]


def clear_run(out_dir: Path):
    """Remove what a run, single or many-users, wrote into OUT_DIR (--overwrite); anything else stays."""
    for name in run_files():
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / USERS_STORE, ignore_errors=True)


def remove_stale_temps_of_run(out_dir: Path) -> list[Path]:
    """When a run starts or resumes in OUT_DIR: remove the temporary files that a killed save of its files left
    (atomic.py; a `finetune` checkpoint's is ~2 GB), which nothing else would ever remove. Only their pattern."""
    return remove_stale_temps(out_dir, run_files())


def check_output_dir(out_dir: Path, resume: bool, overwrite: bool, users: bool = False) -> bool:
    """Never silently replace a run: a finished or interrupted one needs --resume or --overwrite, and a single run
    and a many-users job (`users`: the run to start is one, `--user-field`) never take each other's directory without
    --overwrite. Returns whether OUT_DIR holds a run that --overwrite replaces: the caller clears it (`clear_run`)
    once the model has loaded, so that a model that fails to load leaves the old run as it was."""
    if (resume and not users) or not out_dir.is_dir():  # (train.py refuses to resume a many-users job before this)
        return False
    if holds_single_run(out_dir):
        if users:
            state, keep = "a single-prefix run (train without --user-field)", ""
        elif (out_dir / RESULT).is_file():
            state, keep = "a finished run", ""
        else:
            state, keep = "an interrupted run", ", --resume to continue it"
    elif holds_users_run(out_dir):
        if users and resume:  # the job to finish (replaced if --overwrite is given too)
            return overwrite
        state, keep = ("a many-users run", ", --resume to finish it") if users else \
            ("a many-users run (--user-field)", "")
    else:
        return False
    if not overwrite:
        raise FileExistsError(f"{out_dir} holds {state}: pass --overwrite to replace it{keep}, "
                              f"or choose another --output-dir")
    return True


def data_dir_of(config: TrainConfig) -> str | None:
    try:
        return str(resolve_data_dir(config.data_dir, config.task).resolve())
    except FileNotFoundError:  # e.g. XSum from the hub
        return None


def data_provenance(config: TrainConfig, from_api: bool, n_train: int, n_dev: int) -> dict:
    """What a run trained on, for the export's metadata (`provenance`), `info` and the model card."""
    if from_api:
        return {"source": "train_pairs", "train_pairs": n_train, "dev_pairs": n_dev}
    if config.data:  # the user's own file (data/files.py)
        return {"source": "file", "data": config.data, "dev_data": config.dev_data, "train_pairs": n_train,
                "dev_pairs": n_dev}
    given_by = "--data-dir" if config.data_dir else (DATA_ENV if os.environ.get(DATA_ENV) else "default")
    return {"source": "task", "task": config.task, **config.task_options, "data_dir": data_dir_of(config),
            "data_dir_from": given_by, "train_pairs": n_train, "dev_pairs": n_dev}


def provenance_of(config: dict) -> dict:
    """The data provenance an export's train_config carries (`provenance`; `data` in exports made before
    `--data FILE` took that name), or {}."""
    for key in ("provenance", "data"):
        if isinstance(config.get(key), dict):
            return config[key]
    return {}


def describe_data(config: dict) -> str:
    """One line saying what a run (its saved config and `provenance`) trained on."""
    data = provenance_of(config)
    if data.get("source") == "file" or isinstance(config.get("data"), str):
        dev = (f"dev rows from {config['dev_data']}" if config.get("dev_data")
               else f"{config.get('dev_fraction')} of its rows held out for dev")
        counted = f", {data['train_pairs']} train pairs" if data.get("train_pairs") else ""
        return f"the file {config.get('data')} ({dev}){counted}"
    if data.get("source") == "train_pairs":
        dev = data.get("dev_pairs")
        return (f"{data.get('train_pairs')} (source, target) pairs given to the Python API (train_pairs), "
                f"{dev} dev pair{'' if dev == 1 else 's'}")
    task = config.get("task") or "?"
    options = "".join(f", {k.replace('_', ' ')} {v}" for k, v in (config.get("task_options") or {}).items())
    where = data.get("data_dir") or config.get("data_dir")
    given_by = data.get("data_dir_from") or ("--data-dir" if config.get("data_dir") else None)
    sampled = f", {config['train_size']} sampled pairs (seed {config.get('seed')})" if config.get("train_size") else ""
    counted = f", {data['train_pairs']} train pairs" if data.get("train_pairs") and not sampled else ""
    source = f" from {where} ({given_by})" if where and given_by else (f" from {where}" if where else "")
    return f"the {task} train split{options}{source}{sampled}{counted}"


def saved_config(out_dir: str | Path) -> dict | None:
    """The config of the run in OUT_DIR (train_config.json, else its checkpoint's), None when it holds none."""
    out_dir = Path(out_dir)
    if (out_dir / TRAIN_CONFIG).is_file():
        try:
            saved = json.loads((out_dir / TRAIN_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{out_dir / TRAIN_CONFIG} is not readable JSON ({e}): cannot resume this run") from None
        if not isinstance(saved, dict):
            raise ValueError(f"{out_dir / TRAIN_CONFIG} is not a JSON object: cannot resume this run")
        return saved
    if (out_dir / CHECKPOINT).is_file():
        return Checkpoint.load(out_dir).config
    return None


# Options naming local files or folders: saved absolute where they exist (`local_path`), compared as the paths
# they resolve to, so that a run resumes from any directory, and an older config's relative path from its own.
PATH_OPTIONS = ("data_dir", "data", "dev_data")


def local_path(value: str | None) -> str | None:
    """A data option as a run saves it: an existing local file or folder made absolute; anything else (a hub
    dataset id, a missing file that loading refuses) as given."""
    if value is None or not Path(value).expanduser().exists():
        return value
    return str(Path(value).expanduser().resolve())


def with_local_paths(config: TrainConfig) -> TrainConfig:
    """`config` as a new run saves it: its local data files absolute (`local_path`)."""
    return replace(config, data=local_path(config.data), dev_data=local_path(config.dev_data))


def _same(name: str, saved, given) -> bool:
    if name in PATH_OPTIONS and saved is not None and given is not None:
        return Path(saved).expanduser().resolve() == Path(given).expanduser().resolve()
    if name == "task_options":  # only the options given must agree
        return all((saved or {}).get(k) == v for k, v in (given or {}).items())
    return saved == given


def resumed_config(out_dir: str | Path, given: dict, flags: bool = False) -> TrainConfig:
    """The saved config of the run in OUT_DIR, to continue it. Each option in `given` (what the caller set) must
    agree with it; a contradiction is refused naming both values (`flags`: named as command-line flags)."""
    out_dir = Path(out_dir)
    saved = saved_config(out_dir)
    if saved is None:
        raise FileNotFoundError(f"nothing to resume: {out_dir} holds no run ({TRAIN_CONFIG} or {CHECKPOINT})")
    saved = {k: v for k, v in saved.items() if k != USERS_KEY}  # a many-users job's own options: users/trainer.py
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"{out_dir / TRAIN_CONFIG} has options this prefixtune does not know ({', '.join(unknown)}): "
                         f"it was written by another version")
    defaults = asdict(TrainConfig())
    for name, value in given.items():
        if name in NOT_THE_RUN:
            continue
        before = saved.get(name, defaults.get(name))
        if not _same(name, before, value):
            label = f"--{name.replace('_', '-')}" if flags else name
            if name == "task_options":
                label, before, value = "task options", {k: (before or {}).get(k) for k in value}, value
            before = "unset (its default)" if before is None else repr(before)
            raise ValueError(f"{out_dir} holds a run with {label} {before}, not {value!r}: --resume continues "
                             f"that run as it was started (drop the option, or start a new run with --overwrite "
                             f"or another --output-dir)")
    config = TrainConfig(**saved)
    where = {k: given[k] for k in NOT_THE_RUN if k in given and k != "output_dir"}  # e.g. another --device
    return replace(config, output_dir=str(out_dir), **where)


def given_options(config: TrainConfig) -> dict:
    """The options of `config` that differ from the defaults: what a caller of the API set."""
    defaults = asdict(TrainConfig())
    return {k: v for k, v in asdict(config).items() if v != defaults[k]}


def finished_result(out_dir: str | Path) -> dict | None:
    """The result.json of a finished run in OUT_DIR, None when it holds none."""
    path = Path(out_dir) / RESULT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e})") from None

def checkpoint_facts(ckpt: Checkpoint) -> dict:
    """What an export from a checkpoint records of its run: the config, the steps run, the data it trained on."""
    return {**ckpt.config, "steps": ckpt.step, **({"data": ckpt.data} if ckpt.data else {})}
