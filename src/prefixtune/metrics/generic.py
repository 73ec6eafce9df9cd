"""Task-neutral scores for the user's own data: BLEU and chrF (sacrebleu), ROUGE-L (rouge-score).

The paper's tasks keep their official-equal suites (`metrics.score`); a file of the user's own has
no official script, so it gets the three metrics that read any text against any number of
references. All three are corpus-level and x100. BLEU and chrF are sacrebleu's defaults (cased,
13a tokenisation); ROUGE-L is rouge-score's F-measure with stemming, the best reference per
hypothesis, averaged (its tokenizer keeps ASCII letters and digits only: text in other scripts
scores 0 there, so read BLEU and chrF for it).

`score_data_command` is the body of `prefixtune score --data FILE --hyp H`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import MetricsError

GENERIC_METRICS = ("BLEU", "chrF", "ROUGE_L")


def score_text(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """{"BLEU", "chrF", "ROUGE_L"} of hypotheses against their groups of references (any count per item)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise MetricsError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    if not hypotheses:
        raise MetricsError("nothing to score: no hypotheses")
    hypotheses = [" ".join(str(h).splitlines()).strip() for h in hypotheses]
    width = max(len(group) for group in references)
    streams = [[group[i] if i < len(group) else None for group in references] for i in range(width)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score_multi(group, hyp)["rougeL"].fmeasure for hyp, group in zip(hypotheses, references)]
    return {"BLEU": sacrebleu.corpus_bleu(hypotheses, streams).score,
            "chrF": sacrebleu.corpus_chrf(hypotheses, streams).score,
            "ROUGE_L": 100 * sum(rouge) / len(rouge)}


def score_data_command(data: str, hyp: Path, *, split: str = "test", source_field: str | None = None,
                       target_field: str | None = None, as_json: bool = False, limit: int | None = None) -> int:
    """Score `hyp` (one hypothesis per line, in row order) against the targets of the data file `data`;
    returns the exit code: 0, or 2 with one `error:` line."""
    from ..data import load_records
    from .command import print_scores
    from .refs import read_lines

    try:
        if limit is not None and limit < 1:
            raise MetricsError("--limit must be >= 1")
        records = load_records(data, source_field=source_field, target_field=target_field, split=split)
        hypotheses = read_lines(hyp)
        total = len(records)
        records = records[:limit]
        if len(hypotheses) != len(records):
            hint = (f"; if they are for its first {len(hypotheses)} rows (eval --limit), add --limit {len(hypotheses)}"
                    if limit is None and len(hypotheses) < total else "")
            raise MetricsError(f"{hyp} has {len(hypotheses)} lines but {data} has {len(records)} rows"
                               f"{' selected by --limit' if limit is not None else ''} (one hypothesis per line, "
                               f"in row order){hint}")
        scores = score_text(hypotheses, [r.references for r in records])
    except (MetricsError, OSError, ValueError) as exc:  # DataFileError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(records) < total:
        print(f"note: scoring the first {len(records)} of the {total} rows of {data} (--limit)", file=sys.stderr)
    if as_json:
        print(json.dumps(scores))
    else:
        print_scores(scores, f"{data}: {len(hypotheses)} hypotheses in {hyp}")
    return 0
