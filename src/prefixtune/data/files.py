"""The user's own data: JSONL, CSV/TSV, Parquet, a saved HF dataset folder or a hub dataset id -> `Record`s.

Files are read by Hugging Face `datasets` (the ecosystem's loader: one call per format, Arrow
underneath, hub ids and `save_to_disk` folders for free). Its cost is an install of about 260 MB
(pyarrow, pandas) beside torch's gigabytes, and about a second of import; a hand-written parser
for four formats would be ours to keep correct. This module only maps rows to records and checks
them: a bad row is one `DataFileError` naming the file, the line (the row, for columnar formats)
and the field, raised before any model loads.

Rows are (source, target) pairs, the fields auto-detected from common names (`FIELD_PAIRS`) or
given; a list-valued target is a group of references. Rows with a `messages` field (a list of
{role, content}) are chat rows: see `chat.py` for how they train.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

from .chat import ROLES, Conversation
from .records import Record

# Auto-detected (source, target) field names, in the order they are tried.
FIELD_PAIRS = (("source", "target"), ("input", "output"), ("prompt", "completion"), ("question", "answer"),
               ("document", "summary"), ("instruction", "response"))
# File suffix -> the `datasets` builder that reads it, with its options.
FORMATS = {".jsonl": ("json", {}), ".json": ("json", {}), ".csv": ("csv", {"na_filter": False}),
           ".tsv": ("csv", {"na_filter": False, "delimiter": "\t"}), ".parquet": ("parquet", {})}


class DataFileError(ValueError):
    """Bad input in a data file; the message names the file, the line (or row) and the field."""


def as_typed(path):
    """A local path inside the working directory, relative to it: a run saves its data files absolute (to resume
    from anywhere), and errors should name a file as the user typed it ("mine.jsonl: line 7: ..."). Anything
    else (another directory, a hub dataset id) unchanged."""
    local = Path(path)
    if local.is_absolute():
        try:
            return local.relative_to(Path.cwd())
        except ValueError:
            pass
    return path


def load_records(path, *, source_field: str | None = None, target_field: str | None = None,
                 user_field: str | None = None, split: str = "train", messages_field: str = "messages") -> list[Record]:
    """Every row of `path` as a `Record(source, references, meta)`, checked.

    `path` is a .jsonl/.json, .csv, .tsv or .parquet file, a folder written by `save_to_disk`
    (its `split` when it holds several), a folder of data files, or a hub dataset id (`split` of it).
    `meta["line"]` is the row's 1-based line in a text file (the row number otherwise);
    `meta["user"]` is the row's `user_field` as text when `user_field` is given: a string or an integer (7 and
    "7" are one user, as in a CSV file); any other value is refused. A chat row's `meta["where"]` is "FILE: line N".
    """
    path = as_typed(path)
    rows, where = read_rows(path, split)
    name = str(path)
    if not rows:
        raise DataFileError(f"{name}: {where(0)}: empty: no rows")
    columns = list(rows[0])
    chat = messages_field in columns and source_field is None and target_field is None
    if not chat:
        source_field, target_field = _pick_fields(f"{name}: {where(0)}", columns, source_field, target_field,
                                                  messages_field)
    if user_field is not None and user_field not in columns:
        raise DataFileError(f"{name}: {where(0)}: no field {user_field!r} (--user-field); it has {_listed(columns)}")
    records = []
    for i, row in enumerate(rows):
        at = f"{name}: {where(i)}"
        if chat:
            record = _chat_record(at, row.get(messages_field), messages_field)
            record.meta["where"] = at  # its conversation's errors name it (checked against the chat template later)
        else:
            source = _text(at, row.get(source_field), source_field, "source")
            record = Record(source, _references(at, row.get(target_field), target_field))
        record.meta["line"] = _number(where(i))
        if user_field is not None:
            record.meta["user"] = _user(at, row.get(user_field), user_field)
        records.append(record)
    return records


def load_sources(path, *, source_field: str | None = None, split: str = "train",
                 messages_field: str = "messages") -> list:
    """The inputs of a data file, for decoding: each row's source text, or a chat row's `Conversation` (decoded
    from its messages before the last assistant turn). Targets are not needed here."""
    path = as_typed(path)
    rows, where = read_rows(path, split)
    name = str(path)
    if not rows:
        raise DataFileError(f"{name}: {where(0)}: empty: no rows")
    columns = list(rows[0])
    if source_field is None and messages_field in columns:
        return [Conversation.of(_chat_record(f"{name}: {where(i)}", row.get(messages_field), messages_field,
                                             answered=False).meta["messages"]) for i, row in enumerate(rows)]
    if source_field is None:
        source_field = next((s for s, _ in FIELD_PAIRS if s in columns), None)
        if source_field is None:
            raise DataFileError(f"{name}: {where(0)}: no source field found among {_listed(columns)}: name it with "
                                f"--source-field (looked for {', '.join(s for s, _ in FIELD_PAIRS)})")
    if source_field not in columns:
        raise DataFileError(f"{name}: {where(0)}: no field {source_field!r} (--source-field); it has {_listed(columns)}")
    return [_text(f"{name}: {where(i)}", row.get(source_field), source_field, "source") for i, row in enumerate(rows)]


def load_train_dev(data, dev_data=None, dev_fraction: float = 0.1, seed: int = 1, **fields) -> tuple[list, list]:
    """(train records, dev records) of a data file: `dev_data`'s rows, else `dev_fraction` of `data` held out by
    `seed`. `fields` are `load_records`' (source_field, target_field, user_field, messages_field)."""
    train = load_records(data, **fields)
    if dev_data is not None:
        return train, load_records(dev_data, **fields)
    return split_dev(train, dev_fraction, seed)


