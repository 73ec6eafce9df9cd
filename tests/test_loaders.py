"""WebNLG, DART and XSum loaders: counts against ../shared/data/README.md, formats, splits, the sampler."""
from __future__ import annotations


import pytest

from prefixtune.data import LOADERS, load_task, sample_pairs, training_pairs
from prefixtune.data.dart import load_dart
from prefixtune.data.webnlg import linearize_triples, load_webnlg, split_triple
from prefixtune.data.xsum import load_xsum, parse_article, topic_group, url_topic



def test_all_four_tasks_are_registered():
    assert set(LOADERS) >= {"e2e", "webnlg", "dart", "xsum"}
    with pytest.raises(ValueError, match="unknown task"):
        load_task("cnn", "test")


# --------------------------------------------------------------------------- WebNLG

def test_webnlg_linearisation():
    assert split_triple("Aarhus_Airport | cityServed | Aarhus") == ("Aarhus_Airport", "cityServed", "Aarhus")
    assert split_triple('A | runwayName | "18L/36R"') == ("A", "runwayName", '"18L/36R"')
    assert linearize_triples([("a", "p", "b"), ("b", "q", "c")]) == "a : p : b | b : q : c"
    with pytest.raises(ValueError, match="malformed triple"):
        split_triple("only | two")


def test_webnlg_test_counts_and_subsets(data_root):
    test = load_webnlg("test", data_root)
    assert len(test) == 1862
    assert len(load_webnlg("test", data_root, subset="seen")) == 971
    assert len(load_webnlg("test", data_root, subset="unseen")) == 891
    assert sum(r.meta["seen"] for r in test) == 971
    assert [r.meta["id"] for r in test[:3]] == ["Id1", "Id2", "Id3"] and test[-1].meta["id"] == "Id1862"
    first = test[0]
    assert first.source == "Abilene_Regional_Airport : cityServed : Abilene,_Texas"
    assert first.references == ["Abilene, Texas is served by the Abilene regional airport.",
                                "Abilene Regional Airport serves the city of Abilene in Texas."]
    assert first.meta["category"] == "Airport" and first.meta["size"] == 1
    assert {r.meta["category"] for r in test if not r.meta["seen"]} == {
        "Artist", "Athlete", "CelestialBody", "MeanOfTransportation", "Politician"}
    with pytest.raises(ValueError, match="subset"):
        load_webnlg("test", data_root, subset="new")


def test_webnlg_train_keeps_good_lexicalisations_only(data_root):
    train = load_task("webnlg", "train", data_root)
    # 6,940 entries in the files; 5 have only "toFix" lexicalisations and are dropped
    assert len(train) == 6935 and len(training_pairs(train)) == 18025
    assert len(load_webnlg("dev", data_root)) == 871
    assert all(r.meta["seen"] for r in train)
    assert len({r.meta["id"] for r in train}) == len(train)
    multi = next(r for r in train if r.meta["size"] == 3)
    assert multi.source.count(" | ") == 2 and all(part.count(" : ") >= 2 for part in multi.source.split(" | "))
    with pytest.raises(ValueError, match="unseen"):
        load_webnlg("train", data_root, subset="unseen")


# --------------------------------------------------------------------------- DART

def test_dart_counts_and_linearisation(data_root):
    test = load_dart("test", data_root)
    assert len(test) == 5097
    assert test[0].source == ("Hawaii Five-O : notes : Episode: The Flight of the Jewels | "
                              "[TABLECONTEXT] : [title] : Jeff Daniels | [TABLECONTEXT] : title : Hawaii Five-O")
    assert test[0].references == ["Jeff Daniels played in the Hawaii Five-O episode The Flight of the Jewels"]
    assert all(r.references for r in test)  # the one empty <lex/> is dropped, its entry keeps the other
    dev = load_task("dart", "dev", data_root)
    assert len(dev) == 2768
    assert dev[0].source == "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, North Carolina"
    assert dev[0].references == ["A school from Mars Hill, North Carolina, joined in 1973."]


def test_dart_train_needs_train_from(data_root):
    with pytest.raises(FileNotFoundError, match="train_from='dev'"):
        load_task("dart", "train", data_root)
    train = load_task("dart", "train", data_root, train_from="dev")
    assert len(train) == 2768 and train[0].meta["loaded_from"] == "dev"
    with pytest.raises(ValueError, match="train_from"):
        load_dart("train", data_root, train_from="nope")


def test_dart_json_and_xml_share_the_linearisation(tmp_path):
    (tmp_path / "dart").mkdir()
    (tmp_path / "dart" / "dart-v1.1.1-full-dev.json").write_text(
        '[{"tripleset": [["A B", "NICKNAME", "C"], ["A B", "YEAR", "1999"]], '
        '"annotations": [{"source": "x", "text": "A B, nicknamed C, 1999."}, {"source": "y", "text": " "}]}]')
    (tmp_path / "dart" / "dart-v1.1.1-full-test.xml").write_text(
        '<benchmark><entries><entry category="MISC" eid="Id1" size="2"><modifiedtripleset>'
        '<mtriple>A B | NICKNAME | C</mtriple><mtriple>A B | YEAR | 1999</mtriple></modifiedtripleset>'
        '<lex comment="x" lid="Id1">A B, nicknamed C, 1999.</lex><lex comment="y" lid="Id2" /></entry></entries></benchmark>')
    dev, test = load_dart("dev", str(tmp_path)), load_dart("test", str(tmp_path))
    assert dev[0].source == test[0].source == "A B : nickname : C | A B : year : 1999"
    assert dev[0].references == test[0].references == ["A B, nicknamed C, 1999."]


