"""`generate`, `eval`, `score` and `demo`: decoding with a prefix and scoring what it wrote."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..models import DEFAULT_MODEL
from .app import DATA_HELP, _device_option, _fail, _load_model, _task_options, app


def _read_inputs(inputs: list[str], input_file: Optional[Path]) -> list[str]:
    if inputs and inputs != ["-"]:
        return list(inputs)
    if input_file is not None:
        if not input_file.is_file():
            _fail(f"input file not found: {input_file}")
        texts = [line for line in input_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            _fail(f"no inputs: {input_file} holds no non-empty line")
        return texts
    if inputs == ["-"] or not sys.stdin.isatty():
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not texts:
            _fail("no inputs: stdin was empty (give one source per line, arguments, or --input-file)")
        return texts
    _fail("no inputs: give them as arguments, with --input-file, or on stdin")


EXPORT_HELP = "exported prefix, another method's weights (.safetensors), or a training directory"
NGRAM_HELP = "never repeat an n-gram of this size within the output (0: off)"
PENALTY_HELP = "repetition penalty on tokens already generated, as in HF (1: off; e.g. 1.2)"
DTYPE_HELP = ("greedy decoding's dtype: auto (bf16 where the CPU computes it natively, else fp32), bf16, fp32, "
              "or model (the model's own); beam search runs in the model's dtype")


@app.command()
def generate(
    inputs: list[str] = typer.Argument(None, help="source texts ('-' or none: read stdin)"),
    prefix: Optional[Path] = typer.Option(None, help=EXPORT_HELP + "; none = the bare model"),
    model: str = typer.Option(DEFAULT_MODEL),
    input_file: Optional[Path] = typer.Option(None, help="one source per line"),
    beams: int = typer.Option(1, help="1 = greedy; the paper uses 5"),
    max_new_tokens: int = typer.Option(64),
    stop_at_newline: bool = typer.Option(True),
    batch_size: int = typer.Option(32),
    raw: bool = typer.Option(False, "--raw", help="feed inputs as they are, not through the prefix's template"),
    no_repeat_ngram_size: int = typer.Option(0, help=NGRAM_HELP),
    repetition_penalty: float = typer.Option(1.0, help=PENALTY_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = _device_option(),
):
    """Decode inputs with a prefix, continuously batched (batched output equals one-by-one output)."""
    from ..exported import ExportDecoder, check_export
    from ..generation import DecodingConfig
    from ..models import resolve_device

    texts = _read_inputs(inputs or [], input_file)
    try:  # everything that can be checked without the model, before loading it
        config = DecodingConfig(max_new_tokens=max_new_tokens, num_beams=beams, stop_at_newline=stop_at_newline,
                                no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty,
                                dtype=dtype)
        path, kind = check_export(prefix) if prefix is not None else (None, None)
        resolve_device(device)
    except ValueError as e:  # PrefixFileError is a ValueError
        _fail(str(e))
    base, tokenizer = _load_model(model, device)
    try:
        outputs = ExportDecoder(base, tokenizer, path, kind).generate(texts, config, batch_size, raw=raw)
    except ValueError as e:
        _fail(str(e))
    for line in outputs:
        typer.echo(line)


@app.command("eval")
def eval_cmd(
    prefix: Path = typer.Option(..., help=EXPORT_HELP),
    model: str = typer.Option(DEFAULT_MODEL),
    task: str = typer.Option("e2e"),
    split: str = typer.Option("test"),
    data_dir: Optional[str] = typer.Option(None, help=DATA_HELP),
    subset: Optional[str] = typer.Option(None, help="WebNLG: all | seen | unseen"),
    scheme: Optional[str] = typer.Option(None, help="XSUM: news-sport | within-news | official"),
    limit: Optional[int] = typer.Option(None, help="only the first N inputs (score them with score --limit N)"),
    beams: int = typer.Option(1),
    max_new_tokens: int = typer.Option(64),
    batch_size: int = typer.Option(32),
    no_repeat_ngram_size: int = typer.Option(0, help=NGRAM_HELP),
    repetition_penalty: float = typer.Option(1.0, help=PENALTY_HELP),
    out_dir: Optional[Path] = typer.Option(None, help="default: eval-TASK-SPLIT/ next to the prefix file"),
    bleu_only: bool = typer.Option(False, "--bleu-only", help="sacreBLEU only (skip the official metric suite)"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = _device_option(),
):
    """Decode a split with a prefix, score it, and write OUT_DIR/hypotheses.txt and scores.json."""
    from rich.console import Console
    from tqdm.auto import tqdm

    from ..data import load_task
    from ..evaluate import score_records, write_hypotheses, write_scores
    from ..exported import ExportDecoder, check_export
    from ..generation import DecodingConfig
    from ..metrics import TASK_METRICS, MetricsError
    from ..models import resolve_device

    try:  # data, file and options before the model
        every = load_task(task, split, data_dir, **_task_options(None, subset, scheme))
        records = every[:limit]
        path, kind = check_export(prefix)
        config = DecodingConfig(max_new_tokens=max_new_tokens, num_beams=beams,
                                no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty,
                                dtype=dtype)
        resolve_device(device)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    base, tokenizer = _load_model(model, device)
    try:
        decoder = ExportDecoder(base, tokenizer, path, kind)
    except ValueError as e:
        _fail(str(e))
    out = out_dir or path.parent / f"eval-{task}-{split}"
    with tqdm(total=len(records), desc=f"decode {task}/{split}") as bar:
        hypotheses = decoder.generate([r.source for r in records], config, batch_size, progress=bar.update)
    written = write_hypotheses(out, hypotheses)  # first: a metric that fails never costs the decoding
    console = Console(stderr=True)
    metrics = "sacreBLEU" if bleu_only else ", ".join(("sacreBLEU",) + TASK_METRICS.get(task, ()))
    console.print(f"scoring {len(hypotheses)} hypotheses: {metrics}", highlight=False)
    skipped: list[str] = []
    try:
        with console.status("scoring…"):  # the official metrics take seconds (METEOR starts a JVM)
            scores = score_records(task, hypotheses, records, full=not bleu_only, skipped=skipped)
    except MetricsError as e:  # not one metric could score them
        _fail(f"{e} (the hypotheses are in {written})")
    for line in skipped:  # a metric that cannot score this data: the others still count
        typer.echo(f"warning: {line}", err=True)
    write_scores(out, scores)
    typer.echo(json.dumps({k: round(v, 4) for k, v in scores.items()}))
    which = f"the first {len(records)} of {len(every)}" if len(records) < len(every) else f"all {len(records)}"
    typer.echo(f"hypotheses and scores of {which} {task} {split} items written to {out}/", err=True)


@app.command()
def score(
    task: str = typer.Argument(..., help="e2e | webnlg | dart | xsum"),
    hyp: Path = typer.Option(..., "--hyp", help="hypotheses, one per line"),
    refs: Optional[Path] = typer.Option(None, "--refs", help="references as plain text (E2E blank-line groups, or "
                                                             "one per line; not JSON) or an E2E .csv; default: the "
                                                             "task's split from the data dir"),
    split: str = typer.Option("test"),
    data_dir: Optional[str] = typer.Option(None, help=DATA_HELP),
    subset: Optional[str] = typer.Option(None, help="WebNLG: all | seen | unseen"),
    scheme: Optional[str] = typer.Option(None, help="XSUM: news-sport | within-news | official"),
    nist: str = typer.Option("perl", help="E2E BLEU/NIST: perl (mteval-v13a, measure_scores.py's default) | "
                                          "python (measure_scores.py -p, the paper's runs)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    limit: Optional[int] = typer.Option(None, help="the hypotheses are for the split's first N items "
                                                   "(what eval --limit N decoded)"),
):
    """Score a hypothesis file with the official-equal metrics of TASK."""
    from ..metrics.command import score_command

    raise typer.Exit(score_command(task, hyp, refs, split, data_dir, as_json,
                                   loader_options=_task_options(None, subset, scheme), mteval_variant=nist,
                                   limit=limit))


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("runs/demo"), "--output-dir", "-o"),
    data_dir: Optional[str] = typer.Option(None, help=DATA_HELP),
    train_size: int = typer.Option(200),
    steps: int = typer.Option(200),
    test_size: int = typer.Option(100),
    seed: int = typer.Option(1),
):
    """The main job: BLEU of the embedded model before and after a prefix trained on 200 E2E examples."""
    from ..demo import run_demo

    try:
        summary = run_demo(output_dir, data_dir, train_size, steps, test_size, seed)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(json.dumps(summary))
