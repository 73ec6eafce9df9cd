"""The model card (README.md) written with every exported prefix folder, with Hugging Face metadata.

The metadata block is made by huggingface_hub (`ModelCardData`), so the hub reads it: base
model, `library_name: prefixtune`, tags, datasets, and the metrics training or evaluation
measured (`model-index`, with values). The text states the prefix length, its parameter
count and share of the model, the training command, and how to load and serve it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..prefix_file import ExportedPrefix
from .peft import hub_id

DATASETS = {"e2e": "tuetschek/e2e_nlg", "webnlg": "web_nlg", "dart": "Yale-LILY/dart", "xsum": "EdinburghNLP/xsum"}
TASK_TYPES = {"xsum": "summarization"}
FILES = {"peft": "`adapter_config.json`, `adapter_model.safetensors` (PEFT PREFIX_TUNING)",
         "prefixtune": "`prefix.safetensors`"}
FLAGS_SKIPPED = {"output_dir", "data_dir", "task_options", "export"}


def train_config_of(exported: ExportedPrefix) -> dict:
    try:
        return json.loads(exported.metadata.get("train_config") or "{}")
    except json.JSONDecodeError:
        return {}


def training_command(config: dict, data_dir: str | None = None) -> str | None:
    """The `prefixtune train` line that reproduces a run (options left at their defaults are omitted);
    `data_dir`: where its data was read from, when not the default location."""
    from ..train_config import TrainConfig

    defaults = TrainConfig().__dict__
    if not config or "method" not in config:
        return None
    parts = ["prefixtune train", f"-o {config.get('output_dir', defaults['output_dir'])}"]
    for key in ("model",) if config.get("data") else ("model", "task"):  # --data replaces --task
        parts.append(f"--{key} {_quote(str(config.get(key, defaults[key])))}")
    if data_dir:
        parts.append(f"--data-dir {_quote(str(data_dir))}")
    for key, value in (config.get("task_options") or {}).items():
        parts.append(f"--{key.replace('_', '-')} {value}")
    for key, default in defaults.items():
        if key in FLAGS_SKIPPED or key in ("model", "task") or key not in config or config[key] == default:
            continue
        value = config[key]
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{key.replace('_', '-')}")
        else:
            parts.append(f"{flag} {_quote(str(value))}")
    return " ".join(parts)


def api_command(config: dict) -> str:
    """`train(TrainConfig(...), train_pairs=...)` with the run's options (defaults omitted), for API-trained runs."""
    from ..train_config import TrainConfig

    defaults = TrainConfig().__dict__
    options = ", ".join(f"{k}={config[k]!r}" for k, default in defaults.items()
                        if k in config and k not in ("task", "data_dir", "task_options", "export")
                        and config[k] != default)
    return ("from prefixtune.train import TrainConfig, train\n"
            f"train(TrainConfig({options}), train_pairs=YOUR_PAIRS, dev_pairs=YOUR_DEV_PAIRS)")


def _quote(text: str) -> str:
    return text if re.fullmatch(r"[\w.:/@+-]+", text) else "'" + text.replace("'", "'\\''") + "'"


def find_scores(run_dir) -> list[dict]:
    """Scores `prefixtune eval` wrote under RUN_DIR/eval-TASK-SPLIT/scores.json."""
    found = []
    for path in sorted(Path(run_dir).glob("eval-*-*/scores.json")):
        task, _, split = path.parent.name[len("eval-"):].partition("-")
        try:
            metrics = json.loads(path.read_text())
            inputs = len((path.parent / "hypotheses.txt").read_text().splitlines())
        except (OSError, json.JSONDecodeError):
            continue
        found.append({"task": task, "split": split, "metrics": metrics, "inputs": inputs})
    return found