# --------------------------------------------------------------------------- XSum

def test_xsum_url_topics():
    assert url_topic("http://www.bbc.co.uk/news/world-europe-29604402") == ("news", "world-europe")
    assert url_topic("http://web.archive.org/web/20170101/http://www.bbc.com:80/sport/football/37543139") == (
        "sport", "football")
    assert url_topic("http://www.bbc.com/news/10138849") == ("news", "")
    assert url_topic("not a url") == ("", "")
    assert [topic_group(t) for t in ("uk", "uk-wales", "world", "business", "health", "ukraine")] == [
        "uk", "uk", "world", "business", "other", "other"]
    fields = parse_article("[XSUM]URL[XSUM]\nhttp://x/news/uk-1\n\n[XSUM]INTRODUCTION[XSUM]\nThe  summary.\n"
                           "[XSUM]RESTBODY[XSUM]\nLine one.\nLine two.\n")
    assert fields == {"url": "http://x/news/uk-1", "summary": "The summary.", "article": "Line one.\nLine two."}


def test_xsum_schemes_partition_deterministically(data_root):
    train = load_xsum("train", data_root)
    dev = load_task("xsum", "dev", data_root)
    test = load_xsum("test", data_root, scheme="news-sport")
    assert (len(train), len(dev), len(test)) == (209, 14, 90)
    assert {r.meta["section"] for r in train + dev} == {"news"} and {r.meta["section"] for r in test} == {"sport"}
    assert not {r.meta["id"] for r in train} & {r.meta["id"] for r in dev}
    assert [r.meta["id"] for r in load_xsum("train", data_root)] == [r.meta["id"] for r in train]
    sample = test[0]
    assert sample.references[0] and sample.source and sample.meta["url"].startswith("http")
    wn_train, wn_test = load_xsum("train", data_root, scheme="within-news"), load_xsum("test", data_root, scheme="within-news")
    assert (len(wn_train), len(wn_test)) == (186, 27)
    assert {r.meta["group"] for r in wn_train} <= {"world", "uk", "business"}
    assert {r.meta["group"] for r in wn_test} == {"other"} and {r.meta["section"] for r in wn_test} == {"news"}
    assert len(load_xsum("test", data_root, scheme="official")) == 321
    with pytest.raises(ValueError, match="empty"):
        load_xsum("train", data_root, scheme="official")
    with pytest.raises(ValueError, match="scheme"):
        load_xsum("train", data_root, scheme="sport-news")


# --------------------------------------------------------------------------- all four

@pytest.mark.parametrize("task,options", [("e2e", {}), ("webnlg", {}), ("dart", {"train_from": "dev"}), ("xsum", {})])
def test_low_data_sampler_works_for_every_task(data_root, task, options):
    pairs = training_pairs(load_task(task, "train", data_root, **options))
    a, b = sample_pairs(pairs, 50, seed=3), sample_pairs(pairs, 50, seed=3)
    assert a == b and len(a) == 50 and all(isinstance(s, str) and isinstance(t, str) and s and t for s, t in a)


def test_data_dir_default_finds_data_and_shared_data(tmp_path, monkeypatch):
    """Without --data-dir or $PREFIXTUNE_DATA: ./data, then ../shared/data, then beside the checkout."""
    from prefixtune.data import resolve_data_dir
    from prefixtune.data.records import default_data_dirs

    monkeypatch.delenv("PREFIXTUNE_DATA", raising=False)
    work = tmp_path / "clone"
    work.mkdir()
    monkeypatch.chdir(work)
    checkout_places = [p for p in default_data_dirs() if p.is_absolute()]
    if any((p / "e2e").is_dir() for p in checkout_places):  # this checkout has ../shared/data: found from anywhere
        assert resolve_data_dir(None, "e2e") in checkout_places
    (tmp_path / "shared" / "data" / "e2e").mkdir(parents=True)
    assert resolve_data_dir(None, "e2e").resolve() == (tmp_path / "shared" / "data").resolve()
    (work / "data" / "dart").mkdir(parents=True)
    assert resolve_data_dir(None, "dart").resolve() == (work / "data").resolve()
    assert resolve_data_dir(str(tmp_path), "e2e") == tmp_path  # a flag wins


def test_data_dir_error_says_where_it_looked(tmp_path, monkeypatch):
    from prefixtune.data import records

    monkeypatch.delenv("PREFIXTUNE_DATA", raising=False)
    monkeypatch.setattr(records, "default_data_dirs", lambda: [tmp_path / "data"])
    with pytest.raises(FileNotFoundError, match="--data-dir DIR or set PREFIXTUNE_DATA.*looked in"):
        records.resolve_data_dir(None, "e2e")


def test_dart_holdout_keeps_dev_entries_out_of_training(data_root):
    """At converged scale DART trains on its dev file: the held-out triple sets give the dev loss and are never
    trained on; the split is fixed (seed 0) and the two parts cover the file."""
    train = load_dart("train", data_root, train_from="dev", holdout=300)
    dev = load_dart("dev", data_root, train_from="dev", holdout=300)
    every = load_dart("dev", data_root)
    assert not {r.source for r in train} & {r.source for r in dev}
    assert len({r.source for r in dev}) == 300 and len(train) + len(dev) == len(every)
    assert [r.source for r in dev] == [r.source for r in load_dart("dev", data_root, train_from="dev", holdout=300)]
    assert load_dart("dev", data_root, train_from="dev") == every  # no holdout: the whole file, as before
    with pytest.raises(ValueError, match="holdout applies with train_from"):
        load_dart("dev", data_root, holdout=3)