def split_dev(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, dev): `fraction` of the records held out, chosen by `seed`; both keep the file's order.

    At least one record stays in training; a fraction that rounds to no record holds out none.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"dev fraction must be in [0, 1), got {fraction}")
    count = min(round(len(records) * fraction), len(records) - 1)
    held = set(random.Random(seed).sample(range(len(records)), count)) if count > 0 else set()
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def read_rows(path, split: str = "train"):
    """(rows as dicts, where(i) -> "line N" / "row N") for any source `load_records` takes."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)  # its own error log would repeat ours
    local = Path(path).expanduser()
    if local.is_dir():
        return _read_folder(local, split), _rows
    if local.is_file():
        return _read_file(local)
    if local.suffix.lower() in FORMATS or local.is_absolute() or str(path).startswith("."):
        raise DataFileError(f"{path}: data file not found")
    return _read_hub(str(path), split), _rows


def _read_file(path: Path):
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataFileError(f"{path}: unknown data format {path.suffix or '(no suffix)'!r}: give a .jsonl, .json, "
                            f".csv, .tsv or .parquet file, a dataset folder or a hub dataset id")
    if path.stat().st_size == 0:
        raise DataFileError(f"{path}: line 1: empty file: no rows")
    builder, options = FORMATS[suffix]
    if builder == "csv":
        options = {**options, **_text_columns(path, options.get("delimiter", ","))}
    try:
        rows = _build(builder, str(path), options, blank_lines_out=suffix == ".jsonl")
    except Exception as e:  # datasets wraps the parser's error (pyarrow, pandas) in its own
        if suffix in (".csv", ".tsv") and len(_jsonl_lines(path)) == 1:
            raise DataFileError(f"{path}: line 2: empty: no rows after the header") from None
        if suffix != ".parquet" and not _jsonl_lines(path):
            raise DataFileError(f"{path}: line 1: empty file: no rows (only blank lines)") from None
        raise DataFileError(_malformed(path, suffix, e)) from None
    if suffix == ".jsonl":
        lines = _jsonl_lines(path)
        if len(lines) == len(rows):
            return _as_written(path, rows), lambda i: f"line {lines[i]}"
    if suffix in (".csv", ".tsv"):  # the header is line 1
        return rows, lambda i: f"line {i + 2}"
    return rows, _rows


class JsonScalar(str):
    """A JSON number, true or false as the line writes it. Arrow gives a column one type: targets 1 and 2.5
    would train as '1.0' and '2.5', 12345678901234567890 as '1.2345678901234567e+19', true as 'True'."""

    @property
    def integer(self) -> bool:
        return self.lstrip("-").isdigit()


def _as_written(path: Path, rows: list[dict]) -> list[dict]:
    """The rows with each top-level number, true and false as written in the file (JsonScalar); strings, lists
    of them and objects (chat messages) as `datasets` read them."""
    with open(path, encoding="utf-8-sig") as f:
        raw = [json.loads(line, parse_int=JsonScalar, parse_float=JsonScalar, parse_constant=JsonScalar)
               for line in f if line.strip()]

    def written(v):
        return JsonScalar(json.dumps(v)) if isinstance(v, bool) else v

    for row, line in zip(rows, raw):
        for key, value in line.items():
            if isinstance(value, (bool, JsonScalar)):
                row[key] = written(value)
            elif isinstance(value, list) and all(isinstance(v, (str, bool, JsonScalar)) for v in value):
                row[key] = [written(v) for v in value]
    return rows


def _user(at: str, value, field: str) -> str:
    """A row's user as text: a string, or an integer (a float would name users '1.0'; true is no name)."""
    if isinstance(value, JsonScalar) and value.integer or isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, (JsonScalar, bool, float)) or not isinstance(value, (str, type(None))):
        shown = value if isinstance(value, JsonScalar) else repr(value)  # as the line writes it
        raise DataFileError(f"{at}: field {field!r} (the user) is {shown}: a user is a string or an integer")
    if value is None or value.strip() == "":
        raise DataFileError(f"{at}: field {field!r} (the user) is missing or empty")
    return value


