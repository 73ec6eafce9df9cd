"""The `prefixtune` command: a thin layer over the Python API."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .models import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prefix-tuning of frozen language models: train, export, generate, evaluate, serve.")

DATA_HELP = "data directory (default: $PREFIXTUNE_DATA)"


def _fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _task_options(train_from: Optional[str], subset: Optional[str], scheme: Optional[str]) -> dict:
    options = {"train_from": train_from, "subset": subset, "scheme": scheme}
    return {k: v for k, v in options.items() if v is not None}


@app.command()
def train(
    output_dir: Path = typer.Option(Path("runs/prefix"), "--output-dir", "-o", help="checkpoints and the exported prefix"),
    model: str = typer.Option(DEFAULT_MODEL, help="embedded name, local dir, .gguf file or hub id"),
    task: str = typer.Option("e2e", help="e2e | webnlg | dart | xsum"),
    data_dir: Optional[str] = typer.Option(None, help=DATA_HELP),
    train_size: Optional[int] = typer.Option(None, help="low-data: train on this many sampled examples"),
    train_from: Optional[str] = typer.Option(None, help="DART here: train on another split, e.g. dev"),
    subset: Optional[str] = typer.Option(None, help="WebNLG: all | seen | unseen"),
    scheme: Optional[str] = typer.Option(None, help="XSUM: news-sport | within-news | official"),
    method: str = typer.Option("prefix", help="prefix | prefix-flat | embedding-only | infix | finetune | "
                                                "finetune-top2 | adapter"),
    seed: int = typer.Option(1),
    prefix_len: int = typer.Option(10),
    mlp_dim: int = typer.Option(512, help="d': width of P' and the MLP"),
    prefix_dropout: float = typer.Option(0.0),
    init: str = typer.Option("random", help='random | words:"table-to-text:"'),
    lr: Optional[float] = typer.Option(None, help="default: the method's (prefix 5e-4, prefix-flat 5e-3)"),
    batch_size: int = typer.Option(8),
    max_steps: Optional[int] = typer.Option(None, help="default: --epochs epochs"),
    epochs: float = typer.Option(5.0),
    warmup_steps: int = typer.Option(0),
    weight_decay: float = typer.Option(0.0),
    grad_clip: float = typer.Option(1.0),
    eval_every: int = typer.Option(50),
    dev_size: int = typer.Option(100),
    save_every: int = typer.Option(50),
    precision: str = typer.Option("auto", help="auto | bf16 | fp32"),
    gradient_checkpointing: bool = typer.Option(False),
    template: Optional[str] = typer.Option(None, help='source template, default "{source}\\n" (decoder-only)'),
    adapter_budget: float = typer.Option(0.001, help="adapter: fraction of the model's parameters (0.001, 0.03)"),
    resume: bool = typer.Option(False, help="continue from OUTPUT_DIR/checkpoint.pt"),
):
    """Train a prefix (or another --method) on a frozen model; writes OUTPUT_DIR/prefix.safetensors."""
    from .train import TrainConfig, train as run_train

    config = TrainConfig(
        output_dir=str(output_dir), model=model, task=task, data_dir=data_dir,
        task_options=_task_options(train_from, subset, scheme), train_size=train_size, seed=seed, method=method,
        prefix_len=prefix_len, mlp_dim=mlp_dim, prefix_dropout=prefix_dropout, init=init, lr=lr,
        batch_size=batch_size, max_steps=max_steps, epochs=epochs, warmup_steps=warmup_steps,
        weight_decay=weight_decay, grad_clip=grad_clip, eval_every=eval_every, dev_size=dev_size,
        save_every=save_every, precision=precision, gradient_checkpointing=gradient_checkpointing, template=template,
        adapter_budget=adapter_budget)
    try:
        result = run_train(config, resume=resume)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(json.dumps({"prefix_file": result.prefix_file, "steps": result.steps, "best_step": result.best_step,
                           "trainable_pct": round(result.method.trainable_percent(), 4),
                           "shipped_pct": round(result.method.shipped_percent(), 4),
                           "best_dev_loss": result.best_dev_loss, "tokens_per_s": round(result.tokens_per_s, 1)}))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a training output dir (holds checkpoint.pt)"),
    out: Path = typer.Option(None, "--out", help="default: RUN_DIR/prefix.safetensors"),
    which: str = typer.Option("best", help="best (lowest dev loss) | last"),
):
    """Drop the MLP and write P alone (safetensors + metadata) from a training checkpoint."""
    import torch

    from .methods import build_method
    from .models import load_base_model, model_spec
    from .train import CHECKPOINT, PREFIX_FILE, TrainConfig

    path = run_dir / CHECKPOINT
    if not path.is_file():
        _fail(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    config = TrainConfig(**ckpt["config"])
    model, tokenizer = load_base_model(config.model)
    spec = model_spec(model)
    method = build_method(config.method, model, tokenizer, spec, config)
    state = ckpt["best"]["state"] if which == "best" and ckpt["best"]["state"] is not None else ckpt["module"]
    method.module.load_state_dict(state)
    target = method.export(out or run_dir / PREFIX_FILE, {**ckpt["config"], "exported_from_step":
                                                          ckpt["best"]["step"] if which == "best" else ckpt["step"]})
    typer.echo(str(target))


@app.command()
def info(prefix: Path = typer.Argument(..., help="an exported .safetensors prefix")):
    """Show an exported prefix's metadata and shapes."""
    from .io import PrefixFileError, load_prefix

    try:
        exported = load_prefix(prefix)
    except PrefixFileError as e:
        _fail(str(e))
    meta = {k: v for k, v in exported.metadata.items() if k != "train_config"}
    meta["shapes"] = {g: list(t.shape) for g, t in exported.p.items()}
    meta["params"] = exported.num_params()
    typer.echo(json.dumps(meta, indent=2))


