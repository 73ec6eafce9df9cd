"""Scorers against hand-computed values on tiny inputs, plus official-script equality on the E2E test set.

Hand values: BLEU = BP * (p1 p2 p3 p4)^(1/4); NIST info(w) = log2(#words / #w) over all references,
length penalty exp(-beta log(ratio)^2) with beta = -ln(0.5) / ln(1.5)^2; METEOR 1.5 en parameters
(alpha .85, beta .2, gamma .6, delta .75); TER = edits / average reference length.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil

import pytest

from prefixtune.metrics import MetricsError, read_references, score
from prefixtune.metrics.command import score_command
from prefixtune.metrics.dart import normalize as dart_normalize
from prefixtune.metrics.mteval import bleu_nist, tokenize_perl, tokenize_python
from prefixtune.metrics.multibleu import multi_bleu
from prefixtune.metrics.ter import ter, ter_statistics
from prefixtune.metrics.webnlg import normalize_hypothesis, normalize_reference

NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2
needs_java = pytest.mark.skipif(shutil.which("java") is None and not os.environ.get("PREFIXTUNE_JAVA"),
                                reason="no Java runtime on PATH (METEOR and the PTB tokenizer are Java)")


# --------------------------------------------------------------------------- mteval BLEU / NIST

def test_mteval_tokenisation():
    # apostrophes and hyphens stay inside words; a hyphen after a digit is split off
    assert tokenize_python("The Eagle's kid-friendly price: £20-25, ok.") == [
        "the", "eagle's", "kid-friendly", "price", ":", "£20", "-", "25", ",", "ok", "."]
    assert tokenize_python("") == [""]  # pymteval: an empty output is one empty token
    assert tokenize_perl("") == []
    assert tokenize_perl("CAFÉ 3.5") == ["cafÉ", "3.5"]  # Perl lowercases ASCII only; no split inside 3.5


@pytest.mark.parametrize("variant", ["python", "perl"])
def test_mteval_bleu_nist_by_hand(variant):
    # unigram 4/5, bigram 3/4, trigram 2/3, 4-gram 1/2, equal lengths -> BLEU = (1/5)^(1/4)
    # NIST: only unigrams carry information, log2(5 words / 1) each, 4 hits over 5 words
    bleu, nist = bleu_nist(["a b c d e"], [["A b c d f"]], variant)
    assert bleu == pytest.approx(0.2 ** 0.25)
    assert nist == pytest.approx(4 * math.log2(5) / 5)


def test_mteval_variants_differ_only_where_the_scripts_do():
    hyps, refs = ["x y", "p q"], [["x y z w"], ["p q", "p q r s t u"]]
    info = (2 * math.log2(12) + 2 * math.log2(6)) / 4  # x,y: 12 ref words / 1; p,q: 12 / 2
    # pymteval: average reference length 4 + (2+6)/2 = 8 vs 4 output words -> ratio 1/2;
    # 3- and 4-gram counts go to 0 and -2, so their precisions are floored (1e-15 / 1e-9)
    bleu, nist = bleu_nist(hyps, refs, "python")
    assert nist == pytest.approx(info * math.exp(-NIST_BETA * math.log(0.5) ** 2))
    assert bleu == pytest.approx(math.exp(1 - 6 / 4) * 1e-3)
    # Perl: total reference words 12 / 2 reference sets -> ratio 2/3 -> penalty exactly 0.5;
    # empty 3-/4-gram counts contribute log 1
    bleu, nist = bleu_nist(hyps, refs, "perl")
    assert nist == pytest.approx(info * 0.5)
    assert bleu == pytest.approx(math.exp(1 - 6 / 4))


def test_mteval_rejects_bad_input():
    with pytest.raises(MetricsError, match="2 hypotheses but 1"):
        bleu_nist(["a", "b"], [["a"]])
    with pytest.raises(MetricsError, match="no reference"):
        bleu_nist(["a"], [[]])


def test_e2e_bleu_nist_equal_the_official_implementations(data_root):
    """Outputs = first reference of each MR, scored against the others. Expected values were produced by the
    unmodified e2e-metrics pymteval.py (measure_scores.py -p) and by mteval-v13a-sig.pl run on
    measure_scores.py's .sgm files (docs/data_and_metrics.md)."""
    from prefixtune.data import load_task

    recs = load_task("e2e", "test", data_root)
    hyps = [r.references[0] for r in recs]
    refs = [r.references[1:] or r.references[:1] for r in recs]
    bleu, nist = bleu_nist(hyps, refs, "python")
    assert bleu == pytest.approx(0.6115017125, abs=1e-9) and nist == pytest.approx(8.9911697301, abs=1e-8)
    bleu, nist = bleu_nist(hyps, refs, "perl")
    assert bleu == pytest.approx(0.6115017125, abs=1e-9) and nist == pytest.approx(8.9951367827, abs=1e-8)


