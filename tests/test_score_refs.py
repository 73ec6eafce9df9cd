"""`score --refs` takes plain text (or an E2E .csv): a JSON/JSONL or CSV-looking file is refused with the
expected format, where it was once scored line by line as raw text (BLEU 10.4 where the answer was 100)."""
from __future__ import annotations

import json

import pytest

from prefixtune.metrics.command import score_command

HYPS = ["Aromi serves Thai food in the city centre.", "Zizzi is a pub by the riverside near the bridge."]


@pytest.fixture
def hyp(tmp_path):
    path = tmp_path / "hyp.txt"
    path.write_text("\n".join(HYPS) + "\n")
    return path


def run(task, hyp, refs, capsys):
    code = score_command(task, hyp, refs, "test", None, True)
    return code, capsys.readouterr()


@pytest.mark.parametrize("task", ["xsum", "e2e"])
def test_jsonl_references_are_refused_with_the_expected_format(tmp_path, hyp, capsys, task):
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"source": "x", "target": h}) + "\n" for h in HYPS))
    code, out = run(task, hyp, refs, capsys)
    assert code == 2 and out.out == ""
    line = out.err.strip()
    assert line.startswith("error: ") and "\n" not in line
    assert "looks like JSON" in line and "one reference per line" in line and "blank line" in line


def test_a_csv_in_a_text_file_is_refused(tmp_path, hyp, capsys):
    refs = tmp_path / "refs.txt"
    refs.write_text("mr,ref\n" + "".join(f'"name[X]","{h}"\n' for h in HYPS[:1]))
    code, out = run("xsum", hyp, refs, capsys)
    assert code == 2 and "looks like a CSV" in out.err and "E2E CSV named .csv" in out.err


def test_json_hypotheses_are_refused_too(tmp_path, capsys):
    hyp = tmp_path / "hyp.jsonl"
    hyp.write_text("".join(json.dumps({"prediction": h}) + "\n" for h in HYPS))
    refs = tmp_path / "refs.txt"
    refs.write_text("\n".join(HYPS) + "\n")
    code, out = run("xsum", hyp, refs, capsys)
    assert code == 2 and "hypothesis file" in out.err and "looks like JSON" in out.err


def test_plain_references_with_brackets_and_commas_still_score(tmp_path, hyp, capsys):
    refs = tmp_path / "refs.txt"
    refs.write_text("\n".join(HYPS) + "\n")
    code, out = run("xsum", hyp, refs, capsys)
    assert code == 0 and json.loads(out.out)["ROUGE_1"] == pytest.approx(100.0)
    refs.write_text("[Aromi], a Thai place, is in the centre.\nZizzi, a pub.\n")
    assert run("xsum", hyp, refs, capsys)[0] == 0
