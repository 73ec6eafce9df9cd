"""E2E slot error rate (SER): how many of the MR's facts an output gets wrong.

The semantic accuracy measure of the cleaned E2E data (Dušek, Howcroft & Rieser
2019, "Semantic Noise Matters for Neural Natural Language Generation", INLG).
Our own code with the rules of their ``slot_error.py`` (tuetschek/e2e-cleaning;
a copy ships with TGen as ``tgen/e2e/slot_error.py``):

* every value of every attribute has regular expressions (whole words, any
  case); names and "near" venues are the E2E venue names, plus TGen's
  delexicalisation placeholders ``X-name`` / ``X-near``;
* a match that lies inside a longer match is dropped, so "not family-friendly"
  is not also "family-friendly"; of matches on the same span ("cheap" is both
  ``cheap`` and ``less than £20``, "The Rice Boat" is a name and a venue
  nearby) the MR's value wins;
* per attribute: the MR's value not mentioned is *missed*, another value
  mentioned instead is *wrong*, any further value (or an attribute the MR
  lacks) is *added*.

SER = (missed + added + wrong) / slots in the MRs, x100. Two deliberate
differences: a value mentioned twice counts once (the script's counter does so
too, by accident, except for a repeated low customer rating: 14 slots of the
original training set), and a name or venue outside the E2E lists is still
recognised when the MR carries it (the script fails on one). On the original
E2E references this gives the paper's Table 1: test 11.49, dev 11.42, train
17.68 (17.69 with those 14).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from .errors import MetricsError

# E2E attributes in the script's matching order (it keeps the first of two same-span matches).
SLOTS = ("area", "eatType", "familyFriendly", "food", "name", "near", "priceRange", "customer rating")

NAMES = ("Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Browns Cambridge", "Clowns", "Cocum", "Cotto",
         "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House", "Strada", "Taste of Cambridge",
         "The Cambridge Blue", "The Cricketers", "The Dumpling Tree", "The Eagle", "The Golden Curry",
         "The Golden Palace", "The Mill", "The Olive Grove", "The Phoenix", "The Plough", "The Punter",
         "The Rice Boat", "The Twenty Two", "The Vaults", "The Waterman", "The Wrestlers",
         "Travellers Rest Beefeater", "Wildwood", "Zizzi", "X-name")
NEAR = ("All Bar One", "Avalon", "Burger King", "Café Adriatic", "Café Brazil", "Café Rouge", "Café Sicilia",
        "Clare Hall", "Crowne Plaza Hotel", "Express by Holiday Inn", "Rainbow Vegetarian Café",
        "Raja Indian Cuisine", "Ranch", "The Bakers", "The Portland Arms", "The Rice Boat", "The Six Bells",
        "The Sorrento", "Yippee Noodle Bar", "X-near")


def _rating(number: str, said_after: str, said_before: str, with_number: bool) -> list[str]:
    """A customer rating: "N out of 5", "rated (as) low", "low customer rating" (+ ", 1 out of 5")."""
    def stars(star_word=True):
        return number + r"(?:(?: out)? of (?:5|five)" + (r"(?: stars?)?" if star_word else "") + r"|[- ]+stars?)"
    after = r"(?:rat(?:ings?|e[ds]?)|reviews?|standards?|quality)(?: \w+){0,2} (?:as )?" + said_after
    before = rf"(?:{said_before})(?:ly)?(?:[ -]+\w+){{0,2}}[ -]+(?:rat(?:ings?|ed)|reviews?|standards?|quality)"
    if with_number:  # the numeric values also take "rated low, 1 out of 5" as one mention
        after += rf"(?:(?: \w+){{0,3}} {stars(False)})?"
        before += rf"(?:(?: \w+){{0,3}} {stars()})?"
    return [stars(), after, before]


_LOW = r"low|bad|poor|(?:not|doesn't|isn't)(?: \w+){0,2} (?:good|well)"
_AVERAGE = r"average|(?<!very )(?:good|well)"
_HIGH = r"high|excellent|very good|great"
_ONE, _THREE, _FIVE = "(?:1|one)", "(?:3|three)", "(?:5|five)"
_LOW_PRICE = ["(?:inexpensive|cheap)(?:ly)?", "low[- ]+price[ds]?", "affordabl[ey]",
              r"prices?(?: range)?(?: \w+){0,3} low"]
_HIGH_PRICE = ["high[- ]+price[ds]?", "expensive", r"prices?(?: range)?(?: \w+){0,3} high"]
_MID_PRICE = [r"(?:moderate|reasonable|ok|average)(?:ly)?[- ]+price[ds]?",
              r"prices?(?: range)?(?: \w+){0,3} (?:ok|average|moderate|reasonable)"]

# value -> patterns, per attribute. Order matters where two patterns can match at one place (the first wins):
# "not family friendly" must not stop at "not family".
REALISATIONS: dict[str, dict[str, list[str]]] = {
    "area": {
        "city centre": ["(?:city|town) cent(?:re|er)", "cent(?:re|er) of (?:the )?(?:city|town)",
                        "in the cent(?:re|er)"],
        "riverside": ["riverside", "(?:near|by|at|close to|along|on|off|beside) the river"],
    },
    "eatType": {"coffee shop": ["coffee[- ]+shop", "caf[eé]", "coffee"], "pub": ["pub"], "restaurant": ["restaurant"]},
    "familyFriendly": {
        "no": [r"(?:isn't|not|non|no)[ -]+(?:\w+ ){0,2}(?:child|children|family|kids|kid)[ -]+"
               "(?:friendly|orien(?:ta)?ted)",
               "(?:child|children|family|kids|kid)[ -]+unfriendly",
               "adults?[ -]+only",
               "only for adults",
               "(?:no|not) (?:kids|children|famil(?:y|ies))",
               "(?:not|no)(?: good| suitable| friendly| orien(?:ta)?ted| open(?:ed))? (?:at|for|to|with)(?: the)? "
               "(?:kids|children|family|families|all age)",
               "(?:kids?|child(?:ren)?|famil(?:y|ies)) (?:are|is)(?:n't| not) (?:welcome|allowed|accepted)",
               r"(?:does not|doesn't) (?:welcome|allow|accept) (?:\w+ ){0,2}"
               "(?:kids?|child(?:ren)?|famil(?:y|ies)|all age)",
               "adult (?:establishment|venue|place|establish)"],
        # The script also lists "friendly/suitable ... to the kids", but its regex lacks a space and never
        # matches; it is left out so that the numbers stay the script's.
        "yes": ["for (?:kids|children|family|families)",
                "family place",
                "place to bring the(?: whole)? family",
                "(?:child|children|family|kids|kid)[ -]+(?:friendly|orien(?:ta)?ted)",
                "(?:kids?|child(?:ren)?|famil(?:y|ies)) (?:are|is) (?:welcome|allowed|accepted)",
                r"(?:welcomes?|allows?|accepts?) (?:\w+ ){0,2}(?:kids?|child(?:ren)?|famil(?:y|ies)|all age)"],
    },
    "food": {"Chinese": ["Chinese", "Chines"], "English": ["English", "British"], "Fast food": ["Fast food"],
             "French": ["French"], "Indian": ["Indian"], "Italian": ["Italian"], "Japanese": ["Japanese"]},
    "priceRange": {
        "cheap": _LOW_PRICE,
        "less than £20": _LOW_PRICE + ["(?:less than|under) £? *20", "moderately priced"],
        "more than £30": _HIGH_PRICE + ["(?:more than|over) £? *30", "not cheap"],
        "high": _HIGH_PRICE,
        "moderate": _MID_PRICE + ["not cheap", "affordable", "mid[- ]+(?:range[- ]+)price[ds]?"],
        "£20-25": _MID_PRICE + ["£? *20 *(?:[-–]*|to) *25", "affordable"],
    },
    "customer rating": {
        "1 out of 5": _rating(_ONE, "(?:low|bad|poor)", _LOW, True),
        "3 out of 5": _rating(_THREE, "average", _AVERAGE, True),
        "5 out of 5": _rating(_FIVE, "high", _HIGH, True),
        "high": _rating(_FIVE, "high", _HIGH + "|well", False),
        "average": _rating(_THREE, "average", _AVERAGE, False),
        "low": _rating(_ONE, "(?:low|bad|poor)", _LOW, False),
    },
}
VENUES = {"name": NAMES, "near": NEAR}


def _compile(patterns) -> re.Pattern:
    return re.compile("|".join(rf"\b{p}\b" for p in patterns), re.IGNORECASE)


_VALUE_PATTERNS = {slot: [(value, _compile(pats)) for value, pats in values.items()]
                   for slot, values in REALISATIONS.items()}


@lru_cache(maxsize=None)
def _venue_pattern(slot: str, extra: str | None) -> tuple[re.Pattern, dict[str, str]]:
    """One pattern for all names (or venues near), with ``extra`` from the MR when it is not a known one."""
    values = VENUES[slot] + ((extra,) if extra else ())
    return _compile(re.escape(v) for v in values), {v.lower(): v for v in values}


def parse_mr(mr) -> dict[str, str]:
    """``"name[The Eagle], eatType[pub]"`` (or a dict) -> {attribute: value}, values spelt as in the E2E data."""
    pairs = mr.items() if isinstance(mr, dict) else re.findall(r"([^\[\],]+?)\s*\[([^\]]*)\]", mr)
    parsed = {}
    for slot, value in pairs:
        slot, value = slot.strip(), value.strip()
        if slot in VENUES:  # a known venue in its E2E spelling, any other as it is
            parsed[slot] = {v.lower(): v for v in VENUES[slot]}.get(value.lower(), value)
            continue
        if slot not in REALISATIONS:
            raise MetricsError(f"SER: unknown E2E attribute {slot!r} in MR {mr!r}")
        canonical = {v.lower(): v for v in REALISATIONS[slot]}.get(value.lower())
        if canonical is None:
            raise MetricsError(f"SER: unknown value {value!r} of {slot} in MR {mr!r}")
        parsed[slot] = canonical
    if not parsed:
        raise MetricsError(f"SER: cannot parse E2E meaning representation {mr!r}")
    return parsed


@dataclass(frozen=True)
class _Mention:
    slot: str
    value: str
    start: int
    end: int

    def inside(self, other: _Mention) -> bool:
        same = (self.start, self.end) == (other.start, other.end)
        return other.start <= self.start and self.end <= other.end and not same


def mentions(text: str, mr: dict[str, str]) -> dict[str, list[str]]:
    """The values ``text`` mentions, per attribute (``mr`` settles same-span ties)."""
    found: list[_Mention] = []
    for slot in SLOTS:
        if slot in VENUES:
            pattern, spelling = _venue_pattern(slot, None if mr.get(slot) in VENUES[slot] else mr.get(slot))
            found += [_Mention(slot, spelling[m.group(0).lower()], m.start(), m.end()) for m in pattern.finditer(text)]
        else:
            found += [_Mention(slot, value, m.start(), m.end())
                      for value, pattern in _VALUE_PATTERNS[slot] for m in pattern.finditer(text)]
    kept: list[_Mention] = []
    for m in found:
        if any(m.inside(o) for o in found):
            continue
        rivals = [o for o in found if o is not m and (o.start, o.end) == (m.start, m.end)]
        if any(mr.get(o.slot) == o.value or o in kept for o in rivals):
            continue
        kept.append(m)
    result: dict[str, list[str]] = {}
    for m in kept:
        if m.value not in result.setdefault(m.slot, []):
            result[m.slot].append(m.value)
    return result


@dataclass
class ItemCheck:
    """One output against its MR; ``missed``/``added``/``wrong`` read like ``food[Italian]``."""
    text: str
    mr: dict[str, str]
    found: dict[str, list[str]]
    missed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return len(self.missed) + len(self.added) + len(self.wrong)


def check(text: str, mr) -> ItemCheck:
    """Compare the attribute values that ``text`` mentions with ``mr`` (an E2E MR string or a dict)."""
    mr = parse_mr(mr)
    found = mentions(text, mr)
    item = ItemCheck(text, mr, found)
    for slot in [s for s in SLOTS if s in mr or s in found]:
        gold = mr.get(slot)
        others = sorted(v for v in found.get(slot, []) if v != gold)
        if gold is not None and gold not in found.get(slot, []):
            if others:
                item.wrong.append(f"{slot}[{gold}] said as {others.pop(0)}")
            else:
                item.missed.append(f"{slot}[{gold}]")
        item.added += [f"{slot}[{v}]" for v in others]
    return item


@dataclass
class SlotErrors:
    """Corpus counts and the per-item analysis; ``ser`` in percent."""
    missed: int
    added: int
    wrong: int
    slots: int
    items: list[ItemCheck]

    @property
    def ser(self) -> float:
        return 100.0 * (self.missed + self.added + self.wrong) / self.slots


def slot_error_rate(texts: list[str], mrs: list) -> SlotErrors:
    """SER of ``texts`` against their MRs, one to one."""
    if len(texts) != len(mrs):
        raise MetricsError(f"SER: {len(texts)} outputs but {len(mrs)} MRs")
    if not texts:
        raise MetricsError("SER: nothing to score")
    items = [check(text, mr) for text, mr in zip(texts, mrs)]
    return SlotErrors(missed=sum(len(i.missed) for i in items), added=sum(len(i.added) for i in items),
                      wrong=sum(len(i.wrong) for i in items), slots=sum(len(i.mr) for i in items), items=items)
