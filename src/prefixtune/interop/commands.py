"""`prefixtune export --format hf|peft`, `import`, `push` and `pull`: the interop commands.

cli.py registers them; each is a thin layer over interop.peft / interop.hub.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..prefix_file import ExportedPrefix, PrefixFileError

FORMATS = {"hf": "prefixtune", "peft": "peft"}


def _fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def prefix_from_run(run_dir: Path, which: str = "best") -> tuple[ExportedPrefix, dict]:
    """The prefix of a training run's checkpoint (best or last step), with the facts its model card states."""
    from ..prefix_file import load_prefix_bytes, prefix_to_bytes
    from ..methods import build_method
    from ..methods.base import count_parameters
    from ..methods.prefix import PrefixMethod
    from ..models import load_base_model, model_name, model_spec
    from ..checkpoint import Checkpoint, load_trained_state
    from ..train_config import TrainConfig

    ckpt = Checkpoint.load(run_dir)
    config = TrainConfig(**ckpt.config)
    model, tokenizer = load_base_model(config.model)
    spec = model_spec(model)
    method = build_method(config.method, model, tokenizer, spec, config)
    if not isinstance(method, PrefixMethod):
        raise ValueError(f"{run_dir} trained {config.method!r}, not a prefix: only prefixes export as folders")
    best = which == "best" and ckpt.has_best()
    load_trained_state(method.module, ckpt.state(which))
    base_params = count_parameters(model)
    from ..run_dir import checkpoint_facts

    facts = {**checkpoint_facts(ckpt), "exported_from_step": ckpt.best["step"] if best else ckpt.step,
             "base_params": base_params}
    if best:  # the card's dev loss is the exported step's
        facts.update(best_step=ckpt.best["step"], best_dev_loss=ckpt.best["loss"])
    data = prefix_to_bytes(method.prefix_p(), spec, model_name(model), facts)
    return load_prefix_bytes(data, spec, str(run_dir)), {"base_params": base_params}


EXPORT_FILES = ("prefix.safetensors", "adapter_config.json", "adapter_model.safetensors")  # what an export leaves


def check_export_dir(out: Path, overwrite: bool = False):
    """An export folder must be new, empty or an earlier export's (which it replaces), unless `overwrite`:
    an export never writes its files among someone else's."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; --format hf|peft writes a folder")
    if overwrite or not out.is_dir():
        return
    if any(out.iterdir()) and not any((out / name).is_file() for name in EXPORT_FILES):
        raise ValueError(f"--out {out} is a non-empty folder that holds no earlier export; choose a new or empty "
                         "folder, or pass --overwrite to write into it anyway")


def export_folder(source: Path, out: Optional[Path], fmt: str, which: str = "best", allow_lossy: bool = False,
                  overwrite: bool = False) -> Path:
    """Write SOURCE (a run dir, a prefix file or a prefixtune folder) as an HF-style or PEFT folder with a card."""
    from ..checkpoint import CHECKPOINT
    from .folders import load_any
    from .hub import save_pretrained
    from .card import find_scores

    if fmt not in FORMATS:
        raise ValueError(f"--format must be file, hf or peft, got {fmt!r}")
    if out is None:
        raise ValueError(f"--format {fmt} writes a folder: give it with --out DIR")
    check_export_dir(out, overwrite)
    if source.is_dir() and (source / CHECKPOINT).is_file():
        exported, card = prefix_from_run(source, which)
    else:
        if which != "best":  # a prefix file or folder holds one prefix: no step to choose
            raise ValueError(f"--which {which} applies to a training directory (with {CHECKPOINT}); "
                             f"{source} is a prefix")
        exported, card = load_any(source), {}
    card["scores"] = find_scores(source if source.is_dir() else source.parent)
    save_pretrained(exported, out, FORMATS[fmt], allow_lossy, name=out.resolve().name, **card)
    return out


def import_cmd(
    peft_dir: Path = typer.Argument(..., help="a PEFT PREFIX_TUNING adapter folder (adapter_config.json + "
                                              "adapter_model.safetensors)"),
    output: Path = typer.Option(..., "--output", "-o", help="the prefixtune prefix file to write (.safetensors)"),
    model: Optional[str] = typer.Option(None, help="the base model (default: the adapter's base_model_name_or_path "
                                                   "when prefixtune embeds it, else smollm2-135m)"),
    max_prefix_len: int = typer.Option(512, min=1, help="refuse an adapter with more virtual tokens (the "
                                                        "server's --max-prefix-len)"),
):
    """Convert a PEFT prefix-tuning adapter into a prefixtune prefix file, checked against the base model."""
    from ..atomic import atomic_write_bytes
    from ..models import DEFAULT_MODEL, load_base_model, model_spec
    from . import peft
    from .hub import to_bytes

    try:
        if not peft.is_peft_dir(peft_dir):
            raise PrefixFileError(f"{peft_dir}: no {peft.CONFIG_FILE}: not a PEFT adapter folder")
        config, _ = peft.read_folder(peft_dir)
        peft.check_config(config, str(peft_dir), max_prefix_len)
        named = config.get("base_model_name_or_path")
        name = model or peft.embedded_name(named) or named or DEFAULT_MODEL
    except (PrefixFileError, OSError) as e:
        _fail(str(e))
    try:
        base, _ = load_base_model(name)
    except Exception as e:  # a path that is no model, a hub id offline, ...: the model named is at fault
        said = "--model" if model else f"the adapter's base_model_name_or_path ({peft.CONFIG_FILE})"
        _fail(f"cannot load base model {name!r} named by {said}: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:200] if str(e) else ''}; pass --model MODEL")
    try:
        exported = peft.load_peft(peft_dir, model_spec(base), base_model=name)  # when the adapter names none
        atomic_write_bytes(output, to_bytes(exported))
    except (PrefixFileError, OSError) as e:
        _fail(str(e))
    typer.echo(json.dumps({"prefix_file": str(output), "base_model": name, "prefix_len": exported.prefix_len,
                           "params": exported.num_params()}))


def push_cmd(
    folder: Path = typer.Argument(..., help="a prefix folder (prefixtune or PEFT), e.g. from export --format hf"),
    repo_id: str = typer.Argument(..., help="USER/NAME on the Hugging Face hub (created when missing)"),
    private: bool = typer.Option(False, help="create the repo private"),
    token: Optional[str] = typer.Option(None, help="default: HF_TOKEN or the saved login"),
):
    """Upload a prefix folder (its prefix files and model card) to the Hugging Face hub."""
    from .hub import push

    try:
        typer.echo(push(folder, repo_id, private=private or None, token=token))
    except PrefixFileError as e:
        _fail(str(e))
    except Exception as e:  # the hub's own errors (auth, network) name their cause
        _fail(f"push to {repo_id!r} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def pull_cmd(
    repo_id: str = typer.Argument(..., help="USER/NAME on the Hugging Face hub"),
    revision: Optional[str] = typer.Option(None, help="branch, tag or commit"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="copy into this folder (default: the HF cache)"),
):
    """Download a prefix repo (HF cache; works offline with HF_HUB_OFFLINE=1 once cached); prints its folder."""
    from .folders import load_folder
    from .hub import pull
    from . import peft

    try:
        folder = pull(repo_id, revision, output)
        if peft.is_peft_dir(folder):
            peft.read_folder(folder)
        else:
            load_folder(folder)
    except PrefixFileError as e:
        _fail(str(e))
    typer.echo(str(folder))


def register(app: typer.Typer):
    app.command("import")(import_cmd)
    app.command("push")(push_cmd)
    app.command("pull")(pull_cmd)
