"""Reading hypothesis and reference files the way the official E2E ``measure_scores.py`` does."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from .errors import MetricsError

# measure_scores.py's CSV header patterns and mojibake fixes (read_tsv).
HEADER_SRC = r"(mr|src|source|meaning(?:[_ .-]rep(?:resentation)?)?|da|dial(?:ogue)?[_ .-]act)s?"
HEADER_REF = r"(trg|tgt|target|ref(?:erence)?|human(?:[_ .-](?:ref(?:erence)?))?)s?"
_FIXES = (("\ufeff", ""), ("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))


def _read_text(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MetricsError(f"{path} is not UTF-8 text: {exc}") from exc


def read_lines(path) -> list[str]:
    """One stripped line per item, empty lines included (``read_lines`` of measure_scores.py)."""
    return [line.strip() for line in _read_text(path).splitlines()]


def _read_csv_groups(path: Path) -> list[tuple[str, list[str]]]:
    """(MR, references) per item of an E2E-style CSV/TSV."""
    lines = _read_text(path).splitlines()
    for bad, good in _FIXES:
        lines = [line.replace(bad, good) for line in lines]
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise MetricsError(f"reference file {path} is empty")
    rows = list(csv.reader(lines, delimiter="\t" if "\t" in lines[0] else ","))
    header = rows[0]
    src = [i for i, f in enumerate(header) if re.match(HEADER_SRC, f, re.I)]
    ref = [i for i, f in enumerate(header) if re.match(HEADER_REF, f, re.I)]
    if len(src) == 1 and len(ref) == 1:
        src_col, ref_col, rows = src[0], ref[0], rows[1:]
    elif not src and not ref and len(header) == 2:
        src_col, ref_col = 0, 1
    else:
        raise MetricsError(f"cannot tell the MR and reference columns of {path} (header {header})")
    groups: list[tuple[str, list[str]]] = []
    for row in rows:
        if len(row) <= max(src_col, ref_col):
            raise MetricsError(f"{path}: a row has {len(row)} columns, expected {len(header)}")
        if not groups or row[src_col] != groups[-1][0]:  # consecutive rows with the same MR form one group
            groups.append((row[src_col], []))
        groups[-1][1].append(row[ref_col])
    return groups


def read_reference_mrs(path) -> list[str] | None:
    """The MR of each reference group when ``path`` is an E2E-style CSV/TSV, else None (no MRs)."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".tsv"):
        return None
    return [mr for mr, _ in _read_csv_groups(path)]


PLAIN_FORMAT = ("plain text: the references of one item on consecutive lines, items separated by a blank line, "
                "or one reference per line")


def check_plain_text(path, lines: list[str], what: str = "reference file") -> None:
    """Refuse a JSON/JSONL or CSV file where plain text lines are expected: scored line by line as raw JSON
    or CSV it gives a wrong number without a word (BLEU 10 where the right answer is 100)."""
    first = next((line for line in lines if line.strip()), "")
    if first[:1] in "{[":
        try:
            parsed = json.loads(first)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, (dict, list)):
            raise MetricsError(f"{what} {path} looks like JSON (its first line is a JSON "
                               f"{'object' if isinstance(parsed, dict) else 'array'}); expected {PLAIN_FORMAT}")
    for delimiter in ("\t", ","):
        fields = [f.strip() for f in next(csv.reader([first], delimiter=delimiter), [])]
        if len(fields) >= 2 and any(re.fullmatch(HEADER_SRC, f, re.I) for f in fields) and any(
                re.fullmatch(HEADER_REF, f, re.I) for f in fields):
            raise MetricsError(f"{what} {path} looks like a CSV (header {first.strip()!r}); expected {PLAIN_FORMAT}"
                               f", or an E2E CSV named .csv/.tsv")


def read_references(path, n_hyps: int) -> list[list[str]]:
    """Reference groups for ``n_hyps`` hypotheses from ``path``.

    Accepted formats: the official E2E one (the references of one item on
    consecutive lines, items separated by a blank line), one reference per
    line (when the file has ``n_hyps`` lines), or an E2E-style CSV/TSV with
    MR and reference columns (consecutive rows with the same MR are grouped,
    as ``measure_scores.py`` does when the system output is plain text).
    """
    path = Path(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        groups = [refs for _, refs in _read_csv_groups(path)]
    else:
        lines = read_lines(path)
        check_plain_text(path, lines)
        groups = [[]]
        for line in lines:
            if line:
                groups[-1].append(line)
            else:
                groups.append([])
        while groups and not groups[-1]:
            groups.pop()
        if len(groups) == 1 and n_hyps != 1:  # no blank line: one reference per line (measure_scores.py)
            groups = [[line] for line in groups[0]]
    if len(groups) != n_hyps:
        raise MetricsError(f"reference file {path} holds {len(groups)} reference groups but there are {n_hyps} "
                           f"hypotheses (expected blank-line-separated groups, one per hypothesis, or one "
                           f"reference per line)")
    for i, group in enumerate(groups):
        if not group or not any(group):
            raise MetricsError(f"reference file {path}: item {i + 1} has no reference")
    return groups
