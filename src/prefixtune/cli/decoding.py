"""`generate`, `eval`, `score` and `demo`: decoding with a prefix and scoring what it wrote."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..models import DEFAULT_MODEL
from .app import (DATA_FILE_HELP, DATA_HELP, SOURCE_FIELD_HELP, TARGET_FIELD_HELP, _device_option, _fail,
                  _load_model, _task_options, app)


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


def _check_batch_size(batch_size: int):
    if batch_size < 1:  # the engine would quietly decode one input at a time
        raise ValueError("--batch-size must be >= 1")


def _is_data_file(path: Path) -> bool:
    """A data file (JSONL, CSV/TSV, Parquet, a dataset folder) rather than plain text, one input per line."""
    from ..data.files import FORMATS

    return path.is_dir() or path.suffix.lower() in FORMATS


EXPORT_HELP = "exported prefix, another method's weights (.safetensors), or a training directory"
NGRAM_HELP = "never repeat an n-gram of this size within the output (0: off)"
PENALTY_HELP = "repetition penalty on tokens already generated, as in HF (1: off; e.g. 1.2)"
DTYPE_HELP = ("decoding dtype: auto (bf16 where the CPU computes it natively, else fp32), bf16, fp32, "
              "or model (the model's own); encoder-decoders decode in the model's dtype")


@app.command()
def generate(
    inputs: list[str] = typer.Argument(None, help="source texts ('-' or none: read stdin)"),
    prefix: Optional[Path] = typer.Option(None, help=EXPORT_HELP + "; none = the bare model"),
    model: str = typer.Option(DEFAULT_MODEL),
    input_file: Optional[Path] = typer.Option(None, help="one source per line; or a data file (.jsonl, .csv, .tsv, "
                                                         ".parquet, a dataset folder): its sources, or chat rows"),
    source_field: Optional[str] = typer.Option(None, help=SOURCE_FIELD_HELP.replace("--data", "a data --input-file")),
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

    if input_file is not None and inputs:  # one source of inputs: the other would be silently ignored
        _fail("give inputs as arguments (or '-': stdin) or with --input-file, not both")
    data_file = input_file is not None and _is_data_file(input_file)
    if source_field is not None and not data_file:
        _fail("--source-field applies to a data --input-file (.jsonl, .json, .csv, .tsv, .parquet, a dataset folder)")
    if data_file:
        from ..data.files import load_sources

        try:
            texts = load_sources(input_file, source_field=source_field)
        except ValueError as e:  # DataFileError names the file, the line and the field
            _fail(str(e))
    else:
        texts = _read_inputs(inputs or [], input_file)
    try:  # everything that can be checked without the model, before loading it
        _check_batch_size(batch_size)
        config = DecodingConfig(max_new_tokens=max_new_tokens, num_beams=beams, stop_at_newline=stop_at_newline,
                                no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty,
                                dtype=dtype)
        path, kind = check_export(prefix) if prefix is not None else (None, None)
        resolve_device(device)
    except ValueError as e:  # PrefixFileError is a ValueError
        _fail(str(e))
    if raw and texts and not isinstance(texts[0], str):
        _fail("--raw applies to text inputs; chat rows are always written with the model's chat template")
    base, tokenizer = _load_model(model, device)
    try:
        decoder = ExportDecoder(base, tokenizer, path, kind)
        if texts and not isinstance(texts[0], str):  # chat rows (data/chat.py Conversations)
            outputs = decoder.generate_chats(texts, config, batch_size)
        else:
            outputs = decoder.generate(texts, config, batch_size, raw=raw)
    except ValueError as e:
        _fail(str(e))
    for line in outputs:
        typer.echo(line)


@app.command("eval")
def eval_cmd(
    prefix: Path = typer.Option(..., help=EXPORT_HELP),
    model: str = typer.Option(DEFAULT_MODEL),
    task: Optional[str] = typer.Option(None, help="e2e | webnlg | dart | xsum (default e2e; not with --data)"),
    split: str = typer.Option("test", help="the task's split; with --data, the split of a dataset folder or hub id"),
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
    data: Optional[str] = typer.Option(None, help=DATA_FILE_HELP + "; scored with BLEU, chrF and ROUGE-L"),
    source_field: Optional[str] = typer.Option(None, help=SOURCE_FIELD_HELP),
    target_field: Optional[str] = typer.Option(None, help=TARGET_FIELD_HELP),
):
    """Decode a split with a prefix, score it, and write OUT_DIR/hypotheses.txt and scores.json
    (--data FILE: your own rows, with outputs.jsonl: each hypothesis beside its references)."""
    from rich.console import Console
    from tqdm.auto import tqdm

    from ..data import load_task
    from ..evaluate import score_records, write_hypotheses, write_scores
    from ..exported import ExportDecoder, check_export
    from ..generation import DecodingConfig
    from ..metrics import TASK_METRICS, MetricsError
    from ..models import resolve_device

    if data is not None:
        given = [flag for flag, value in (("--task", task), ("--data-dir", data_dir), ("--subset", subset),
                                          ("--scheme", scheme)) if value is not None]
        if given:
            _fail(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply with --data")
        if bleu_only:
            _fail("--bleu-only applies to a task's official metric suite; --data scores BLEU, chrF and ROUGE-L")
        return _eval_data(data, source_field, target_field, split, prefix, model, limit, out_dir, batch_size, device,
                          DecodingConfig, dict(max_new_tokens=max_new_tokens, num_beams=beams, dtype=dtype,
                                               no_repeat_ngram_size=no_repeat_ngram_size,
                                               repetition_penalty=repetition_penalty))
    if source_field is not None or target_field is not None:
        _fail("--source-field and --target-field apply to --data FILE, which is missing")
    task = task or "e2e"
    try:  # data, file and options before the model
        if limit is not None and limit < 1:  # every[:-1] would quietly drop the last item, every[:0] all of them
            raise ValueError("--limit must be >= 1")
        _check_batch_size(batch_size)
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


def _eval_data(data, source_field, target_field, split, prefix, model, limit, out_dir, batch_size, device,
               decoding_config, decoding: dict):
    """`eval --data FILE`: decode the file's sources (or chat rows), score BLEU, chrF and ROUGE-L against its
    targets, and write OUT_DIR/hypotheses.txt, scores.json and outputs.jsonl (hypothesis beside references)."""
    from tqdm.auto import tqdm

    from ..atomic import atomic_write_bytes
    from ..data import load_records
    from ..evaluate import write_results
    from ..exported import ExportDecoder, check_export
    from ..metrics.generic import score_text
    from ..models import resolve_device

    try:  # every row, the prefix and the options checked before the model
        every = load_records(data, source_field=source_field, target_field=target_field, split=split)
        if limit is not None and limit < 1:
            raise ValueError("--limit must be >= 1")
        _check_batch_size(batch_size)
        records = every[:limit]
        path, kind = check_export(prefix)
        config = decoding_config(**decoding)
        resolve_device(device)
    except (ValueError, FileNotFoundError) as e:  # DataFileError names the file, the line and the field
        _fail(str(e))
    base, tokenizer = _load_model(model, device)
    out = out_dir or path.parent / f"eval-{_data_name(data)}"
    try:
        decoder = ExportDecoder(base, tokenizer, path, kind)
        with tqdm(total=len(records), desc=f"decode {data}") as bar:
            if "messages" in records[0].meta:
                from ..data.chat import Conversation

                hypotheses = decoder.generate_chats([Conversation.of(r.meta["messages"]) for r in records], config,
                                                    batch_size, progress=bar.update)
            else:
                hypotheses = decoder.generate([r.source for r in records], config, batch_size, progress=bar.update)
    except ValueError as e:
        _fail(str(e))
    scores = score_text(hypotheses, [r.references for r in records])
    write_results(out, hypotheses, scores)
    rows = [{"line": r.meta["line"], "source": r.source, "hypothesis": h, "references": r.references}
            for r, h in zip(records, hypotheses)]
    atomic_write_bytes(Path(out) / "outputs.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                                            for row in rows).encode())
    typer.echo(json.dumps({k: round(v, 4) for k, v in scores.items()}))
    which = f"the first {len(records)} of {len(every)}" if len(records) < len(every) else f"all {len(records)}"
    typer.echo(f"hypotheses and scores of {which} rows of {data} written to {out}/", err=True)


def _data_name(data: str) -> str:
    """A folder name for a data file, folder or hub id: its name without the suffix, '/' made '-'."""
    path = Path(data)
    return (path.stem if path.suffix else path.name) if path.exists() else data.replace("/", "-")


@app.command()
def score(
    task: Optional[str] = typer.Argument(None, help="e2e | webnlg | dart | xsum (none with --data)"),
    hyp: Path = typer.Option(..., "--hyp", help="hypotheses, one per line"),
    data: Optional[str] = typer.Option(None, help=DATA_FILE_HELP + "; its targets are the references "
                                                                   "(BLEU, chrF, ROUGE-L)"),
    source_field: Optional[str] = typer.Option(None, help=SOURCE_FIELD_HELP),
    target_field: Optional[str] = typer.Option(None, help=TARGET_FIELD_HELP),
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
    """Score a hypothesis file with the official-equal metrics of TASK, or against --data FILE's targets."""
    from ..metrics.command import score_command

    if data is not None:
        if task is not None or refs is not None:
            _fail(f"{'TASK' if task is not None else '--refs'} does not apply with --data (its targets are the references)")
        from ..metrics.generic import score_data_command

        raise typer.Exit(score_data_command(data, hyp, split=split, source_field=source_field,
                                            target_field=target_field, as_json=as_json, limit=limit))
    if task is None:
        _fail("give a TASK (e2e | webnlg | dart | xsum), or --data FILE to score against your own file")

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
