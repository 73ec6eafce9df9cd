"""Every study at `tiny` scale on a tiny random model: JSONL cells, report.md, PNG figures, resume."""
from __future__ import annotations

import contextlib
import json
import random
from dataclasses import replace

import pytest
import torch

torch.set_num_threads(1)  # 2 shared cores: a second thread only contends (10x slower)

from conftest import ByteTokenizer, tiny_model
from prefixtune.data import Record
from prefixtune.experiments import STUDIES, run_experiment
from prefixtune.experiments import runner
from prefixtune.experiments.report import HELD, INCONCLUSIVE, NOT_HELD, Agg, compare
from prefixtune.experiments.runner import CellStore

FOODS = ["Thai", "French", "Chinese", "Italian", "English", "Indian"]
AREAS = ["riverside", "city centre"]


def synthetic(task, split, **options):
    """Small stand-in datasets with the loaders' options (subset, scheme, train_from)."""
    rng = random.Random(f"{task}/{split}/{sorted(options.items())}")
    n = {"train": 40, "dev": 8, "test": 8}[split]
    records = []
    for i in range(n):
        food, area = rng.choice(FOODS), rng.choice(AREAS)
        if task == "xsum":
            src = f"The council in {area} said on Monday that {food} food stalls will open. " * 2
            records.append(Record(src, [f"{food} stalls open in {area}."], {"id": str(i)}))
            continue
        seen = options.get("subset", "seen") != "unseen"
        name = f"P{i}" if seen else f"Q{i}"
        records.append(Record(f"name : {name} | food : {food} | area : {area}",
                              [f"{name} serves {food} food in the {area}.", f"In the {area}, {name} has {food} food."],
                              {"id": i, "seen": seen, "category": "Food" if seen else "Artist"}))
    return records


def run(name, tmp_path, task=None, **kw):
    return run_experiment(name, task=task, scale="tiny", out=tmp_path / name, model_obj=tiny_model("llama"),
                          tokenizer=ByteTokenizer(), loader=synthetic, progress=False, **kw)


def lines_of(path):
    return [json.loads(line) for line in (path / "cells.jsonl").read_text().splitlines()]


CASES = [("lowdata", "e2e"), ("prefix-length", "e2e"), ("init", "e2e"), ("ablation", "e2e"),
         ("extrapolation", "webnlg"), ("extrapolation", "xsum"), ("main", "e2e,xsum")]