def _text_columns(path: Path, delimiter: str) -> dict:
    """`load_dataset` options that read every CSV column as text: left to pandas, a column of numbers becomes
    numbers, so target '00123' trains as '123.0' and users '007' and '7' merge into one. {} when the header has
    an empty or repeated name (pandas renames those columns): the columns are then inferred as before."""
    import csv

    import datasets

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}  # the parser says what is wrong
    if not header or "" in header or len(set(header)) != len(header):
        return {}
    return {"features": datasets.Features({name: datasets.Value("string") for name in header})}


def _folder_csv_options(path: Path) -> dict:
    """For a folder of CSV (or of TSV) files with one header: their cells as text, as for one file (FORMATS,
    _text_columns). {} for anything else (other formats, subfolders, headers that differ)."""
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    suffixes = {p.suffix.lower() for p in entries}
    if not entries or any(not p.is_file() for p in entries) or suffixes not in ({".csv"}, {".tsv"}):
        return {}
    delimiter = FORMATS[suffixes.pop()][1].get("delimiter", ",")
    options = [_text_columns(p, delimiter) for p in entries]
    if not options[0] or any(o != options[0] for o in options):
        return {}
    return {"na_filter": False, **options[0]}


def _build(builder: str, data_file: str, options: dict, blank_lines_out: bool = False) -> list[dict]:
    """The rows of one file, read by `datasets` into a scratch cache that is removed afterwards. `blank_lines_out`
    (JSONL): a copy without blank lines is read, since datasets' reader of a column of mixed types (users 7 and
    "7") parses every line and fails on a blank one; the rows are the same, and lines are counted on the file."""
    import datasets

    cache = tempfile.mkdtemp(prefix="prefixtune-data-")
    try:
        if blank_lines_out:
            with open(data_file, "rb") as f:
                lines = f.read().splitlines(keepends=True)
            if any(not line.strip() for line in lines):
                data_file = str(Path(cache) / "rows.jsonl")
                with open(data_file, "wb") as f:
                    f.writelines(line if line.endswith(b"\n") else line + b"\n" for line in lines if line.strip())
        return datasets.load_dataset(builder, data_files=data_file, split="train", cache_dir=cache,
                                     **options).to_list()
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _read_folder(path: Path, split: str) -> list[dict]:
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # save_to_disk
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataFileError(f"{path}: no split {split!r}; it has {_listed(list(loaded))}")
            loaded = loaded[split]
        return loaded.to_list()
    cache = tempfile.mkdtemp(prefix="prefixtune-data-")
    try:  # a folder of data files (train.jsonl, test.csv, ...): datasets matches splits to file names
        return datasets.load_dataset(str(path), split=split, cache_dir=cache, **_folder_csv_options(path)).to_list()
    except (ValueError, FileNotFoundError) as e:
        raise DataFileError(f"{path}: not a dataset folder (save_to_disk) nor a folder of data files with a "
                            f"{split!r} split ({str(e).splitlines()[0]})") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _read_hub(name: str, split: str) -> list[dict]:
    """A hub dataset's split. Reachability is checked first (seconds), not left to the client's minute of retries;
    with HF_HUB_OFFLINE=1 a cached copy loads without the network."""
    import datasets
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if not offline:
        try:
            huggingface_hub.dataset_info(name, timeout=5.0)
        except GatedRepoError:
            pass  # reachable; the download says what access is missing
        except RepositoryNotFoundError:
            raise DataFileError(f"{name}: no such local file or folder, and no such dataset on the Hugging Face hub "
                                f"(or it is private)") from None
        except Exception as e:  # connection refused, DNS, timeout, proxy
            raise DataFileError(f"{name}: no such local file or folder; as a hub dataset id it needs the Hugging Face "
                                f"hub, which cannot be reached ({_first_line(e)}); HF_HUB_OFFLINE=1 uses a cached "
                                f"copy") from None
    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as e:  # no such split or config, not in the cache offline: datasets raises many types
        raise DataFileError(f"{name}: not loadable as a Hugging Face dataset ({_first_line(e)})") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _jsonl_lines(path: Path) -> list[int]:
    """The 1-based numbers of a text file's non-blank lines (in JSONL, the rows: blank lines are skipped)."""
    with open(path, "rb") as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]


