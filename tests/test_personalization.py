"""`prefixtune experiment personalization` at tiny scale, end to end on a tiny random model saved to disk: real
`prefixtune train` and `prefixtune serve` processes, WebNLG categories as users (needs the shared data)."""
from __future__ import annotations

import json

import pytest

from conftest import error_line, invoke
from prefixtune.experiments import personalization
from prefixtune.experiments.personalization import OUTPUTS, RESULTS, SCALES, SHARED


@pytest.fixture(scope="module")
def study(tiny_dir, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("personalization")
    summary = personalization.run("tiny", out, str(tiny_dir), data_root, threads=1, progress=False)
    return out, summary, json.loads((out / RESULTS).read_text())


def webnlg(split, data_root, **options):
    from prefixtune.data import load_task

    return load_task("webnlg", split, data_root, **options)


def test_each_user_trains_only_on_its_own_categorys_rows(study, data_root):
    out, _, results = study
    pairs = {}
    for record in webnlg("train", data_root):
        for reference in record.references:
            pairs.setdefault(record.meta["category"], set()).add((record.source, reference))
    rows = [json.loads(line) for line in (out / ".work" / "users.jsonl").read_text().splitlines()]
    users = sorted({row["user"] for row in rows})
    assert len(users) == SCALES["tiny"].categories
    for row in rows:
        assert (row["source"], row["target"]) in pairs[row["user"]]
        others = [c for c in users if c != row["user"]]
        assert not any((row["source"], row["target"]) in pairs[c] for c in others)
    # the joint job saw each user's rows and no one else's, and trained every user its steps
    for summary in results["training"]["joint"]["users"]:
        assert summary["examples"] == sum(row["user"] == summary["user"] for row in rows) == SCALES["tiny"].train_size
        assert summary["steps"] == SCALES["tiny"].steps
    # the joint job's prefix of a user is the one a separate run on that user's rows alone trains: within 1e-5 of
    # the largest |P| on the tiny model, as docs/users.md states (measured about 1e-7)
    assert results["training"]["max_rel_diff_joint_vs_separate"] < 1e-5
    assert set(results["training"]["separate"]["runs"]) == set(users)


def test_the_heat_map_decodes_every_prefix_on_every_categorys_test_entries(study, data_root):
    out, summary, results = study
    users = list(results["data"])
    bleu = results["heatmap"]["bleu"]
    assert list(bleu) == [*users, SHARED] and all(list(row) == users for row in bleu.values())
    lines = [json.loads(line) for line in (out / OUTPUTS).read_text().splitlines()]
    assert [(line["prefix"], line["category"]) for line in lines] == [(p, c) for p in [*users, SHARED] for c in users]
    category_of = {r.meta["eid"]: r.meta["category"] for r in webnlg("test", data_root, subset="seen")}
    for line in lines:
        assert len(line["hypotheses"]) == len(line["entries"]) == SCALES["tiny"].test_size
        assert {category_of[e] for e in line["entries"]} == {line["category"]}
        assert bleu[line["prefix"]][line["category"]] == line["bleu"]
    # the same entries of a category for every prefix: the diagonal is comparable with the shared row
    entries = {(line["prefix"], line["category"]): line["entries"] for line in lines}
    assert all(entries[(p, c)] == entries[(SHARED, c)] for p in users for c in users)
    # and the prefixes matter: the same entries decode differently under different prefixes
    outputs = {(line["prefix"], line["category"]): line["hypotheses"] for line in lines}
    assert any(outputs[(users[0], c)] != outputs[(SHARED, c)] for c in users)
    assert summary["users"] == len(users)
    report = (out / "report.md").read_text()
    assert "prefixtune experiment personalization --scale tiny" in report
    assert (out / "heatmap.png").stat().st_size > 0


def test_served_in_mixed_batches_equals_each_row_alone(study):
    _, summary, results = study
    mixed = results["serving"]["mixed"]
    assert mixed["requests"] == SCALES["tiny"].serve_size * SCALES["tiny"].categories
    assert mixed["ok"] == mixed["requests"]
    assert mixed["equal_alone"] == mixed["requests"] == summary["served_equal_alone"]
    assert all(row["served"] == row["alone"] for row in mixed["rows"])
    # not trivially equal: the users' prefixes give different outputs
    assert len({row["served"] for row in mixed["rows"]}) > 1


def test_deleting_and_adding_a_user_while_requests_run_leaves_the_others_unchanged(study):
    out, _, results = study
    churn = results["serving"]["churn"]
    assert churn["delete_status"] == 200 and churn["add_status"] == 201
    assert churn["others"] == SCALES["tiny"].serve_size * (SCALES["tiny"].categories - 1)
    assert churn["unchanged"] == churn["others"]
    assert churn["added_equal_alone"] == churn["added_requests"] == SCALES["tiny"].serve_size
    assert churn["deleted_statuses"] == [404]
    # the added user answers with its own prefix: the shared prefix's outputs in the heat map, on the same entries
    lines = [json.loads(line) for line in (out / OUTPUTS).read_text().splitlines()]
    shared = next(line for line in lines if (line["prefix"], line["category"]) == (SHARED, churn["deleted"]))
    assert [row["served"] for row in churn["added_rows"]] == shared["hypotheses"][: len(churn["added_rows"])]


def test_report_only_rewrites_the_report_with_the_hand_written_reading(study):
    out, _, _ = study
    (out / "reading.md").write_text("**Own beats shared** in this tiny run, or not.")
    result = invoke("experiment", "personalization", "--scale", "tiny", "--out", out, "--report-only")
    assert result.exit_code == 0, result.output
    assert "**Own beats shared** in this tiny run" in (out / "report.md").read_text()


def test_an_unknown_scale_or_an_empty_folder_is_one_error_line(tmp_path):
    assert "scales tiny, cpu" in error_line(invoke("experiment", "personalization", "--scale", "paper",
                                                   "--out", tmp_path / "p"))
    assert "no finished study" in error_line(invoke("experiment", "personalization", "--out", tmp_path / "q",
                                                    "--report-only"))
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()


@pytest.mark.parametrize("option", [["--task", "e2e"], ["--epochs", "3"], ["--reuse-from", "reports/lowdata"],
                                    ["--rates-from", "reports/lowdata"], ["--ray", "local"]])
def test_an_option_of_the_grid_studies_is_refused_not_ignored(tmp_path, option):
    # the study has no tasks, epochs, cells or Ray tasks: these options used to be dropped, and the study ran
    line = error_line(invoke("experiment", "personalization", "--scale", "tiny", "--out", tmp_path / "p", *option))
    assert option[0] in line and "do not apply" in line
    assert not (tmp_path / "p").exists()


def test_a_wrong_model_is_one_error_line_and_nothing_is_written(tmp_path, data_root):
    # it used to write OUT/.work, start a `prefixtune train` process and exit 1 with that process's output
    line = error_line(invoke("experiment", "personalization", "--scale", "tiny", "--out", tmp_path / "p",
                             "--model", tmp_path / "no-such-model", "--data-dir", data_root))
    assert "model directory not found" in line and "no-such-model" in line
    assert not (tmp_path / "p").exists()


def test_a_failed_training_process_is_one_error_line_and_leaves_no_work(tmp_path, tiny_dir, data_root, monkeypatch):
    from types import SimpleNamespace

    def failing_run(*args, **kw):  # as benchmarks/train_many.py's `run` reports a process that failed
        raise SystemExit("error: train --data x.jsonl failed:\nTraceback (most recent call last):\n"
                         "error: the loss is nan at step 1\npeak_rss_kb 1234\n")

    monkeypatch.setattr(personalization, "train_many_module", lambda: SimpleNamespace(run=failing_run))
    line = error_line(invoke("experiment", "personalization", "--scale", "tiny", "--out", tmp_path / "p",
                             "--model", tiny_dir, "--data-dir", data_root))
    assert line.endswith("failed: the loss is nan at step 1"), line
    assert not (tmp_path / "p").exists()


def unserved_copy(study, tmp_path):
    """A copy of the study as a run killed while serving leaves it: results.json without the serving stage."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(study[0], out)
    results = json.loads((out / RESULTS).read_text())
    del results["serving"]
    (out / RESULTS).write_text(json.dumps(results))
    return out


def trains_again(*args, **kw):
    raise RuntimeError("trains again")


def test_a_killed_run_of_other_settings_leaves_no_stages_the_work_does_not_hold(study, tmp_path, tiny_dir, data_root,
                                                                                monkeypatch):
    out = unserved_copy(study, tmp_path)

    def killed(*args, **kw):  # the other run is killed while it trains (its work already wiped)
        raise KeyboardInterrupt

    monkeypatch.setattr(personalization, "train_all", killed)
    with pytest.raises(KeyboardInterrupt):  # another model (the same one by another path): starts again
        personalization.run("tiny", out, str(tiny_dir) + "/.", data_root, progress=False)
    # results.json used to keep the first run's stages, so a re-run of it served the killed run's work as its own
    assert "training" not in json.loads((out / RESULTS).read_text())
    monkeypatch.setattr(personalization, "train_all", trains_again)
    with pytest.raises(RuntimeError, match="trains again"):
        personalization.run("tiny", out, str(tiny_dir), data_root, progress=False)


def test_a_study_whose_work_folder_is_gone_trains_again(study, tmp_path, tiny_dir, data_root, monkeypatch):
    import shutil

    out = unserved_copy(study, tmp_path)
    shutil.rmtree(out / ".work")  # it used to stop with "No such file or directory: OUT/.work/joint/store"
    monkeypatch.setattr(personalization, "train_all", trains_again)
    with pytest.raises(RuntimeError, match="trains again"):
        personalization.run("tiny", out, str(tiny_dir), data_root, progress=False)


def test_an_out_that_is_a_file_is_one_error_line(tmp_path, tiny_dir, data_root):
    (tmp_path / "notes.txt").write_text("mine")  # it used to be a NotADirectoryError traceback, once the data loaded
    line = error_line(invoke("experiment", "personalization", "--scale", "tiny", "--out", tmp_path / "notes.txt",
                             "--model", tiny_dir, "--data-dir", data_root))
    assert "notes.txt" in line and "is a file" in line
    assert (tmp_path / "notes.txt").read_text() == "mine"