def _read_inputs(inputs: list[str], input_file: Optional[Path]) -> list[str]:
    if inputs and inputs != ["-"]:
        return list(inputs)
    if input_file is not None:
        return [line.rstrip("\n") for line in input_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if inputs == ["-"] or not sys.stdin.isatty():
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    _fail("no inputs: give them as arguments, with --input-file, or on stdin")


@app.command()
def generate(
    inputs: list[str] = typer.Argument(None, help="source texts ('-' or none: read stdin)"),
    prefix: Optional[Path] = typer.Option(None, help="exported prefix (.safetensors); none = the bare model"),
    model: str = typer.Option(DEFAULT_MODEL),
    input_file: Optional[Path] = typer.Option(None, help="one source per line"),
    beams: int = typer.Option(1, help="1 = greedy; the paper uses 5"),
    max_new_tokens: int = typer.Option(64),
    stop_at_newline: bool = typer.Option(True),
    batch_size: int = typer.Option(32),
    raw: bool = typer.Option(False, help="feed inputs as they are, not through the prefix's template"),
):
    """Decode inputs with a prefix, in left-padded batches (batched output equals one-by-one output)."""
    from .bank import PrefixBank
    from .generation import DecodingConfig
    from .io import PrefixFileError
    from .models import load_base_model

    texts = _read_inputs(inputs or [], input_file)
    base, tokenizer = load_base_model(model)
    bank = PrefixBank(base, tokenizer)
    try:
        if prefix is not None:
            bank.add("prefix", prefix)
        config = DecodingConfig(max_new_tokens=max_new_tokens, num_beams=beams, stop_at_newline=stop_at_newline)
    except (PrefixFileError, ValueError) as e:
        _fail(str(e))
    for line in bank.generate(texts, "prefix" if prefix else None, config, batch_size=batch_size, raw=raw):
        typer.echo(line)


@app.command("eval")
def eval_cmd(
    prefix: Path = typer.Option(..., help="exported prefix (.safetensors)"),
    model: str = typer.Option(DEFAULT_MODEL),
    task: str = typer.Option("e2e"),
    split: str = typer.Option("test"),
    data_dir: Optional[str] = typer.Option(None, help=DATA_HELP),
    subset: Optional[str] = typer.Option(None, help="WebNLG: all | seen | unseen"),
    scheme: Optional[str] = typer.Option(None, help="XSUM: news-sport | within-news | official"),
    limit: Optional[int] = typer.Option(None, help="only the first N inputs"),
    beams: int = typer.Option(1),
    max_new_tokens: int = typer.Option(64),
    batch_size: int = typer.Option(32),
    out_dir: Optional[Path] = typer.Option(None, help="default: next to the prefix, eval-TASK-SPLIT/"),
    bleu_only: bool = typer.Option(False, help="sacreBLEU only (skip the official metric suite)"),
):
    """Decode a split with a prefix, score it, and write hypotheses.txt and scores.json."""
    from .bank import PrefixBank
    from .data import load_task
    from .evaluate import evaluate
    from .generation import DecodingConfig
    from .io import PrefixFileError
    from .models import load_base_model

    try:
        records = load_task(task, split, data_dir, **_task_options(None, subset, scheme))[:limit]
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    base, tokenizer = load_base_model(model)
    bank = PrefixBank(base, tokenizer)
    try:
        bank.add("prefix", prefix)
    except PrefixFileError as e:
        _fail(str(e))
    out = out_dir or prefix.parent / f"eval-{task}-{split}"
    from tqdm.auto import tqdm

    with tqdm(total=len(records), desc=f"decode {task}/{split}") as bar:
        scores, _ = evaluate(bank, records, "prefix", DecodingConfig(max_new_tokens=max_new_tokens, num_beams=beams),
                             task, out, batch_size, full_metrics=not bleu_only, progress=bar.update)
    typer.echo(json.dumps({k: round(v, 4) for k, v in scores.items()}))
    typer.echo(f"hypotheses and scores written to {out}", err=True)


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
):
    """Score a hypothesis file with the official-equal metrics of TASK."""
    from .metrics.command import score_command

    raise typer.Exit(score_command(task, hyp, refs, split, data_dir, as_json,
                                   loader_options=_task_options(None, subset, scheme), mteval_variant=nist))


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
    batch_window_ms: float = typer.Option(10.0, help="requests arriving within this window are decoded together"),
    max_batch_size: int = typer.Option(32, help="rows per decoding batch"),
    max_queue: int = typer.Option(256, help="rows waiting to be decoded; beyond that: 429"),
    request_timeout: float = typer.Option(120.0, help="seconds a completion may wait and decode; then 503"),
    max_upload_mb: float = typer.Option(16.0, help="largest prefix upload"),
    max_prefixes: int = typer.Option(64, help="prefixes per tenant"),
    tenant_quota_mb: float = typer.Option(256.0, help="bytes of prefixes per tenant"),
    max_tokens_limit: int = typer.Option(512, help="largest max_tokens a request may ask for"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    log_level: str = typer.Option("info"),
    engine: str = typer.Option("prefixtune", help="prefixtune | vllm (vLLM's OpenAI server with prefixtune's "
                                                 "connector; needs vLLM: `make vllm`)"),
    tensor_parallel_size: int = typer.Option(1, help="vllm: GPUs per model replica"),
    vllm_args: str = typer.Option("", help='vllm: more `vllm serve` arguments, e.g. "--max-model-len 4096"'),
):
    """Serve many tenants' prefixes from one frozen model: OpenAI-compatible /v1/completions (model = prefix)."""
    if engine == "vllm":
        from .vllm.launcher import run as run_vllm

        try:
            run_vllm(model, store, host=host, port=port, keys_file=keys_file,
                     tensor_parallel_size=tensor_parallel_size, extra_args=vllm_args)
        except (ValueError, FileNotFoundError) as e:
            _fail(str(e))
    if engine != "prefixtune":
        _fail(f"unknown engine {engine!r}: prefixtune | vllm")
    from .serve import serve as run_server

    try:
        run_server(model, store, host=host, port=port, keys_file=keys_file, threads=threads, log_level=log_level,
                   batch_window_ms=batch_window_ms, max_batch_size=max_batch_size, max_queue=max_queue,
                   request_timeout_s=request_timeout, max_upload_bytes=int(max_upload_mb * 2**20),
                   max_prefixes_per_tenant=max_prefixes, max_bytes_per_tenant=int(tenant_quota_mb * 2**20),
                   max_tokens_limit=max_tokens_limit)
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
    report_only: bool = typer.Option(False, help="rewrite report.md and figures from finished cells; run nothing"),
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


if __name__ == "__main__":
    app()