def _malformed(path: Path, suffix: str, error: Exception) -> str:
    cause = error.__cause__ or error.__context__ or error
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if suffix == ".jsonl":  # name the line: the parser counts rows from 0 and skips blank lines
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}: line {n}: malformed JSON ({e.msg} at column {e.colno})"
                if not isinstance(value, dict):
                    return f"{path}: line {n}: not a JSON object (a row is {{\"field\": value, ...}})"
    return f"{path}: malformed {suffix[1:].upper()} ({detail})"


def _pick_fields(at, columns, source_field, target_field, messages_field):
    """(source field, target field): the given ones, else the first known pair the rows have; `at` is
    "FILE: line N" of the first row, for the error."""
    if source_field is None or target_field is None:
        candidates = [(s, t) for s, t in FIELD_PAIRS if source_field in (None, s) and target_field in (None, t)]
        found = [(s, t) for s, t in candidates if s in columns and t in columns]
        half = [(s, t) for s, t in candidates if s in columns or t in columns]
        if found:
            source_field, target_field = found[0]
        elif half:  # one half of a known pair: name the other
            s, t = half[0]
            what, missing, flag = ("target", t, "--target-field") if s in columns else ("source", s, "--source-field")
            raise DataFileError(f"{at}: no {what} field ({(s, t)[what == 'source']!r} is there, {missing!r} "
                                f"is not): name it with {flag}; the rows have {_listed(columns)}")
    for flag, field in (("--source-field", source_field), ("--target-field", target_field)):
        if field is None:
            pairs = ", ".join(f"{s}/{t}" for s, t in FIELD_PAIRS)
            raise DataFileError(f"{at}: no {flag[2:-6]} field found among {_listed(columns)}: name it with "
                                f"{flag} (looked for {pairs}, or {messages_field!r} for chat rows)")
        if field not in columns:
            raise DataFileError(f"{at}: no field {field!r} ({flag}); it has {_listed(columns)}")
    return source_field, target_field


def _text(at: str, value, field: str, what: str) -> str:
    if value is None:
        raise DataFileError(f"{at}: field {field!r} (the {what}) is missing")
    if isinstance(value, (dict, list)):
        raise DataFileError(f"{at}: field {field!r} (the {what}) is a {type(value).__name__}, not text")
    return str(value)  # a JsonScalar as written; a plain str


def _references(at: str, value, field: str) -> list[str]:
    """The target as a group of references: a string is one, a list of strings is several."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise DataFileError(f"{at}: field {field!r} (the target) is an empty list")
    references = [_text(at, v, field, "target") for v in values]
    if any(not r.strip() for r in references):
        raise DataFileError(f"{at}: field {field!r} (the target) is empty")
    return references


def _chat_record(at: str, messages, field: str, answered: bool = True) -> Record:
    """A chat row: its messages kept whole in meta (they train through the chat template), the last user turn
    as the source and the last assistant turn as the reference (what eval compares). `answered=False` (inputs to
    decode) accepts a conversation without an assistant turn yet."""
    if not isinstance(messages, list) or not messages:
        raise DataFileError(f"{at}: field {field!r} must be a non-empty list of {{role, content}} messages")
    kept = []
    for k, message in enumerate(messages, 1):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise DataFileError(f"{at}: field {field!r}: message {k} must be {{\"role\": one of {', '.join(ROLES)}, "
                                f"\"content\": text}}")
        kept.append({"role": message["role"], "content": message["content"]})
    answers = [m["content"] for m in kept if m["role"] == "assistant"]
    if not answered:
        return Record(next((m["content"] for m in reversed(kept) if m["role"] == "user"), ""), [], {"messages": kept})
    if not answers:
        raise DataFileError(f"{at}: field {field!r}: no assistant message (the loss is on assistant turns)")
    if any(not a.strip() for a in answers):
        raise DataFileError(f"{at}: field {field!r}: an assistant message (a target) is empty")
    last = max(k for k, m in enumerate(kept) if m["role"] == "assistant")
    asked = [m["content"] for m in kept[:last] if m["role"] == "user"]
    return Record(asked[-1] if asked else "", [kept[last]["content"]], {"messages": kept})


def _rows(i: int) -> str:
    return f"row {i + 1}"


def _number(where: str) -> int:
    return int(where.rsplit(" ", 1)[1])


def _listed(names) -> str:
    return ", ".join(repr(n) for n in names) or "no fields"
