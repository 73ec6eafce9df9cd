"""E2E slot error rate: hand-written outputs per attribute, the test references, and the score suite."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from prefixtune.metrics import MetricsError, score
from prefixtune.metrics.command import score_command
from prefixtune.metrics.e2e_ser import check, parse_mr, slot_error_rate

needs_java = pytest.mark.skipif(shutil.which("java") is None and not os.environ.get("PREFIXTUNE_JAVA"),
                                reason="no Java runtime on PATH (METEOR and the PTB tokenizer are Java)")

EAGLE = "name[The Eagle], eatType[coffee shop], food[Italian], area[riverside]"


@pytest.mark.parametrize("mr, text", [
    ("name[The Eagle], familyFriendly[yes]", "The Eagle is family-friendly."),
    ("name[The Eagle], familyFriendly[yes]", "At The Eagle children are welcome."),
    ("name[The Eagle], familyFriendly[yes]", "The Eagle is kid friendly."),
    ("name[The Eagle], familyFriendly[no]", "The Eagle is not family-friendly."),
    ("name[The Eagle], familyFriendly[no]", "The Eagle is for adults only."),
    ("name[The Eagle], priceRange[moderate]", "The Eagle is moderately priced."),
    ("name[The Eagle], priceRange[less than £20]", "The Eagle is cheap."),
    ("name[The Eagle], priceRange[less than £20]", "The Eagle costs under £20."),
    ("name[The Eagle], priceRange[£20-25]", "The Eagle costs £20-25."),
    ("name[The Eagle], priceRange[more than £30]", "The Eagle is expensive."),
    ("name[The Eagle], customer rating[low]", "The Eagle has a low customer rating."),
    ("name[The Eagle], customer rating[1 out of 5]", "The Eagle has a low customer rating."),
    ("name[The Eagle], customer rating[1 out of 5]", "The Eagle is rated one out of five stars."),
    ("name[The Eagle], customer rating[5 out of 5]", "The Eagle is highly rated by customers."),
    ("name[The Eagle], customer rating[high]", "The Eagle has a high customer rating."),
    ("name[The Eagle], customer rating[average]", "The Eagle has an average customer rating."),
    ("name[The Eagle], near[Burger King]", "The Eagle is near the Burger King."),
    ("name[The Eagle], near[Café Rouge]", "The Eagle is close to Café Rouge."),  # "Café" is not a coffee shop here
    ("name[The Eagle], area[riverside]", "The Eagle is by the river."),
    ("name[The Eagle], area[city centre]", "The Eagle is in the city center."),
    ("name[The Eagle], eatType[coffee shop]", "The Eagle is a café."),
    ("name[The Eagle], eatType[pub]", "The Eagle is a pub."),
    ("name[The Eagle], food[English]", "The Eagle serves British food."),
    ("name[The Eagle], food[Fast food]", "The Eagle serves fast food."),
    ("name[The Mill], near[The Rice Boat]", "The Mill is near The Rice Boat."),  # a venue, not a second name
])
def test_correct_paraphrases_have_no_error(mr, text):
    item = check(text, mr)
    assert (item.missed, item.added, item.wrong) == ([], [], []), item


def test_a_missed_slot():
    item = check("The Eagle is a coffee shop by the riverside.", EAGLE)
    assert item.missed == ["food[Italian]"] and item.added == [] and item.wrong == []


def test_an_added_slot():
    item = check("The Eagle is an Italian coffee shop by the riverside near Café Rouge. Kids are welcome.", EAGLE)
    assert item.added == ["familyFriendly[yes]", "near[Café Rouge]"] and item.missed == [] and item.wrong == []


@pytest.mark.parametrize("mr, text, wrong", [
    (EAGLE, "The Eagle is a French coffee shop by the riverside.", "food[Italian] said as French"),
    (EAGLE, "The Eagle is an Italian pub by the riverside.", "eatType[coffee shop] said as pub"),
    (EAGLE, "The Eagle is an Italian coffee shop in the city centre.", "area[riverside] said as city centre"),
    ("name[The Eagle], familyFriendly[yes]", "The Eagle is not kid friendly.", "familyFriendly[yes] said as no"),
    ("name[The Eagle], priceRange[more than £30]", "The Eagle is cheap.", "priceRange[more than £30] said as cheap"),
    ("name[The Eagle], customer rating[5 out of 5]", "The Eagle has a low customer rating.",
     "customer rating[5 out of 5] said as 1 out of 5"),
    ("name[The Eagle], near[Burger King]", "The Eagle is near Clare Hall.", "near[Burger King] said as Clare Hall"),
])
def test_a_wrong_value(mr, text, wrong):
    item = check(text, mr)
    assert item.wrong == [wrong] and item.missed == [] and item.added == []


def test_two_values_for_one_slot_are_a_wrong_and_an_added():
    item = check("The Eagle is a French and Chinese coffee shop by the river.", EAGLE)
    assert item.wrong == ["food[Italian] said as Chinese"] and item.added == ["food[French]"]


def test_corpus_counts_and_rate():
    result = slot_error_rate(["The Eagle is a coffee shop by the river.", "The Eagle serves Italian food."],
                             [EAGLE, "name[The Eagle], food[Indian]"])
    assert (result.missed, result.added, result.wrong, result.slots) == (1, 0, 1, 6)
    assert result.ser == pytest.approx(100 * 2 / 6)
    assert [i.errors for i in result.items] == [1, 1]


def test_names_outside_the_e2e_lists_and_placeholders():
    assert check("Blue Moon is a pub.", "name[Blue Moon], eatType[pub]").errors == 0
    assert check("X-name is a pub near X-near.", "name[X-name], eatType[pub], near[X-near]").errors == 0
    assert check("The Eagle is a pub.", "name[the eagle], eatType[pub]").mr["name"] == "The Eagle"


def test_bad_mrs_are_clear_errors():
    with pytest.raises(MetricsError, match="unknown E2E attribute 'colour'"):
        parse_mr("name[The Eagle], colour[red]")
    with pytest.raises(MetricsError, match="unknown value 'purple' of food"):
        parse_mr("food[purple]")
    with pytest.raises(MetricsError, match="2 outputs but 1 MRs"):
        slot_error_rate(["a", "b"], [EAGLE])


def test_the_test_references_have_the_papers_error_rate(data_root):
    """Every human reference of the E2E test set against its MR: 11.49%, as Table 1 of Dušek et al. (2019)
    gives for the original test set (dev 11.42, train 17.69 there) -- noisy crowd-sourced references."""
    from prefixtune.data import load_task

    recs = load_task("e2e", "test", data_root)
    refs = [(ref, r.meta["mr"]) for r in recs for ref in r.references]
    result = slot_error_rate([t for t, _ in refs], [mr for _, mr in refs])
    assert (len(refs), result.slots) == (4693, 32332)
    assert (result.missed, result.added, result.wrong) == (3069, 181, 465)
    assert result.ser == pytest.approx(11.49, abs=0.005)


@needs_java
@pytest.mark.java
def test_score_and_the_score_command_report_ser(tmp_path, capsys, monkeypatch):
    hyps = ["The Eagle is an Italian coffee shop by the river.", "The Mill is a pub."]
    refs = [["The Eagle is an Italian coffee shop by the riverside."], ["The Mill is a cheap pub."]]
    meta = [{"mr": EAGLE}, {"mr": "name[The Mill], eatType[pub], priceRange[cheap]"}]
    scores = score("e2e", hyps, refs, meta)
    assert list(scores)[-1] == "SER" and scores["SER"] == pytest.approx(100 * 1 / 7)
    assert "SER" not in score("e2e", hyps, refs)

    hyp = tmp_path / "hyp.txt"
    hyp.write_text("\n".join(hyps) + "\n")
    csv_refs = tmp_path / "refs.csv"
    csv_refs.write_text("mr,ref\n" + "".join(f'"{m["mr"]}",{r[0]}\n' for m, r in zip(meta, refs)), encoding="utf-8")
    assert score_command("e2e", hyp, csv_refs, "test", None, True) == 0
    assert json.loads(capsys.readouterr().out)["SER"] == pytest.approx(100 / 7)

    txt_refs = tmp_path / "refs.txt"
    txt_refs.write_text("\n\n".join(r[0] for r in refs) + "\n")
    assert score_command("e2e", hyp, txt_refs, "test", None, False) == 0
    out, err = capsys.readouterr()
    assert "SER" not in out and "note: SER skipped" in err

    # from the split: the loader's records carry the MRs
    monkeypatch.setattr("prefixtune.metrics.command._load_gold", lambda *a: (refs, meta))
    assert score_command("e2e", hyp, None, "test", None, False) == 0
    assert "SER" in capsys.readouterr().out
