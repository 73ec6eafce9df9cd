"""The committed reports stay reproducible: every cell a study plans today is found in its cells.jsonl.

A cell's id hashes its whole configuration, so a new TrainConfig field or a changed default would
silently orphan every committed cell (and `--report-only` would write empty reports)."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import REPO
from prefixtune.experiments import STUDIES, chosen_rates, with_rates
from prefixtune.experiments.runner import CELLS_FILE, CellStore
from prefixtune.experiments.sweep import plan


def command_flag(report_md: Path, flag: str) -> str | None:
    """FLAG's value in the command printed at the top of a report (None if absent)."""
    if not report_md.is_file():
        return None
    found = re.search(rf"^prefixtune experiment .*{re.escape(flag)} (\S+)", report_md.read_text(), re.MULTILINE)
    return found.group(1) if found else None


REPORTS = sorted(p.parent for p in (REPO / "reports").glob(f"*/{CELLS_FILE}"))


@pytest.mark.parametrize("report", REPORTS, ids=[p.name for p in REPORTS])
def test_every_planned_cell_of_a_committed_report_is_found_by_its_id(report: Path):
    done = CellStore(report / CELLS_FILE).load()
    first = next(iter(done.values()))
    study, scale_name, model = STUDIES[first["study"]], first["scale"], first["model"]
    # a study run with --epochs records it on its own cells (lines reused from another study lack it)
    epochs = next((line["scale_epochs"] for line in done.values() if "scale_epochs" in line), None)
    # lines written before the runner recorded `rates_from` lack it: the report's command says it
    rates_from = next((line["rates_from"] for line in done.values() if "rates_from" in line), None) or \
        command_flag(report / "report.md", "--rates-from")
    for task in sorted({line["task"] for line in done.values()}):
        scale = replace(study.make_scale(scale_name, task), final_epochs=epochs)
        cells = study.make_cells(task, scale)
        if rates_from:  # a study at another study's chosen rates: no sweep of its own
            rates = chosen_rates(CellStore(REPO / rates_from / CELLS_FILE).load(), rates_from)
            scale, cells = with_rates(scale, cells, rates, rates_from)
        sweeps, finals, _ = plan(cells, scale, done, model)
        planned = [c.id(scale, model) for c in sweeps + finals]
        finished = [i for i in planned if i in done]
        if scale_name in ("tiny", "cpu"):  # finished studies: every cell
            assert finished == planned
        else:  # studies in progress: at least the finished lines are still planned
            assert finished
