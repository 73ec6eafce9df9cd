"""Source templates ("{source}\\n"): how a source is written before the target. Data, never code.

A template travels in a prefix file's metadata, so whoever made the file chose it. It is never
given to `str.format`: a format spec such as `{source:>20000000}` builds a 20 MB string in the
decoding worker, and `{source.__class__}` reads attributes. The rule, checked wherever a
template enters (training options, prefix files, `PrefixBank`, uploads), is: literal text,
`{{` and `}}` for literal braces, and exactly one bare `{source}` field (no format spec,
conversion, attribute or index), at most MAX_TEMPLATE_CHARS characters.
"""
from __future__ import annotations

import string
from functools import lru_cache

MAX_TEMPLATE_CHARS = 1000
_FORMATTER = string.Formatter()


class TemplateError(ValueError):
    """A template that is not literal text around one bare {source}; the message names the problem."""


def check_template(template) -> str:
    """`template` itself when it follows the rule; else TemplateError."""
    if not isinstance(template, str):
        raise TemplateError(f"template must be a string, not {type(template).__name__}")
    _split(template)
    return template


def fill_template(template: str, source: str) -> str:
    """The template with its `{source}` replaced by `source` (whose own braces mean nothing)."""
    before, after = _split(template)
    return before + source + after


@lru_cache(maxsize=256)
def _split(template: str) -> tuple[str, str]:
    """(text before {source}, text after it), braces unescaped; TemplateError if the rule is broken."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"template is {len(template)} characters long; the limit is {MAX_TEMPLATE_CHARS}")
    try:
        parts = list(_FORMATTER.parse(template))
    except ValueError as e:  # "Single '}' encountered", "expected '}' before end of string"
        raise TemplateError(f"template {_short(template)} is malformed ({e}); write a literal brace as {{{{ or }}}}")
    pieces, fields = [], 0
    for literal, field, spec, conversion in parts:
        pieces.append(literal)
        if field is None:
            continue
        if field != "source" or spec or conversion is not None:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            what = ("a format spec" if spec else "a conversion" if conversion is not None
                    else "an attribute" if field.startswith("source.") else "an index" if field.startswith("source[")
                    else "an unknown field")
            raise TemplateError(f"template field {_short(shown)} is not allowed ({what}): only a bare {{source}}, "
                                "with no format spec, conversion, attribute or index")
        fields += 1
        pieces.append(None)
    if fields != 1:
        raise TemplateError(f"template {_short(template)} must contain {{source}} exactly once (it has {fields})")
    at = pieces.index(None)
    return "".join(pieces[:at]), "".join(pieces[at + 1:])


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