@pytest.mark.parametrize("name,task", CASES)
def test_study_runs_end_to_end_and_resumes(name, task, tmp_path):
    result = run(name, tmp_path, task)
    out = tmp_path / name
    lines = lines_of(out)
    assert result["cells"] == result["planned"] == result["ran"] == len(lines) > 0
    report = (out / "report.md").read_text()
    assert f"prefixtune experiment {name} --task {task} --scale tiny --out {out}" in report
    assert "## The paper's claims and our numbers" in report
    assert any(v in report for v in (HELD, NOT_HELD, INCONCLUSIVE))
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    for png in pngs:
        assert f"]({png.name})" in report
    for line in lines:
        assert line["id"] in report  # every cell is cited in the report
        for key in ("config", "metrics", "trainable_pct", "steps", "tokens_per_s", "elapsed_s", "hypotheses"):
            assert key in line
        assert line["config"]["train"]["method"] == line["method"]
        assert (out / line["curve"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the cell's loss curve outlives .work
        assert f"[curve]({line['curve']})" in report
        for path in line["hypotheses"].values():
            hyps = (out / path).read_text().split("\n")
            assert len(hyps) >= line["test_sizes"][next(iter(line["test_sizes"]))]
    assert [p.name for p in (out / ".work").iterdir()] == [".gitignore"]  # checkpoints are not kept

    again = run(name, tmp_path, task)
    assert again["ran"] == 0 and again["cells"] == len(lines)
    if name == "ablation":  # the study text follows the cells: tiny scale runs PREFIX-2, not length 10
        assert "PREFIX-2" in report and "PREFIX\n(length 2," in report and "length 10" not in report
    assert lines_of(out) == lines


def test_a_killed_study_resumes_and_a_torn_line_is_dropped(tmp_path, monkeypatch):
    real = runner.run_cell
    calls = []

    def dies_on_third(cell, ctx, cell_id):
        calls.append(cell_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cell, ctx, cell_id)

    monkeypatch.setattr(runner, "run_cell", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run("lowdata", tmp_path, "e2e")
    out = tmp_path / "lowdata"
    assert len(lines_of(out)) == 2
    with open(out / "cells.jsonl", "ab") as f:  # a kill in the middle of a write
        f.write(b'{"id": "torn", "metr')
    monkeypatch.setattr(runner, "run_cell", real)
    result = run("lowdata", tmp_path, "e2e")
    assert result["ran"] == result["planned"] - 2
    lines = lines_of(out)
    assert len(lines) == result["planned"] and len({l["id"] for l in lines}) == len(lines)


def test_cell_ids_are_stable_and_follow_the_config():
    from prefixtune.experiments import lowdata

    scale = lowdata.make_scale("cpu", "e2e")
    a, b = lowdata.make_cells("e2e", scale), lowdata.make_cells("e2e", scale)
    assert [c.id(scale, "m") for c in a] == [c.id(scale, "m") for c in b]
    assert len({c.id(scale, "m") for c in a}) == len(a) == 4 * 2 * 2
    from dataclasses import replace

    assert a[0].id(replace(scale, max_steps=51), "m") != a[0].id(scale, "m")
    assert a[0].id(scale, "other-model") != a[0].id(scale, "m")


def test_every_study_has_a_cpu_and_paper_plan():
    for name, study in STUDIES.items():
        for scale_name in ("cpu", "paper"):
            for task in study.DEFAULT_TASKS:
                scale = study.make_scale(scale_name, task)
                cells = study.make_cells(task, scale)
                assert cells and all(c.study == name for c in cells)
    from prefixtune.experiments import ablation, init_study, lowdata

    assert {c.train_size for c in lowdata.make_cells("e2e", lowdata.make_scale("cpu", "e2e"))} == {50, 100, 200, 500}
    paper = lowdata.make_cells("e2e", lowdata.make_scale("paper", "e2e"))
    assert len(paper) == 4 * 2 * 5 * 2  # sizes x methods x 5 samples x 2 seeds
    labels = {c.label for c in ablation.make_cells("e2e", ablation.make_scale("cpu", "e2e"))}
    assert labels == {"EMB-1", "EMB-10", "EMB-20", "INFIX-1", "INFIX-10", "INFIX-20", "PREFIX-10"}
    inits = {c.params["init"] for c in init_study.make_cells("e2e", init_study.make_scale("cpu", "e2e"))}
    assert inits == {"random", "words:table-to-text:", "words:summarize", "words:elephant", "words:divide"}


def test_store_appends_whole_lines_and_drops_a_torn_tail(tmp_path):
    store = CellStore(tmp_path / "cells.jsonl")
    store.append({"id": "a", "x": 1})
    (tmp_path / "cells.jsonl").open("ab").write(b'{"id": "b", "x"')
    assert set(CellStore(tmp_path / "cells.jsonl").load()) == {"a"}
    store.append({"id": "c", "x": 3})
    assert set(store.load()) == {"a", "c"}


def test_verdicts_are_computed_from_the_numbers():
    hi, lo = Agg([50.0, 51.0, 52.0], ["a", "b", "c"]), Agg([40.0, 41.0, 42.0], ["d", "e", "f"])
    assert compare(hi, lo)[2] == HELD
    assert compare(lo, hi)[2] == NOT_HELD
    assert compare(hi, Agg([51.2, 50.8, 51.0], list("ghi")))[2] == INCONCLUSIVE
    assert compare(hi, lo, "<")[2] == NOT_HELD
    assert compare([hi, hi], [lo, lo])[2] == HELD
    assert compare(Agg([], []), lo)[2] == INCONCLUSIVE


def test_cli_experiment_command_is_wired(tmp_path):
    from typer.testing import CliRunner

    from prefixtune.cli import app

    out = tmp_path / "init"
    result = CliRunner().invoke(app, ["experiment", "init", "--task", "e2e", "--scale", "tiny", "--out", str(out),
                                      "--report-only"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["cells"] == 0 and summary["planned"] == 5
    assert "Incomplete" in (out / "report.md").read_text()
    bad = CliRunner().invoke(app, ["experiment", "nope", "--report-only", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown study" in bad.output


@pytest.mark.parametrize("names", [["random", "table-to-text", "summarize", "elephant", "divide"],
                                   [f"a-rather-long-configuration-{i}" for i in range(9)]])
def test_bar_figure_tick_labels_do_not_overlap(tmp_path, monkeypatch, names):
    from prefixtune.experiments import figures as F, report as R

    shown = {}

    def keep_open(fig, path):  # measure the labels where they are drawn, before the figure closes
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        shown["boxes"] = [t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels() if t.get_text()]
        return path

    monkeypatch.setattr(F, "save_figure", keep_open)
    groups = {n: {"prefix": Agg([50.0, 52.0], ["a", "b"])} for n in names}
    R.bar_figure(tmp_path / "f.png", groups, "BLEU", "title")
    boxes = shown["boxes"]
    assert len(boxes) == len(names)
    for left, right in zip(boxes, boxes[1:]):
        assert not left.overlaps(right), (left, right)


def test_a_hand_written_reading_survives_regeneration(tmp_path):
    run("init", tmp_path, "e2e")
    out = tmp_path / "init"
    (out / "reading.md").write_text("At this scale the inits tie; see the table.\n")
    result = run("init", tmp_path, "e2e", report_only=True)
    assert result["ran"] == 0
    report = (out / "report.md").read_text()
    assert "## Reading" in report and "At this scale the inits tie; see the table." in report
    # after the verdicts, before the generated sections
    assert report.index("## The paper's claims") < report.index("## Reading") < report.index("## e2e:")


def test_lowdata_with_a_learning_rate_sweep_chooses_on_dev_loss_and_reuses_the_sweep_cells(tmp_path, monkeypatch):
    from dataclasses import replace

    from prefixtune.experiments import lowdata

    tiny = lowdata.make_scale("tiny", "e2e")
    swept = replace(tiny, lr_sweep={"prefix": (1e-3, 3e-2), "finetune": (1e-4, 1e-3)}, sweep_size=6,
                    early_stop_patience=1, eval_every=1)
    monkeypatch.setattr(lowdata, "make_scale", lambda scale, task: swept)
    result = run("lowdata", tmp_path)
    out = tmp_path / "lowdata"
    lines = lines_of(out)
    # 2 sizes x 2 methods; the size-6 cells are sweep cells (2 rates each), so 4 sweep + 2 more cells.
    assert len(lines) == 6 and result["cells"] == 4
    for method in ("prefix", "finetune"):
        tried = [l for l in lines if l["method"] == method and l["train_size"] == 6]
        best = min(tried, key=lambda l: (l["best_dev_loss"], l["lr"]))
        finals = [l for l in lines if l["method"] == method and l["train_size"] == 12]
        assert len(tried) == 2 and len(finals) == 1 and finals[0]["lr"] == best["lr"]
        assert all(l["stop_reason"] in ("early_stop", "step_limit") for l in tried)
    report = (out / "report.md").read_text()
    assert "## Learning rates: chosen on dev loss" in report
    assert report.count("**chosen**") == 2
    for line in lines:
        assert line["id"] in report
    again = run("lowdata", tmp_path)
    assert again["ran"] == 0


def test_short_sweep_cells_only_measure_dev_loss(tmp_path, monkeypatch):
    from dataclasses import replace

    from prefixtune.experiments import main_table as main

    tiny = main.make_scale("tiny", "e2e")
    rates = {"prefix": (1e-3, 1e-2), "finetune": (1e-4,), "finetune-top2": (1e-4,), "adapter": (1e-3,)}
    monkeypatch.setattr(main, "make_scale", lambda scale, task: replace(tiny, lr_sweep=rates, sweep_max_steps=1))
    run("main", tmp_path, "e2e")
    lines = lines_of(tmp_path / "main")
    sweeps = [l for l in lines if l["tags"].get("sweep")]
    assert len(sweeps) == 6 and all(l["metrics"] == {} and l["steps"] == 1 for l in sweeps)
    finals = [l for l in lines if not l["tags"].get("sweep")]
    assert len(finals) == 5 and all(l["metrics"]["test"] for l in finals)


def test_a_finished_cells_trained_module_is_gone_before_the_next_cell_trains(tmp_path, monkeypatch):
    """Even when the cell left it in a reference cycle and no automatic collection runs: pyparsing's caught
    exceptions do this on matplotlib's first import (the loss curve), their tracebacks holding `train`'s frame,
    and a process holding a model runs its full collection rarely (memory.py)."""
    import gc
    import weakref

    from prefixtune import tracking
    from prefixtune import train as train_module

    real_curve, real_train = tracking.write_loss_curve, train_module.train

    def curve_after_a_caught_exception(*args, **kwargs):
        try:
            raise ValueError("caught deep inside training")
        except ValueError as e:
            kept = e  # noqa: F841  its traceback holds this frame (and train's), this frame holds it: a cycle
        return real_curve(*args, **kwargs)

    trained, alive_at_start = [], []

    def train(*args, **kwargs):
        alive_at_start.append(sum(ref() is not None for ref in trained))
        result = real_train(*args, **kwargs)
        trained.append(weakref.ref(result.method.module))
        return result

    monkeypatch.setattr(tracking, "write_loss_curve", curve_after_a_caught_exception)
    monkeypatch.setattr(train_module, "train", train)
    gc.disable()
    try:
        run("main", tmp_path, "e2e")
    finally:
        gc.enable()
    assert len(trained) == 5  # prefix, finetune, FT-top2 and two adapters: each cell's own module
    assert alive_at_start == [0] * 5 and all(ref() is None for ref in trained)


def test_release_memory_frees_cycles_and_trims_only_glibc(monkeypatch):
    import gc
    import weakref

    from prefixtune import memory

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    del a, b
    gc.disable()
    try:
        assert ref() is not None
        memory.release_memory()
        assert ref() is None
    finally:
        gc.enable()
    memory._malloc_trim.cache_clear()
    monkeypatch.setattr(memory.sys, "platform", "darwin")  # no glibc: the collection alone
    try:
        assert memory._malloc_trim() is None
        memory.release_memory()
    finally:
        memory._malloc_trim.cache_clear()


def test_two_workers_never_run_the_same_cell(tmp_path):
    from prefixtune.experiments.runner import claim

    path = tmp_path / ".work" / "abc.lock"
    with claim(path) as first:
        with claim(path) as second:
            assert (first, second) == (True, False)
    with claim(path) as again:
        assert again


def test_converged_scale_exists_only_for_the_studies_sized_for_it(tmp_path):
    with pytest.raises(ValueError, match="no converged scale"):
        run_experiment("init", scale="converged", out=tmp_path / "x", report_only=True)


def test_every_study_follows_the_study_protocol():
    from prefixtune.experiments.study import Study

    for name, study in STUDIES.items():
        assert isinstance(study, Study), name
        assert study.NAME == name and isinstance(study.MULTI_TASK, bool)


def test_a_reader_waits_for_an_append_in_progress_instead_of_cutting_it(tmp_path):
    import fcntl
    import threading

    store = CellStore(tmp_path / "cells.jsonl")
    store.append({"id": "a"})
    with open(store.path, "ab") as f:  # another worker, halfway through writing its line
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(b'{"id": "b", ')
        f.flush()
        seen = {}
        reader = threading.Thread(target=lambda: seen.update(store.load()))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive()  # blocked on the lock, not truncating the half-written line
        f.write(b'"x": 1}\n')
        f.flush()
    reader.join(5)
    assert set(seen) == {"a", "b"}


def test_main_report_sets_every_e2e_metric_beside_the_papers_table_1():
    from prefixtune.experiments.main_table import e2e_in_full

    metrics = {"BLEU": 61.23, "NIST": 7.891, "METEOR": 40.0, "ROUGE_L": 65.0, "CIDEr": 1.8, "SER": 12.5}
    lines = [{"id": f"c{i}", "label": "prefix", "tags": {}, "metrics": {"test": dict(metrics, BLEU=61.23 + i)},
              "primary": {}} for i in range(2)]
    table = e2e_in_full(lines)
    prefix_row = next(row for row in table.splitlines() if row.startswith("| prefix |"))
    assert prefix_row == "| prefix | 61.7 / 69.7 | 7.89 / 8.81 | 40.0 / 46.1 | 65.0 / 71.4 | 1.80 / 2.49 | 12.5 |"
    finetune_row = next(row for row in table.splitlines() if row.startswith("| finetune |"))
    assert finetune_row.startswith("| finetune | – / 68.2 |")  # no cells yet: a dash, the paper's number beside


def test_epochs_override_changes_only_the_final_cells_and_a_study_reuses_another_studys_sweep(tmp_path):
    """`--epochs 10` gives the final runs a new epoch limit (new ids) while the step-bounded sweep keeps its ids,
    so `--reuse-from` the 5-epoch study copies the sweep lines and only the finals are left to run."""
    from dataclasses import replace

    from prefixtune.experiments import copy_reused, main_table
    from prefixtune.experiments.sweep import plan

    s5 = main_table.make_scale("converged", "e2e")
    s10 = replace(s5, final_epochs=10)
    cells = main_table.make_cells("e2e", s5)
    sweeps5, finals5, _ = plan(cells, s5, {}, "m")
    sweeps10, finals10, _ = plan(cells, s10, {}, "m")
    assert finals5 == finals10 == []  # no rate is chosen before the sweep has run
    assert [c.id(s5, "m") for c in sweeps5] == [c.id(s10, "m") for c in sweeps10]
    # the 5-epoch study's finished sweep: made-up dev losses, the middle rate best for every method
    old = {}
    for c in sweeps5:
        rates = s5.lr_sweep[c.method]
        loss = abs(rates.index(c.params["lr"]) - len(rates) // 2) + 1.0
        old[c.id(s5, "m")] = {"id": c.id(s5, "m"), "best_dev_loss": loss}
    store = CellStore(tmp_path / "cells.jsonl")
    copied = copy_reused(store, lambda done: [c.id(s10, "m") for c in sum(plan(cells, s10, done, "m")[:2], [])],
                         old, tmp_path)
    assert copied == len(sweeps5) and set(store.load()) == set(old)
    _, finals10, _ = plan(cells, s10, store.load(), "m")
    _, finals5, _ = plan(cells, s5, store.load(), "m")
    assert [c.params["epochs"] for c in finals10] == [10] * len(main_table.METHODS)
    assert all("epochs" not in c.params for c in finals5)
    assert not {c.id(s10, "m") for c in finals10} & {c.id(s5, "m") for c in finals5}
    assert [c.params["lr"] for c in finals10] == [c.params["lr"] for c in finals5]
    # the override shows in the scale's description, and a bad value is refused before anything runs
    assert s10.describe()["epochs"] == 10
    with pytest.raises(ValueError, match="--epochs"):
        run_experiment("main", "e2e", "converged", tmp_path / "x", epochs=0)


def test_rates_from_another_study_replace_the_sweep_and_a_complete_plan_frees_the_worker(tmp_path, monkeypatch):
    """`--rates-from`: every configuration trains at the rate the other study's sweep chose, with no sweep; a
    worker whose remaining cells are all claimed by others returns at once when the plan cannot grow."""
    from prefixtune.experiments import chosen_rates, main_table, with_rates
    from prefixtune.experiments.sweep import plan

    lines = {f"f{i}": {"id": f"f{i}", "label": label, "lr": 1e-3 * (i + 1), "tags": {"config": label}}
             for i, label in enumerate(main_table.METHODS)}
    lines["s"] = {"id": "s", "label": "prefix", "lr": 9.0, "tags": {"config": "prefix", "sweep": True}}
    rates = chosen_rates(lines, "other")
    assert rates == {label: 1e-3 * (i + 1) for i, label in enumerate(main_table.METHODS)}  # sweep line ignored
    scale = main_table.make_scale("converged", "webnlg")
    scale, cells = with_rates(scale, main_table.make_cells("webnlg", scale), rates, "reports/main-e2e")
    sweeps, finals, groups = plan(cells, scale, {}, "m")
    assert sweeps == [] and groups == [] and [c.params["lr"] for c in finals] == list(rates.values())
    assert "reports/main-e2e" in scale.describe()["lr"]
    with pytest.raises(ValueError, match="more than one rate"):
        chosen_rates({**lines, "g": {**lines["f0"], "id": "g", "lr": 5.0}}, "other")
    with pytest.raises(ValueError, match="no rate for adapter-3%"):
        with_rates(scale, cells, {k: v for k, v in rates.items() if k != "adapter-3%"}, "x")

    # run_cells: the only cell left is claimed by another worker; a complete plan returns without sleeping
    ctx = runner.Context(tmp_path, scale, "m", None, None, None, None, "cmd", False)
    monkeypatch.setattr(runner, "claim", lambda path: _held())
    monkeypatch.setattr(runner.time, "sleep", lambda s: pytest.fail("waited for another worker's cell"))
    assert runner.run_cells(lambda done: finals[:1], ctx, "x", complete=lambda done: True) == {}



def test_a_study_at_another_studys_rates_records_where_they_came_from(tmp_path):
    """Each line of a `--rates-from` study names the study whose sweep chose its rate (the runner's scale is
    the one with_rates returns: it once took the scale before it, and the lines said nothing)."""
    from prefixtune.experiments import main_table

    source = tmp_path / "rates"
    source.mkdir()
    (source / "cells.jsonl").write_text("".join(json.dumps({"id": f"f{i}", "label": label, "lr": 1e-3,
                                                            "tags": {"config": label}}) + "\n"
                                                for i, label in enumerate(main_table.METHODS)))
    run("main", tmp_path, "e2e", rates_from=source)
    lines = lines_of(tmp_path / "main")
    assert len(lines) == len(main_table.METHODS) and {line.get("rates_from") for line in lines} == {str(source)}
    assert {line["lr"] for line in lines} == {1e-3}


@contextlib.contextmanager
def _held():
    yield False


def test_a_beam_subset_evaluation_also_scores_the_scales_own_decoding_of_the_same_inputs(tmp_path, monkeypatch):
    """DART at converged scale decodes the whole test split greedily and a fixed subset at beam 5; the subset's
    greedy outputs are scored too, so the report can say what greedy decoding costs on the same inputs."""
    from dataclasses import replace

    from prefixtune.experiments import main_table as main
    from prefixtune.experiments.runner import test_indices

    tiny = replace(main.make_scale("tiny", "e2e"), test_size=None, beam_subset={"beams": 2, "test_size": 3})
    monkeypatch.setattr(main, "make_scale", lambda scale, task: tiny)
    run("main", tmp_path, "e2e")
    line = next(line for line in lines_of(tmp_path / "main") if line["label"] == "prefix")
    assert set(line["metrics"]) == {"test", main.BEAM_SUBSET, f"{main.BEAM_SUBSET}:scale-decoding"}
    assert line["test_sizes"] == {"test": 8, main.BEAM_SUBSET: 3}
    greedy = (tmp_path / "main" / line["hypotheses"]["test"]).read_text().split("\n")
    records = synthetic("e2e", "test")
    keep = test_indices(len(records), 3)
    expected = runner.score("e2e", [greedy[i] for i in keep], [records[i] for i in keep], False)
    assert line["metrics"][f"{main.BEAM_SUBSET}:scale-decoding"] == expected


def test_table1_summary_computes_the_papers_claims_on_the_average_over_datasets(tmp_path):
    """`prefixtune experiment table1`: BLEU averaged over the datasets where both sides have a cell, the
    extrapolation claim on WebNLG U, and a partial verdict says how many datasets it stands on."""
    from typer.testing import CliRunner

    from prefixtune.cli import app
    from prefixtune.experiments import table1

    def line(task, label, **metrics):
        return {"id": f"{task}-{label}", "label": label, "tags": {"config": label}, "metrics": {"test": metrics},
                "primary": {"test": metrics.get("BLEU")}}

    bleu = {"prefix": 60.0, "finetune": 59.5, "finetune-top2": 50.0, "adapter-0.1%": 58.0, "adapter-3%": 61.0}
    sources = {}
    for task in ("e2e", "webnlg"):
        store = CellStore(tmp_path / task / "cells.jsonl")
        for label, value in bleu.items():
            extra = {"BLEU_seen": value + 5, "BLEU_unseen": value - (20 if label == "finetune" else 5)} \
                if task == "webnlg" else {}
            store.append(line(task, label, BLEU=value + (2 if task == "e2e" else 0), **extra))
        store.append({**line(task, "prefix", BLEU=1.0), "id": f"{task}-sweep", "tags": {"sweep": True}})
        sources[task] = str(tmp_path / task)
    sources["dart"] = str(tmp_path / "dart")  # not run yet
    result = table1.write_summary(tmp_path / "out", sources)
    assert result["cells"] == {"e2e": 5, "webnlg": 5, "dart": 0}  # sweep lines are not Table 1 cells
    report = (tmp_path / "out" / "report.md").read_text()
    verdicts = json.loads((tmp_path / "out" / "table1.json").read_text())["verdicts"]
    by_claim = {v["claim"].split(":")[0]: v for v in verdicts}
    adapter = by_claim["prefix beats the same-budget adapter (0.1%)"]
    assert adapter["verdict"] == f"{HELD} (on 2 of 3 datasets so far)" and "difference +2.00" in adapter["ours"]
    assert by_claim["prefix beats FT-top2"]["verdict"].startswith(HELD)
    assert by_claim["prefix (0.1%) comparable to fine-tuning"]["verdict"].startswith(HELD)
    assert by_claim["webnlg"]["verdict"] == HELD and "difference +15.50" in by_claim["webnlg"]["ours"]
    assert "| prefix | 62.0 / 69.7 | 65.0 / 62.9 | 55.0 / 45.6 | 60.0 / 55.1 | – / 46.4 | – (2 of 3) / 57.1 |" in report
    assert (tmp_path / "out" / "table1.png").read_bytes()[:4] == b"\x89PNG"
    # the command line writes the same report
    out = CliRunner().invoke(app, ["experiment", "table1", "--out", str(tmp_path / "cli")])
    assert out.exit_code == 0 and (tmp_path / "cli" / "report.md").is_file()


def test_table1_refuses_two_final_cells_of_one_method_rather_than_averaging_them(tmp_path):
    """A study folder holding a method's final cell twice (another --epochs run left beside it): Table 1 would
    average the two into one number; it names both instead, and writes nothing."""
    from prefixtune.experiments import table1

    store = CellStore(tmp_path / "e2e" / "cells.jsonl")
    for epochs, bleu in ((5.0, 60.0), (10.0, 64.0)):
        store.append({"id": f"prefix-{epochs:g}", "label": "prefix", "scale": "converged", "scale_epochs": epochs,
                      "tags": {"config": "prefix"}, "metrics": {"test": {"BLEU": bleu}}, "primary": {"test": bleu}})
    with pytest.raises(ValueError, match=r"2 final cells of prefix: prefix-5 \(scale converged, scale_epochs 5.0\); "
                                         r"prefix-10 \(scale converged, scale_epochs 10.0\)"):
        table1.write_summary(tmp_path / "out", {"e2e": str(tmp_path / "e2e")})
    assert not (tmp_path / "out").exists()


def test_table1_refuses_a_studys_options_it_would_ignore(tmp_path):
    from typer.testing import CliRunner

    from prefixtune.cli import app

    for args in (["--task", "dart"], ["--scale", "converged", "--epochs", "10"]):
        result = CliRunner().invoke(app, ["experiment", "table1", "--out", str(tmp_path / "t1"), *args])
        assert result.exit_code == 2 and "do not apply" in result.output, result.output
        assert args[0] in result.output
    assert not (tmp_path / "t1").exists()


def test_report_only_with_other_settings_than_the_cells_refuses_and_keeps_the_report(tmp_path):
    """A study run with `--epochs 10` regenerated by `--report-only` without it plans other cell ids: it must not
    overwrite report.md with "0 of N cells" (and its advice to re-run them all), but say which settings the cells
    were run with."""
    from prefixtune.experiments import init_study
    from prefixtune.experiments.sweep import plan

    out = tmp_path / "init"
    scale = replace(init_study.make_scale("tiny", "e2e"), final_epochs=10)
    store = CellStore(out / "cells.jsonl")
    for cell in plan(init_study.make_cells("e2e", scale), scale, {}, "smollm2-135m")[1]:
        store.append({"id": cell.id(scale, "smollm2-135m"), "study": "init", "task": "e2e", "scale": "tiny",
                      "scale_epochs": 10.0, "model": "smollm2-135m", "label": cell.label})
    (out / "report.md").write_text("the 10-epoch report\n")
    with pytest.raises(ValueError, match=r"holds 5 cells of init but none of .*scale_epochs 10"):
        run_experiment("init", "e2e", "tiny", out, report_only=True, progress=False)
    assert (out / "report.md").read_text() == "the 10-epoch report\n"
    # another study's cells in the folder are no reason to refuse: its report is this study's, empty
    other = tmp_path / "other"
    CellStore(other / "cells.jsonl").append({"id": "x", "study": "lowdata", "task": "e2e"})
    assert run_experiment("init", "e2e", "tiny", other, report_only=True, progress=False)["cells"] == 0


def test_a_report_regenerated_without_reuse_from_still_prints_the_command_that_made_it(tmp_path):
    """Cells copied by `--reuse-from` record where they came from, so `--report-only` (or a rerun) without the
    option prints the command the study was made by; with the source gone, the command that runs as typed."""
    import shlex
    import shutil

    source = tmp_path / "source"
    assert run("init", source, "e2e")["ran"] > 0
    made = run("init", tmp_path / "copy", "e2e", reuse_from=source / "init")
    assert made["ran"] == 0 and made["cells"] > 0  # every cell copied, none run
    lines = lines_of(tmp_path / "copy" / "init")
    assert {line["reused_from"] for line in lines} == {str(source / "init")}
    flag = f"--reuse-from {shlex.quote(str(source / 'init'))}"
    report = tmp_path / "copy" / "init" / "report.md"
    assert flag in report.read_text()
    report.write_text("stale\n")
    run("init", tmp_path / "copy", "e2e", report_only=True)
    assert flag in report.read_text()
    shutil.rmtree(source)  # the printed command must run as typed: a --reuse-from that holds nothing would fail
    run("init", tmp_path / "copy", "e2e", report_only=True)
    assert "--reuse-from" not in report.read_text()


@pytest.mark.parametrize("args,message", [(["--epochs", "inf"], "--epochs must be a number > 0"),
                                          (["--threads", "-1"], "--threads must be >= 1")])
def test_cli_experiment_refuses_bad_numbers_in_one_line(tmp_path, args, message):
    from typer.testing import CliRunner

    from prefixtune.cli import app

    result = CliRunner().invoke(app, ["experiment", "init", "--task", "e2e", "--scale", "tiny", "--out",
                                      str(tmp_path / "init"), "--report-only", *args])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert message in result.output and "Traceback" not in result.output


def test_table1_without_any_source_cells_is_an_error_not_a_report_of_dashes(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from prefixtune.cli import app

    monkeypatch.chdir(tmp_path)  # no reports/main-* here: e.g. run from another directory
    result = CliRunner().invoke(app, ["experiment", "table1", "--out", str(tmp_path / "table1")])
    assert result.exit_code == 2, result.output
    assert "no finished cells in reports/main-e2e-10epochs" in result.output
    assert not (tmp_path / "table1").exists()


def test_a_scales_decode_dtype_reaches_the_engine_and_enters_the_id_only_when_set(tmp_path, monkeypatch):
    """DART at converged scale decodes in bf16 (about 3x faster here): every decoding of a cell runs in the
    scale's dtype, its cell id names it, and a scale that decodes in the model's dtype keeps its old ids."""
    from dataclasses import replace

    from prefixtune.experiments import main_table as main
    from prefixtune.engine import offline
    from prefixtune.experiments import scales

    assert scales.base_scale("converged", "dart").decode_dtype == "bf16"
    assert scales.base_scale("converged", "webnlg").decode_dtype == "model"
    tiny = replace(main.make_scale("tiny", "e2e"), beam_subset={"beams": 2, "test_size": 2})
    cell = main.make_cells("e2e", tiny)[0]
    assert "dtype" not in cell.config(tiny, "m")["decoding"]  # E2E/WebNLG's finished cells keep their ids
    bf16 = replace(tiny, decode_dtype="bf16")
    assert cell.config(bf16, "m")["decoding"]["dtype"] == "bf16" and cell.id(bf16, "m") != cell.id(tiny, "m")

    seen = []
    real = offline.decode_ids

    def spy(model, tokenizer, sequences, prefixes, config=None, **kwargs):
        seen.append(config.dtype)
        return real(model, tokenizer, sequences, prefixes, config, **kwargs)

    monkeypatch.setattr(offline, "decode_ids", spy)
    monkeypatch.setattr(main, "make_scale", lambda scale, task: replace(bf16, decode_dtype="fp32"))
    run("main", tmp_path, "e2e")
    assert seen and set(seen) == {"fp32"}  # the whole split and the beam subset, every method
