"""`train`, `export` and `info`: making a prefix (or another method's weights) and looking at it."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import typer

from ..tracking import REPORT_TO_HELP
from ..train_config import TrainConfig
from .app import (DATA_FILE_HELP, DATA_HELP, SOURCE_FIELD_HELP, TARGET_FIELD_HELP, _device_option, _fail,
                  _task_options, app)

# Option defaults come from the config itself, so a default changes in one place.
TRAIN = TrainConfig()


@app.command()
def train(
    ctx: typer.Context,
    output_dir: Path = typer.Option(Path(TRAIN.output_dir), "--output-dir", "-o", help="checkpoints and the exported prefix"),
    model: str = typer.Option(TRAIN.model, help="embedded name, local dir, .gguf file or hub id"),
    task: Optional[str] = typer.Option(None, help=f"e2e | webnlg | dart | xsum (default {TRAIN.task}; not with --data)"),
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
    prefix_dropout: float = typer.Option(TRAIN.prefix_dropout, help="dropout on P (prefix, prefix-flat, infix)"),
    init: str = typer.Option(TRAIN.init, help='random | words:"table-to-text:" (prefix, prefix-flat, infix, '
                                              'embedding-only)'),
    lr: Optional[float] = typer.Option(TRAIN.lr, help="default: the method's (prefix 5e-4, prefix-flat 5e-3)"),
    batch_size: int = typer.Option(TRAIN.batch_size),
    max_steps: Optional[int] = typer.Option(TRAIN.max_steps, help="default: --epochs epochs"),
    epochs: float = typer.Option(TRAIN.epochs),
    warmup_steps: int = typer.Option(TRAIN.warmup_steps),
    weight_decay: float = typer.Option(TRAIN.weight_decay),
    grad_clip: float = typer.Option(TRAIN.grad_clip),
    eval_every: int = typer.Option(TRAIN.eval_every),
    early_stop_patience: int = typer.Option(TRAIN.early_stop_patience, help="stop after this many dev evaluations "
                                            "without a new best dev loss (0: never); with --user-field, per user"),
    dev_size: int = typer.Option(TRAIN.dev_size),
    save_every: int = typer.Option(TRAIN.save_every),
    precision: str = typer.Option(TRAIN.precision, help="auto | bf16 | fp32"),
    gradient_checkpointing: bool = typer.Option(TRAIN.gradient_checkpointing, "--gradient-checkpointing",
                                                help="recompute activations in backward (less memory)"),
    template: Optional[str] = typer.Option(TRAIN.template, help='source template, default "{source}\\n" (decoder-only)'),
    max_source_len: int = typer.Option(TRAIN.max_source_len, help="source tokens kept (a longer source loses its "
                                                                 "end); a chat row's budget is both lengths"),
    max_target_len: int = typer.Option(TRAIN.max_target_len, help="target tokens kept (a longer target loses its "
                                                                 "end); a chat row over budget keeps its last "
                                                                 "assistant turn whole, up to this"),
    adapter_budget: float = typer.Option(TRAIN.adapter_budget, help="adapter: fraction of the model's parameters (0.001, 0.03)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in OUTPUT_DIR with its saved options "
                                                        "(a flag that contradicts them is refused)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a run already in OUTPUT_DIR"),
    device: str = _device_option(),
    report_to: str = typer.Option(TRAIN.report_to, help=REPORT_TO_HELP),
    data: Optional[str] = typer.Option(None, help=DATA_FILE_HELP),
    dev_data: Optional[str] = typer.Option(None, help="dev rows for --data (same formats); default: --dev-fraction "
                                                      "of --data held out by --seed"),
    dev_fraction: float = typer.Option(TRAIN.dev_fraction, help="the share of --data held out for the dev loss"),
    source_field: Optional[str] = typer.Option(None, help=SOURCE_FIELD_HELP),
    target_field: Optional[str] = typer.Option(None, help=TARGET_FIELD_HELP),
    user_field: Optional[str] = typer.Option(None, help="train one prefix per distinct value of this field of --data, "
                                                        "in one job, into OUTPUT_DIR/store (see docs/users.md)"),
    tenant: str = typer.Option("default", help="--user-field: the store tenant owning the users' prefixes"),
):
    """Train a prefix (or another --method) on a frozen model; writes OUTPUT_DIR/prefix.safetensors
    (other methods: a weights file named for the method, e.g. finetuned-model.safetensors).
    Your own data: --data FILE (JSONL, CSV/TSV, Parquet, a dataset folder or hub id) instead of --task."""
    from ..run_dir import USERS_KEY, finished_result, resumed_config, saved_config
    from ..train import train as run_train

    if data is None and (dev_data, source_field, target_field, user_field) != (None,) * 4:
        _fail("--dev-data, --source-field, --target-field and --user-field apply to --data FILE, which is missing")
    if data is not None:
        given = [flag for flag, value in (("--task", task), ("--data-dir", data_dir), ("--train-from", train_from),
                                          ("--subset", subset), ("--scheme", scheme)) if value is not None]
        if given:
            _fail(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply with --data (your own data "
                  f"replaces the task's)")
    options = dict(
        output_dir=str(output_dir), model=model, task=task or TRAIN.task, data_dir=data_dir,
        task_options=_task_options(train_from, subset, scheme), train_size=train_size, seed=seed, method=method,
        prefix_len=prefix_len, mlp_dim=mlp_dim, prefix_dropout=prefix_dropout, init=init, lr=lr,
        batch_size=batch_size, max_steps=max_steps, epochs=epochs, warmup_steps=warmup_steps,
        weight_decay=weight_decay, grad_clip=grad_clip, eval_every=eval_every,
        early_stop_patience=early_stop_patience, dev_size=dev_size,
        save_every=save_every, precision=precision, gradient_checkpointing=gradient_checkpointing,
        template=template, max_source_len=max_source_len, max_target_len=max_target_len,
        adapter_budget=adapter_budget, device=device, report_to=report_to, data=data,
        dev_data=dev_data, dev_fraction=dev_fraction, source_field=source_field, target_field=target_field,
        user_field=user_field)
    try:
        if resume and user_field is None:  # a bare --resume of a many-users job finishes that job
            saved = saved_config(output_dir) or {}
            user_field = saved.get("user_field") if USERS_KEY in saved else None
        if user_field is not None:  # many users in one job: prefixtune.users keeps (and resumes) its own store
            raise typer.Exit(_train_users(ctx, options, tenant, overwrite, resume))
        if resume:  # the run in the directory as saved; only the flags typed here are checked against it
            if overwrite:
                raise ValueError("--resume continues the run in OUTPUT_DIR and --overwrite replaces it: give one")
            config = resumed_config(output_dir, _typed(ctx, options), flags=True)
            finished = finished_result(output_dir)
            if finished is not None:
                typer.echo(f"{output_dir} holds a finished run ({finished.get('steps')} steps, best dev loss "
                           f"{finished.get('best_dev_loss')} at step {finished.get('best_step')}): nothing to resume",
                           err=True)
                typer.echo(json.dumps({k: finished.get(k) for k in ("prefix_file", "steps", "best_step",
                                                                    "best_dev_loss", "stop_reason")}))
                return
        else:
            config = TrainConfig(**options)
        result = run_train(config, resume=resume, overwrite=overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(str(e))
    typer.echo(json.dumps({"prefix_file": result.prefix_file, "steps": result.steps, "best_step": result.best_step,
                           "trainable_pct": round(result.method.trainable_percent(), 4),
                           "shipped_pct": round(result.method.shipped_percent(), 4),
                           "best_dev_loss": result.best_dev_loss, "tokens_per_s": round(result.tokens_per_s, 1)}))


def _typed(ctx: typer.Context, options: dict) -> dict:
    """The options whose flags were typed on the command line (or set in the environment), not left at defaults."""
    def given(name):
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    typed = {name for name in ctx.params if given(name)}
    given = {k: v for k, v in options.items() if k in typed}
    task_options = {k: v for k, v in options["task_options"].items() if k in typed}
    return {**given, **({"task_options": task_options} if task_options else {})}


def _train_users(ctx: typer.Context, options: dict, tenant: str, overwrite: bool, resume: bool) -> int:
    """--user-field: one prefix per user in one job (prefixtune.users), into OUTPUT_DIR/store for `serve --store`.
    --resume finishes the job in OUTPUT_DIR with its saved options and tenant: `train_users` reads them and refuses
    a flag typed here that contradicts them. It reads the data (every row checked) before the model loads."""
    from ..run_dir import USERS_CSV
    from ..users import UsersConfig, train_users

    if resume and overwrite:
        raise ValueError("--resume finishes the run in OUTPUT_DIR and --overwrite replaces it: give one")
    world = os.environ.get("WORLD_SIZE", "1")
    if world.strip() not in ("", "0", "1"):  # each process would train every user into the same store
        raise ValueError(f"--user-field trains in one process, not under torchrun (WORLD_SIZE={world}): "
                         "run it as a plain `prefixtune train`")
    typed_tenant = ctx.get_parameter_source("tenant").name not in ("DEFAULT", "DEFAULT_MAP")
    users = UsersConfig(tenant=tenant) if typed_tenant or not resume else None  # None: the saved job's
    result = train_users(TrainConfig(**options), users=users, overwrite=overwrite, resume=resume,
                         given=_typed(ctx, options) if resume else None, flags=True)
    typer.echo(result.table())
    typer.echo(f"serve them: PREFIXTUNE_API_KEYS=KEY:{result.tenant} prefixtune serve --store {result.store} "
               f"--max-prefixes {max(len(result.users), 64)}", err=True)
    summary = {k: v for k, v in result.to_json().items() if k != "users"}
    typer.echo(json.dumps({**summary, "users": len(result.users),
                           "summary": str(Path(result.output_dir) / USERS_CSV)}))
    return 0


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
    overwrite: bool = typer.Option(False, help="hf | peft: write into a non-empty folder that holds no earlier "
                                               "export"),
):
    """Drop the MLP and write P alone (safetensors + metadata), or a folder for the hub or for PEFT."""
    from ..checkpoint import check_which

    try:
        check_which(which)
    except ValueError as e:
        _fail(f"--{e}")
    if fmt != "file":
        from ..interop.commands import export_folder
        from ..prefix_file import PrefixFileError

        try:
            typer.echo(str(export_folder(run_dir, out, fmt, which, allow_lossy, overwrite)))
        except (PrefixFileError, ValueError, OSError) as e:  # FileNotFoundError, PermissionError are OSErrors
            _fail(str(e))
        return

    from ..train import export_checkpoint

    if out is not None and out.is_dir():
        _fail(f"--out {out} is a folder; --format file writes one .safetensors file (--format hf|peft: a folder)")
    try:
        target = export_checkpoint(run_dir, out, which)
    except (ValueError, OSError) as e:  # ValueError: a checkpoint that holds more than data (checkpoint.py)
        _fail(str(e))
    typer.echo(str(target))


@app.command()
def info(prefix: Path = typer.Argument(..., help="an exported .safetensors file, a training directory, or a prefix "
                                                  "folder (HF-style or PEFT)")):
    """Show an exported prefix's (or another method's weights') metadata and shapes."""
    from ..exported import describe, find_export, training_summary
    from ..prefix_file import PrefixFileError, readable_metadata
    from ..tracking import CURVE_FILE, LOG_DIR

    try:
        metadata, shapes = describe(find_export(prefix))
    except PrefixFileError as e:
        _fail(str(e))
    meta = readable_metadata({k: v for k, v in metadata.items() if k != "train_config"})
    training = training_summary(metadata)  # provenance: what it was trained on, how long, how well
    if training:
        meta["training"] = training
    meta.update(_training_data(metadata))
    meta["shapes"] = shapes if len(shapes) <= 20 else f"{len(shapes)} tensors"
    meta["params"] = sum(math.prod(shape) for shape in shapes.values())
    if (prefix / CURVE_FILE).is_file():  # a training directory: where to look at its losses
        meta["loss_curve"] = str(prefix / CURVE_FILE)
    if (prefix / LOG_DIR).is_dir():
        meta["tracker_logs"] = str(prefix / LOG_DIR)
    typer.echo(json.dumps(meta, indent=2))


def _training_data(metadata: dict) -> dict:
    """What the prefix was trained on, from its train_config: {"data": FILE, ...} or {"task": TASK}."""
    try:
        config = json.loads(metadata.get("train_config") or "{}")
    except json.JSONDecodeError:
        return {}
    if config.get("data"):
        keys = ("data", "dev_data", "source_field", "target_field", "user_field")
        return {k: config[k] for k in keys if config.get(k) is not None}
    return {"task": config["task"]} if config.get("task") else {}
