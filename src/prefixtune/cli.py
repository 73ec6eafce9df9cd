"""The `prefixtune` command: a thin layer over the Python API."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer

from .models import DEFAULT_MODEL
from .serve.settings import MiB, ServeSettings
from .train_config import TrainConfig

# Option defaults come from the configs themselves, so a default changes in one place.
TRAIN = TrainConfig()
SERVE = {f.name: f.default for f in fields(ServeSettings)}

# Help is click's plain layout: it wraps to the terminal (up to 120 columns) and never cuts a name or a
# value, where rich's boxed table cut them at 80 columns ("--gradient-checkpo…"); a test checks every command.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"max_content_width": 120},
                  help="Prefix-tuning of frozen language models: train, export, generate, evaluate, serve.")

DATA_HELP = "data directory (default: $PREFIXTUNE_DATA, else ./data or ../shared/data)"


def _version(value: bool):
    if value:
        from . import __version__

        typer.echo(f"prefixtune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")):
    pass


def _fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _device_option():
    return typer.Option("auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | mps")


def _load_model(name: str, device: str = "auto"):
    """The base model, or one `error:` line (no traceback) when it cannot be loaded."""
    from .models import load_base_model

    try:
        return load_base_model(name, device=device)
    except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
        _fail(str(e))


def _task_options(train_from: Optional[str], subset: Optional[str], scheme: Optional[str]) -> dict:
    options = {"train_from": train_from, "subset": subset, "scheme": scheme}
    return {k: v for k, v in options.items() if v is not None}


@app.command()
def train(
    output_dir: Path = typer.Option(Path(TRAIN.output_dir), "--output-dir", "-o", help="checkpoints and the exported prefix"),
    model: str = typer.Option(TRAIN.model, help="embedded name, local dir, .gguf file or hub id"),
    task: str = typer.Option(TRAIN.task, help="e2e | webnlg | dart | xsum"),
    data_dir: Optional[str] = typer.Option(None, help=DATA_HELP),
    train_size: Optional[int] = typer.Option(None, help="low-data: train on this many sampled examples"),
    train_from: Optional[str] = typer.Option(None, help="DART here: train on another split, e.g. dev"),
    subset: Optional[str] = typer.Option(None, help="WebNLG: all | seen | unseen"),
    scheme: Optional[str] = typer.Option(None, help="XSUM: news-sport | within-news | official"),
    method: str = typer.Option(TRAIN.method, help="prefix | prefix-flat | embedding-only | infix | finetune | "
                                                "finetune-top2 | adapter"),
    seed: int = typer.Option(TRAIN.seed),
    prefix_len: int = typer.Option(TRAIN.prefix_len),
    mlp_dim: int = typer.Option(TRAIN.mlp_dim, help="d': width of P' and the MLP"),
    prefix_dropout: float = typer.Option(TRAIN.prefix_dropout),
    init: str = typer.Option(TRAIN.init, help='random | words:"table-to-text:"'),
    lr: Optional[float] = typer.Option(TRAIN.lr, help="default: the method's (prefix 5e-4, prefix-flat 5e-3)"),
    batch_size: int = typer.Option(TRAIN.batch_size),
    max_steps: Optional[int] = typer.Option(TRAIN.max_steps, help="default: --epochs epochs"),
    epochs: float = typer.Option(TRAIN.epochs),
    warmup_steps: int = typer.Option(TRAIN.warmup_steps),
    weight_decay: float = typer.Option(TRAIN.weight_decay),
    grad_clip: float = typer.Option(TRAIN.grad_clip),
    eval_every: int = typer.Option(TRAIN.eval_every),
    dev_size: int = typer.Option(TRAIN.dev_size),
    save_every: int = typer.Option(TRAIN.save_every),
    precision: str = typer.Option(TRAIN.precision, help="auto | bf16 | fp32"),
    gradient_checkpointing: bool = typer.Option(TRAIN.gradient_checkpointing, "--gradient-checkpointing",
                                                help="recompute activations in backward (less memory)"),
    template: Optional[str] = typer.Option(TRAIN.template, help='source template, default "{source}\\n" (decoder-only)'),
    adapter_budget: float = typer.Option(TRAIN.adapter_budget, help="adapter: fraction of the model's parameters (0.001, 0.03)"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUTPUT_DIR/checkpoint.pt"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a run already in OUTPUT_DIR"),
    device: str = _device_option(),
):
    """Train a prefix (or another --method) on a frozen model; writes OUTPUT_DIR/prefix.safetensors
    (other methods: a weights file named for the method, e.g. finetuned-model.safetensors)."""
    from .train import train as run_train

    try:
        config = TrainConfig(
            output_dir=str(output_dir), model=model, task=task, data_dir=data_dir,
            task_options=_task_options(train_from, subset, scheme), train_size=train_size, seed=seed, method=method,
            prefix_len=prefix_len, mlp_dim=mlp_dim, prefix_dropout=prefix_dropout, init=init, lr=lr,
            batch_size=batch_size, max_steps=max_steps, epochs=epochs, warmup_steps=warmup_steps,
            weight_decay=weight_decay, grad_clip=grad_clip, eval_every=eval_every, dev_size=dev_size,
            save_every=save_every, precision=precision, gradient_checkpointing=gradient_checkpointing,
            template=template, adapter_budget=adapter_budget, device=device)
        result = run_train(config, resume=resume, overwrite=overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(str(e))
    typer.echo(json.dumps({"prefix_file": result.prefix_file, "steps": result.steps, "best_step": result.best_step,
                           "trainable_pct": round(result.method.trainable_percent(), 4),
                           "shipped_pct": round(result.method.shipped_percent(), 4),
                           "best_dev_loss": result.best_dev_loss, "tokens_per_s": round(result.tokens_per_s, 1)}))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a training output dir (holds checkpoint.pt); with --format hf|peft "
                                             "also a prefix file or folder"),
    out: Path = typer.Option(None, "--out", help="default: RUN_DIR/prefix.safetensors (other methods: their "
                                                   "weights file); a folder for hf | peft"),
    which: str = typer.Option("best", help="best (lowest dev loss) | last"),
    fmt: str = typer.Option("file", "--format", help="file (one .safetensors) | hf (prefix.safetensors + model card) "
                                                     "| peft (PEFT PREFIX_TUNING adapter + model card)"),
    allow_lossy: bool = typer.Option(False, help="peft, encoder-decoder models: keep the decoder prefix only"),
):
    """Drop the MLP and write P alone (safetensors + metadata), or a folder for the hub or for PEFT."""
    if fmt != "file":
        from .interop.commands import export_folder
        from .prefix_file import PrefixFileError

        try:
            typer.echo(str(export_folder(run_dir, out, fmt, which, allow_lossy)))
        except (PrefixFileError, ValueError, FileNotFoundError) as e:
            _fail(str(e))
        return

    from .train import export_checkpoint

    try:
        target = export_checkpoint(run_dir, out, which)
    except FileNotFoundError as e:
        _fail(str(e))
    typer.echo(str(target))


@app.command()
def info(prefix: Path = typer.Argument(..., help="an exported .safetensors file, or a training directory")):
    """Show an exported prefix's (or another method's weights') metadata and shapes."""
    from .exported import describe, find_export
    from .prefix_file import PrefixFileError, readable_metadata

    try:
        metadata, shapes = describe(find_export(prefix))
    except PrefixFileError as e:
        _fail(str(e))
    meta = readable_metadata({k: v for k, v in metadata.items() if k != "train_config"})
    meta["shapes"] = shapes if len(shapes) <= 20 else f"{len(shapes)} tensors"
    meta["params"] = sum(math.prod(shape) for shape in shapes.values())
    typer.echo(json.dumps(meta, indent=2))


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
    device: str = _device_option(),
):
    """Decode inputs with a prefix, in left-padded batches (batched output equals one-by-one output)."""
    from .exported import ExportDecoder, check_export
    from .generation import DecodingConfig
    from .models import resolve_device

    texts = _read_inputs(inputs or [], input_file)
    try:  # everything that can be checked without the model, before loading it
        config = DecodingConfig(max_new_tokens=max_new_tokens, num_beams=beams, stop_at_newline=stop_at_newline,
                                no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty)
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
    device: str = _device_option(),
):
    """Decode a split with a prefix, score it, and write OUT_DIR/hypotheses.txt and scores.json."""
    from rich.console import Console
    from tqdm.auto import tqdm

    from .data import load_task
    from .evaluate import score_records, write_results
    from .exported import ExportDecoder, check_export
    from .generation import DecodingConfig
    from .metrics import TASK_METRICS, MetricsError
    from .models import resolve_device

    try:  # data, file and options before the model
        every = load_task(task, split, data_dir, **_task_options(None, subset, scheme))
        records = every[:limit]
        path, kind = check_export(prefix)
        config = DecodingConfig(max_new_tokens=max_new_tokens, num_beams=beams,
                                no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty)
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
    console = Console(stderr=True)
    metrics = "sacreBLEU" if bleu_only else ", ".join(("sacreBLEU",) + TASK_METRICS.get(task, ()))
    console.print(f"scoring {len(hypotheses)} hypotheses: {metrics}", highlight=False)
    try:
        with console.status("scoring…"):  # the official metrics take seconds (METEOR starts a JVM)
            scores = score_records(task, hypotheses, records, full=not bleu_only)
    except MetricsError as e:  # e.g. no Java for METEOR
        _fail(f"{e} (--bleu-only scores sacreBLEU without it)")
    write_results(out, hypotheses, scores)
    typer.echo(json.dumps({k: round(v, 4) for k, v in scores.items()}))
    which = f"the first {len(records)} of {len(every)}" if len(records) < len(every) else f"all {len(records)}"
    typer.echo(f"hypotheses and scores of {which} {task} {split} items written to {out}/", err=True)