def training_data(config: dict) -> dict:
    """What the run trained on, for the card: `hub` (the public dataset, claimed only for data read from the
    default location), `text` (a sentence), `data_dir` (the --data-dir that reproduces the run), `own` (the
    API's own pairs: no command reproduces them)."""
    from ..run_dir import describe_data, provenance_of

    data = provenance_of(config)
    task = config.get("task")
    if data.get("source") == "file" or isinstance(config.get("data"), str):  # `--data FILE`: --data reproduces it
        return {"hub": None, "data_dir": None, "own": False, "file": True,
                "text": f"Trained on {describe_data(config)}: the user's own data, not included here."}
    if data.get("source") == "train_pairs":
        return {"hub": None, "data_dir": None, "own": True, "file": False,
                "text": f"Trained on the user's own data: {describe_data(config)}. It is not a public dataset and "
                        f"is not included here."}
    given_by = data.get("data_dir_from") or ("--data-dir" if config.get("data_dir") else None)
    local = given_by not in (None, "default")
    data_dir = (data.get("data_dir") or config.get("data_dir")) if local else None
    hub = None if local or not task else DATASETS.get(task)
    text = f"Trained on {describe_data(config)}."
    if local:
        text += (f" These are local files in the layout of the {task} loader; they may not be the public "
                 f"{DATASETS.get(task, task)}.")
    return {"hub": hub, "data_dir": data_dir, "own": False, "file": False, "text": text}


def _eval_results(config: dict, scores: list[dict], dataset: dict):
    from huggingface_hub import EvalResult

    def result(task, split, metric_type, value, metric_name, dataset_type):
        return EvalResult(task_type=TASK_TYPES.get(task, "text-generation"), dataset_type=dataset_type,
                          dataset_name=task, dataset_split=split, metric_type=metric_type,
                          metric_value=round(float(value), 4), metric_name=metric_name)

    results = []
    trained_on = config.get("data") if isinstance(config.get("data"), str) else config.get("task")
    if config.get("best_dev_loss") is not None and trained_on:  # --data: the user's own file, not a task
        name = "own data" if dataset["own"] else trained_on
        results.append(result(name, "validation", "loss", config["best_dev_loss"], "dev loss",
                              dataset["hub"] or name))
    for s in scores:
        for metric, value in s["metrics"].items():
            if isinstance(value, (int, float)):
                slug = re.sub(r"[^a-z0-9]+", "-", metric.lower())
                hub = dataset["hub"] if s["task"] == config.get("task") else None
                results.append(result(s["task"], s["split"], slug, value, metric, hub or s["task"]))
    return results


def model_card(exported: ExportedPrefix, name: str = "prefix", fmt: str = "prefixtune",
               base_params: int | None = None, scores: list[dict] | None = None) -> str:
    """README.md text for a prefix folder; `fmt` is "prefixtune" (prefix.safetensors) or "peft"."""
    from huggingface_hub import ModelCardData

    config = train_config_of(exported)
    base = hub_id(exported.metadata.get("base_model", "")) or "unknown"
    dataset = training_data(config)
    task = None if dataset["own"] or dataset["file"] else config.get("task")  # own rows: no task of the paper
    base_params = base_params or config.get("base_params")
    results = _eval_results(config, scores or [], dataset)
    tags = ["prefixtune", "prefix-tuning", "text-generation"] + (["peft"] if fmt == "peft" else []) + (
        [task] if task else [])
    data = ModelCardData(base_model=base, library_name="prefixtune", tags=tags,
                         datasets=[dataset["hub"]] if dataset["hub"] else None,
                         metrics=sorted({r.metric_type for r in results}) or None,
                         model_name=name, eval_results=results or None)
    params = exported.num_params()
    share = f" ({100 * params / base_params:.3f}% of the base model's {base_params:,})" if base_params else ""
    lines = [f"---\n{data.to_yaml()}\n---", "", f"# {name}", "",
             f"A prefix ([Prefix-Tuning](https://arxiv.org/abs/2101.00190), Li & Liang 2021) for the frozen "
             f"`{base}`, exported by prefixtune. Only the prefix ships; the base model is unchanged.", "",
             "| | |", "| --- | --- |",
             f"| prefix length | {exported.prefix_len} virtual tokens |",
             f"| parameters | {params:,}{share} |",
             f"| attention groups | {', '.join(f'{g} {tuple(t.shape)}' for g, t in exported.p.items())} |",
             *([f"| training data | `{config['data']}` (`prefixtune train --data`) |"] if config.get("data") else []),
             f"| layout | {exported.metadata.get('layout', '')} |",
             f"| base model fingerprint | `{exported.metadata.get('fingerprint', '')}` |",
             f"| files | {FILES[fmt]} |"]
    inputs = {(s["task"], s["split"]): s.get("inputs") for s in scores or []}
    for r in results:
        n = inputs.get((r.dataset_name, r.dataset_split))
        lines.append(f"| {r.metric_name} ({r.dataset_name} {r.dataset_split}{f', {n} inputs' if n else ''}) "
                     f"| {r.metric_value} |")
    lines += ["", "## Training", ""]
    command = training_command(config, dataset["data_dir"])
    if command:
        step = config.get("exported_from_step") or config.get("best_step")
        best = " (the lowest dev loss)" if step and step == config.get("best_step") else ""
        lines += [dataset["text"], ""]
        if dataset["own"]:
            lines += ["With the same pairs, this reproduces the run:", "", "```python", api_command(config), "```"]
        else:
            lines += ["```bash", command, "```"]
        lines += ["", f"Exported from step {step}{best}." if step else ""]
    elif config.get("imported_from") == "peft":
        lines.append("Trained with PEFT (PREFIX_TUNING) and imported with `prefixtune import`.")
    else:
        lines.append("Training command not recorded.")
    lossy = fmt == "peft" and _family(exported) == "encoder-decoder"
    lines += ["", "## Use it", "", *(_lossy_usage() if lossy else
                                     _usage(name, fmt, exported.metadata.get("base_model") or base))]
    return "\n".join(lines).rstrip() + "\n"


