"""`eval` keeps its decoding: hypotheses are written first, a metric that cannot score the data is skipped
with a warning naming it, and only when no metric could run does it fail."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from prefixtune.cli import app
from prefixtune.data import Record

# MRs with an attribute that E2E (and so SER) does not know: the user's own data in E2E's CSV form
OWN_TEST = ('mr,ref\n"name[Aromi], colour[red]",Aromi is red.\n"name[Zizzi], colour[blue]",Zizzi is blue.\n'
            '"name[Zizzi], colour[blue]",Zizzi is a blue place.\n')


def test_eval_skips_a_metric_that_cannot_score_the_data_and_keeps_the_rest(tiny_dir, tmp_path):
    from prefixtune.models import load_base_model, model_spec
    from prefixtune.prefix import group_width, groups_of
    from prefixtune.prefix_file import save_prefix

    spec = model_spec(load_base_model(str(tiny_dir))[0])
    torch.manual_seed(0)
    prefix = save_prefix(tmp_path / "p.safetensors", {g: torch.randn(2, group_width(spec, n))
                                                      for g, n in groups_of(spec).items()}, spec, "tiny")
    (tmp_path / "data" / "e2e").mkdir(parents=True)
    (tmp_path / "data" / "e2e" / "testset_w_refs.csv").write_text(OWN_TEST)
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, [str(a) for a in (
        "eval", "--model", tiny_dir, "--prefix", prefix, "--data-dir", tmp_path / "data", "--max-new-tokens", 3,
        "--out-dir", out)])
    assert result.exit_code == 0, result.output
    assert "warning: SER skipped: SER: unknown E2E attribute 'colour'" in result.stderr
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert "SER" not in scores and {"sacreBLEU", "BLEU", "NIST"} <= set(scores)
    assert len((out / "hypotheses.txt").read_text().splitlines()) == 2
    assert set(json.loads((out / "scores.json").read_text())) == set(scores)


def test_score_records_fails_only_when_no_metric_could_run():
    from prefixtune.evaluate import score_records
    from prefixtune.metrics import MetricsError

    records = [Record("name : Aromi", ["Aromi is red."]), Record("name : Zizzi", ["Zizzi is blue."])]
    skipped: list[str] = []
    scores = score_records("xsum", ["Aromi is red.", "Zizzi is blue."], records, skipped=skipped)
    assert scores["ROUGE_1"] == pytest.approx(100.0) and skipped == []
    with pytest.raises(MetricsError, match="no metric could score these hypotheses: sacreBLEU skipped"):
        score_records("xsum", ["only one"], records, skipped=[])
    with pytest.raises(MetricsError):  # without a list, a failing metric raises as before
        score_records("e2e", ["a"], records)


def test_the_official_suite_skips_metric_by_metric(monkeypatch):
    from prefixtune.metrics import MetricsError, score
    from prefixtune.metrics import java

    def no_java():
        raise MetricsError("Java not found")

    monkeypatch.setattr(java, "java_executable", no_java)
    monkeypatch.setattr("prefixtune.metrics.coco.java_executable", no_java)
    skipped: list[str] = []
    scores = score("e2e", ["Aromi is red."], [["Aromi is red."]], [{"mr": "name[Aromi], colour[red]"}],
                   skipped=skipped)
    assert set(scores) == {"BLEU", "NIST"}
    assert skipped[0].startswith("METEOR, ROUGE_L, CIDEr skipped: Java not found") and skipped[1].startswith("SER")