# --------------------------------------------------------------------------- multi-bleu, TER, ROUGE

def test_multi_bleu_by_hand():
    assert multi_bleu(["a b c d e"], [["a b c d f", ""]]) == pytest.approx(100 * 0.2 ** 0.25)
    # ties in |hyp - ref| length go to the shorter reference: 2, so no brevity penalty
    assert multi_bleu(["a b c d"], [["a b", "a b c d e f"]]) == pytest.approx(100.0)
    # shorter than the closest reference: BP = exp(1 - 6/4)
    assert multi_bleu(["a b c d"], [["a b c d e f"]]) == pytest.approx(100 * math.exp(1 - 6 / 4))
    assert multi_bleu(["A B C D"], [["a b c d"]], lowercase=True) == pytest.approx(100.0)
    assert multi_bleu(["A B C D"], [["a b c d"]]) == 0.0  # no smoothing: a zero precision gives 0
    assert multi_bleu([""], [["a"]]) == 0.0


def test_ter_by_hand_and_equal_to_sacrebleu():
    assert ter(["a b c d"], [["a b c d"]]) == 0.0
    assert ter(["b a c d"], [["a b c d"]]) == pytest.approx(25.0)  # one shift / 4 words
    assert ter(["A B"], [["a b c", "x y z w"]]) == pytest.approx(100 / 3.5)  # 1 insertion / mean length 3.5
    from sacrebleu.metrics import TER

    rnd = random.Random(7)
    words = "the a cat dog sat on mat in of is was big small red blue".split()
    hyps = [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 25))) for _ in range(30)]
    refs = [[" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 25))) for _ in range(rnd.randint(1, 3))]
            for _ in range(30)]
    streams = [[g[i] if i < len(g) else None for g in refs] for i in range(3)]
    expected = TER(case_sensitive=False).corpus_score(hyps, streams).score
    assert ter(hyps, refs) == pytest.approx(expected, abs=1e-9)
    assert ter_statistics(hyps, refs, workers=2) == ter_statistics(hyps, refs, workers=1)


def test_xsum_rouge_by_hand():
    # unigrams 3/3 vs 3/6 -> F 2/3; bigrams 2/2 vs 2/5 -> F 4/7; LCS 3 -> F 2/3
    s = score("xsum", ["The cat sat"], [["the cat sat on the mat"]])
    assert s == pytest.approx({"ROUGE_1": 200 / 3, "ROUGE_2": 400 / 7, "ROUGE_L": 200 / 3})
    assert score("xsum", ["cats"], [["a cat"]])["ROUGE_1"] == pytest.approx(200 / 3)  # stemmer: cats -> cat


# --------------------------------------------------------------------------- text normalisation of the scripts

def test_webnlg_and_dart_normalisation():
    assert normalize_hypothesis(" Adolfo Suárez Madrid–Barajas Airport's runway is 18L/36R. ") == (
        "adolfo suarez madrid - barajas airport ' s runway is 18l / 36r .")
    assert normalize_reference("Adolfo Suárez Madrid–Barajas Airport's runway is 18L/36R.") == (
        "adolfo suarez madrid - barajas airport ' s runway is 18l / 36r .")
    assert dart_normalize("Jeff Daniels played in the Hawaii Five-O episode") == (
        "jeff daniels played in the hawaii five - o episode")  # = line 1 of DART's all-delex-reference0.lex
    assert dart_normalize("Adolf Schärf, d.c.") == "adolf schärf , d . c ."


# --------------------------------------------------------------------------- reference files

def test_read_references_formats(tmp_path):
    grouped = tmp_path / "refs.txt"
    grouped.write_text("a one\na two\n\nb one\n\n\n")
    assert read_references(grouped, 2) == [["a one", "a two"], ["b one"]]
    single = tmp_path / "single.txt"
    single.write_text("a\nb\nc\n")
    assert read_references(single, 3) == [["a"], ["b"], ["c"]]
    with pytest.raises(MetricsError, match="holds 2 reference groups but there are 3"):
        read_references(grouped, 3)
    csv_file = tmp_path / "refs.csv"
    csv_file.write_text('"mr","ref"\n"name[A]","A one."\n"name[A]","A two."\n"name[B]","B for Ł20."\n')
    assert read_references(csv_file, 2) == [["A one.", "A two."], ["B for £20."]]
    with pytest.raises(MetricsError, match="file not found"):
        read_references(tmp_path / "missing.txt", 1)


def test_score_rejects_bad_input():
    with pytest.raises(MetricsError, match="unknown task"):
        score("cnn", ["a"], [["a"]])
    with pytest.raises(MetricsError, match="2 hypotheses but 1 reference groups"):
        score("xsum", ["a", "b"], [["a"]])
    with pytest.raises(MetricsError, match="no reference"):
        score("xsum", ["a"], [[""]])


def test_missing_java_is_one_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("PREFIXTUNE_JAVA", raising=False)
    with pytest.raises(MetricsError, match="Java not found"):
        score("e2e", ["a b"], [["a b"]])
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("a b\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("a b\n")
    assert score_command("webnlg", hyp, ref, "test", None, True) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Java not found") and err.count("\n") == 1 and "Traceback" not in err


def test_score_command_errors_and_json(tmp_path, capsys):
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("the cat sat\nhello there\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("the cat sat on the mat\n\nhello there\n")
    assert score_command("xsum", hyp, ref, "test", None, True) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and set(json.loads(out)) == {"ROUGE_1", "ROUGE_2", "ROUGE_L"}
    assert score_command("xsum", hyp, ref, "test", None, False) == 0
    assert "ROUGE_2" in capsys.readouterr().out
    assert score_command("bleurt", hyp, ref, "test", None, True) == 2
    assert capsys.readouterr().err == "error: unknown task 'bleurt'; choose one of e2e, webnlg, dart, xsum\n"
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    assert score_command("xsum", three, ref, "test", None, True) == 2
    assert "2 reference groups but there are 3" in capsys.readouterr().err


def test_score_command_takes_references_from_the_loader(data_root, tmp_path, capsys):
    from prefixtune.data import load_task

    recs = load_task("xsum", "test", data_root)
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("\n".join(r.references[0] for r in recs) + "\n")
    assert score_command("xsum", hyp, None, "test", data_root, True) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx({"ROUGE_1": 100.0, "ROUGE_2": 100.0, "ROUGE_L": 100.0})
    hyp.write_text("only one line\n")
    assert score_command("e2e", hyp, None, "test", data_root, True) == 2
    assert "has 1 lines but the e2e test split has 630 items" in capsys.readouterr().err


def test_score_command_limit_scores_the_first_items_and_says_so(data_root, tmp_path, capsys):
    """`eval --limit N` decodes the split's first N items; `score --limit N` scores them against those."""
    from prefixtune.data import load_task

    recs = load_task("xsum", "test", data_root)
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("\n".join(r.references[0] for r in recs[:20]) + "\n")
    assert score_command("xsum", hyp, None, "test", data_root, True) == 2
    assert f"add --limit 20" in capsys.readouterr().err  # the error says how to score a prefix of the split
    assert score_command("xsum", hyp, None, "test", data_root, True, limit=20) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == pytest.approx({"ROUGE_1": 100.0, "ROUGE_2": 100.0, "ROUGE_L": 100.0})
    assert f"scoring the first 20 of the {len(recs)} items of the xsum test split" in captured.err
    assert score_command("xsum", hyp, None, "test", data_root, False, limit=20) == 0
    assert "first 20 items of the test split" in " ".join(capsys.readouterr().out.split())  # the title wraps
    assert score_command("xsum", hyp, None, "test", data_root, True, limit=21) == 2
    assert "has 20 lines but --limit 21 selects 21 items" in capsys.readouterr().err


# --------------------------------------------------------------------------- Java: METEOR, PTB, COCO

@needs_java
@pytest.mark.java
def test_meteor_by_hand():
    from prefixtune.metrics.java import meteor_session

    with meteor_session() as meteor:
        # 2 content words, both matched, in 2 chunks: P = R = 1, frag = 2/2, penalty .6 * 1^.2 -> .4
        assert meteor.aggregate([meteor.stats("cat dog", ["dog cat"])])[0] == pytest.approx(0.4)
        assert meteor.aggregate([meteor.stats("the cat sat", ["a b", "the cat sat"])])[0] == pytest.approx(1.0)
        assert meteor.aggregate([meteor.stats("", ["dog cat"])])[0] == 0.0


@needs_java
@pytest.mark.java
def test_coco_metrics_by_hand():
    from prefixtune.metrics.coco import coco_scores
    from prefixtune.metrics.java import ptb_tokenize

    assert ptb_tokenize(['The Café "Rouge" is £20-25, cheap.', ""]) == ["the café rouge is # 20-25 cheap", ""]
    # ROUGE-L: LCS 3, P 1, R 1/2, beta 1.2 -> 2.44 * .5 / (.5 + 1.44); CIDEr-D: item 1 has cosine 1 for 1- and
    # 2-grams (mean over n=1..4 = .5, x10 = 5), item 2 shares nothing -> mean 2.5
    s = coco_scores(["a b", "The cat sat."], [["a b"], ["the cat sat on the mat"]], metrics=("ROUGE_L",))
    assert s["ROUGE_L"] == pytest.approx((1 + 2.44 * 0.5 / 1.94) / 2)
    s = coco_scores(["a b", "c d"], [["a b"], ["e f"]], metrics=("CIDEr",))
    assert s["CIDEr"] == pytest.approx(2.5)


@needs_java
@pytest.mark.java
def test_e2e_test_set_equals_the_official_script(data_root):
    """630 outputs (first reference vs the others): expected values from measure_scores.py's code paths,
    pymteval for BLEU/NIST and pycocoevalcap's own classes for the rest (docs/data_and_metrics.md)."""
    from prefixtune.data import load_task

    recs = load_task("e2e", "test", data_root)
    hyps, refs = [r.references[0] for r in recs], [r.references[1:] or r.references[:1] for r in recs]
    s = score("e2e", hyps, refs, mteval_variant="python")
    assert list(s) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    assert s == pytest.approx({"BLEU": 61.15017125, "NIST": 8.9911697301, "METEOR": 45.90957006,
                               "ROUGE_L": 64.61548423, "CIDEr": 2.036124532}, abs=1e-6)
    # the default is mteval-v13a (Perl): the same BLEU, NIST with the Perl length penalty
    bleu, nist = bleu_nist(hyps, refs)
    assert 100 * bleu == pytest.approx(61.15017125, abs=1e-6) and nist == pytest.approx(8.9951367827, abs=1e-6)


@needs_java
@pytest.mark.java
def test_webnlg_scores_with_seen_unseen():
    hyps = ["Aarhus airport serves Aarhus.", "The Moon orbits the Earth", "x"]
    refs = [["Aarhus Airport serves the city of Aarhus.", "Aarhus is served by Aarhus airport."],
            ["The moon orbits Earth.", "Earth is orbited by the Moon.", "r3", "r4 is dropped"],
            ["x"]]
    meta = [{"seen": True}, {"seen": False}, {"category": "Airport"}]
    s = score("webnlg", hyps, refs, meta)
    assert list(s) == ["BLEU", "METEOR", "TER", "BLEU_seen", "METEOR_seen", "TER_seen",
                       "BLEU_unseen", "METEOR_unseen", "TER_unseen"]
    nh = [normalize_hypothesis(h) for h in hyps]
    nr = [[normalize_reference(r) for r in g[:3]] for g in refs]
    assert s["BLEU"] == pytest.approx(multi_bleu(nh, [r + [""] * (3 - len(r)) for r in nr], lowercase=True))
    assert s["TER_unseen"] == pytest.approx(ter([nh[1]], [nr[1]]))
    # "the moon orbits the earth" vs "the moon orbits earth .": delete "the", insert "." -> 2 edits;
    # average length of the 3 normalised references (5, 7 and 1 words) is 13/3
    assert s["TER_unseen"] == pytest.approx(100 * 2 / (13 / 3))
    assert 0 < s["METEOR_seen"] < 100 and s["METEOR_unseen"] > 0
    assert set(score("webnlg", hyps, refs)) == {"BLEU", "METEOR", "TER"}


@needs_java
@pytest.mark.java
def test_dart_scores_and_skipped_model_metrics():
    notes: list[str] = []
    s = score("dart", ["Jeff Daniels played in Hawaii Five-O.", "a b c d"],
              [["Jeff Daniels played in the Hawaii Five-O episode.", "Second annotation."], ["a b c d"]], notes=notes)
    assert {"BLEU", "METEOR", "TER"} <= set(s)
    # TER against the first annotation only: "jeff daniels played in hawaii five - o ." needs 1 insertion
    # ("the") + 1 insertion ("episode") vs 11 words; item 2 is exact
    assert s["TER"] == pytest.approx(100 * 2 / (11 + 4))
    skipped = [n for n in notes if "skipped" in n]
    assert len(skipped) == 3 - len({"BERTScore", "MoverScore", "BLEURT"} & set(s))
    assert all(n.count("\n") == 0 and " skipped: " in n for n in skipped)


def test_webnlg_and_dart_scorers_refuse_a_count_mismatch_even_when_skipping():
    # called directly (not through `score`), a mismatch used to crash with an IndexError (more hypotheses)
    # or score BLEU/METEOR on the first items only (fewer hypotheses) when metrics may be skipped
    from prefixtune.metrics.dart import score_dart
    from prefixtune.metrics.webnlg import score_webnlg

    for scorer in (score_webnlg, lambda h, r, skipped: score_dart(h, r, model_metrics=False, skipped=skipped)):
        for hyps, refs in ((["a b", "c d", "e f"], [["a b"], ["c d"]]), (["a b"], [["a b"], ["c d"]])):
            with pytest.raises(MetricsError, match="hypotheses but"):
                scorer(hyps, refs, skipped=[])
    with pytest.raises(MetricsError, match="meta entries"):
        score_webnlg(["a b", "c d"], [["a b"], ["c d"]], meta=[{"seen": True}], skipped=[])