def _family(exported: ExportedPrefix) -> str | None:
    try:
        return json.loads(exported.metadata.get("model_spec") or "{}").get("family")
    except (json.JSONDecodeError, AttributeError):
        return None


def _lossy_usage() -> list[str]:
    """A seq2seq PEFT export (`--allow-lossy`): prefixtune does not read it back (peft.peft_to_bytes refuses it)."""
    return ["A lossy export for PEFT: PEFT's encoder-decoder prefix carries only the decoder self-attention "
            "prefix (the encoder and cross-attention prefixes were dropped) and maps decoder layers its own way, "
            "so its outputs differ from the prefixtune prefix's. prefixtune does not read this folder back: "
            "decode with the original prefixtune prefix.", "",
            "With PEFT: `PeftModel.from_pretrained(base_model, PREFIX_DIR)`."]


def _usage(name: str, fmt: str, base: str) -> list[str]:
    folder = "PREFIX_DIR"
    lines = ["With prefixtune (PREFIX_DIR: this folder, or the one `prefixtune pull` prints):", "",
             "```bash",
             f"prefixtune pull USER/{name}            # prints the local folder",
             f"prefixtune generate --model {base} --prefix {folder} 'name : The Eagle | Type : pub'",
             "```", "", "```python",
             "from prefixtune.bank import PrefixBank",
             "from prefixtune.models import load_base_model", "",
             f"model, tokenizer = load_base_model({base!r})",
             "bank = PrefixBank(model, tokenizer)",
             f"bank.add({name!r}, {folder!r})   # checked against the model; mixed batches with other prefixes"]
    if fmt != "peft":
        lines += ["from prefixtune.interop.hub import from_pretrained",
                  f"prefix = from_pretrained('USER/{name}')   # or a local folder"]
    put = f"curl -X PUT -H 'Authorization: Bearer KEY' localhost:8000/v1/prefixes/{name} --data-binary"
    upload = (f"(cd {folder} && zip - adapter_config.json adapter_model.safetensors) | {put} @-" if fmt == "peft"
              else f"{put} @{folder}/prefix.safetensors")
    lines += ["```", "", "Serve it next to other prefixes (OpenAI-compatible `/v1/completions`, `model` = prefix name):",
              "", "```bash", f"prefixtune serve --model {base} --keys-file keys.txt &", upload, "```"]
    if fmt == "peft":
        lines += ["", "With PEFT: `PeftModel.from_pretrained(base_model, PREFIX_DIR)`. Its forward pass uses the prefix "
                      "(the same logits as prefixtune), but measured with peft 0.21.2 and transformers 5.24 its "
                      "`generate` does not decode with it (on Llama-family models it returns the bare model's tokens); "
                      "decode with prefixtune instead."]
    return lines