@app.command()
def score(
    task: str = typer.Argument(..., help="e2e | webnlg | dart | xsum"),
    hyp: Path = typer.Option(..., "--hyp", help="hypotheses, one per line"),
    refs: Optional[Path] = typer.Option(None, "--refs", help="references (E2E blank-line groups, or one per line); "
                                                             "default: the task's split from the data dir"),
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
    from .metrics.command import score_command

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
    from .demo import run_demo

    try:
        summary = run_demo(output_dir, data_dir, train_size, steps, test_size, seed)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(json.dumps(summary))


@app.command()
def serve(
    model: str = typer.Option(DEFAULT_MODEL, help="embedded name, local dir, .gguf file or hub id"),
    store: Path = typer.Option(Path("prefix-store"), help="directory of the tenants' prefixes (kept across restarts)"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000),
    keys_file: Optional[Path] = typer.Option(None, help="API keys: JSON {key: tenant} or 'key:tenant' lines "
                                                         "(also $PREFIXTUNE_API_KEYS='key:tenant,...')"),
    batch_window_ms: float = typer.Option(SERVE["batch_window_ms"], help="requests arriving within this window are decoded together"),
    max_batch_size: int = typer.Option(SERVE["max_batch_size"], help="rows per decoding batch"),
    max_batch_tokens: int = typer.Option(SERVE["max_batch_tokens"], help="prompt tokens per decoding batch (bounds one prefill step)"),
    max_queue: int = typer.Option(SERVE["max_queue"], help="rows waiting to be decoded; beyond that: 429"),
    request_timeout: float = typer.Option(SERVE["request_timeout_s"], help="seconds a completion may wait and decode; then 503"),
    max_upload_mb: float = typer.Option(SERVE["max_upload_bytes"] / MiB, help="largest prefix upload"),
    max_prefixes: int = typer.Option(SERVE["max_prefixes_per_tenant"], help="prefixes per tenant"),
    tenant_quota_mb: float = typer.Option(SERVE["max_bytes_per_tenant"] / MiB, help="bytes of prefixes per tenant"),
    max_tokens_limit: int = typer.Option(SERVE["max_tokens_limit"], help="largest max_tokens a request may ask for"),
    max_prompt_tokens: int = typer.Option(SERVE["max_prompt_tokens"], help="longest prompt, template included; longer: 400 unless the "
                                                    "request sends truncate_prompt_tokens"),
    body_timeout: float = typer.Option(SERVE["body_timeout_s"], help="seconds to receive a request body (upload or JSON); then 408"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    log_level: str = typer.Option("info"),
    device: str = _device_option(),
):
    """Serve many tenants' prefixes from one frozen model: OpenAI-compatible /v1/completions (model = prefix)."""
    from .serve import serve as run_server

    try:
        run_server(model, store, host=host, port=port, keys_file=keys_file, threads=threads, log_level=log_level,
                   device=device,
                   batch_window_ms=batch_window_ms, max_batch_size=max_batch_size,
                   max_batch_tokens=max_batch_tokens, max_queue=max_queue,
                   request_timeout_s=request_timeout, max_upload_bytes=int(max_upload_mb * MiB),
                   max_prefixes_per_tenant=max_prefixes, max_bytes_per_tenant=int(tenant_quota_mb * MiB),
                   max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens,
                   body_timeout_s=body_timeout)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


@app.command()
def experiment(
    name: str = typer.Argument(..., help="lowdata | prefix-length | init | ablation | extrapolation | main"),
    task: Optional[str] = typer.Option(None, help="e2e | webnlg | dart | xsum (main: a comma list or all); "
                                                  "default: the study's"),
    scale: str = typer.Option("cpu", help="tiny (seconds) | cpu (about an hour here) | paper (the paper's settings)"),
    out: Optional[Path] = typer.Option(None, help="default: reports/NAME"),
    model: Optional[str] = typer.Option(None, help="default: smollm2-135m (cpu), the paper's model (paper)"),
    data_dir: Optional[str] = typer.Option(None, help=DATA_HELP),
    report_only: bool = typer.Option(False, "--report-only",
                                     help="rewrite report.md and figures from finished cells; run nothing"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (1 is fastest on a busy 2-core machine)"),
):
    """Run a study (resuming finished cells from OUT/cells.jsonl) and write OUT/report.md with PNG figures."""
    from .experiments import run_experiment

    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        result = run_experiment(name, task, scale, out, model, data_dir, report_only=report_only)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(json.dumps(result))


from .interop.commands import register as _register_interop  # noqa: E402  (import, push, pull)

_register_interop(app)

if __name__ == "__main__":
    app()
