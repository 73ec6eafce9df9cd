"""The main job: the embedded model before and after a prefix trained on 200 E2E examples."""
from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from .bank import PrefixBank
from .data import load_task
from .evaluate import evaluate
from .generation import DecodingConfig
from .atomic import atomic_write_bytes
from .models import DEFAULT_MODEL, load_base_model
from .train import TrainConfig, train

ZERO_SHOT = ("Write one fluent sentence describing a restaurant with these attributes. "
             "Use every attribute and nothing else.\n{source}")


def zero_shot_prompts(tokenizer, sources: list[str]) -> list[str]:
    """The bare model's best shot: the instruction in its own chat template."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": ZERO_SHOT.format(source=s)}],
                                          tokenize=False, add_generation_prompt=True) for s in sources]


def run_demo(output_dir, data_dir=None, train_size=200, steps=200, test_size=100, seed=1,
             model_name: str = DEFAULT_MODEL) -> dict:
    console = Console(stderr=True)
    out = Path(output_dir)
    started = time.perf_counter()
    test = load_task("e2e", "test", data_dir)[:test_size]
    console.print(f"[bold]prefixtune demo[/] — {model_name}, {train_size} E2E examples, {test_size} test MRs")
    model, tokenizer = load_base_model(model_name)
    bank = PrefixBank(model, tokenizer)
    decoding = DecodingConfig(max_new_tokens=64, dtype="auto")  # bf16 where native: BLEU within 0.02 of fp32

    with tqdm(total=len(test), desc="zero-shot decode") as bar:
        before, _ = evaluate(bank, test, None, decoding, raw_inputs=zero_shot_prompts(tokenizer, [r.source for r in test]),
                             out_dir=out / "before", full_metrics=False, progress=bar.update)

    config = TrainConfig(output_dir=str(out / "train"), model=model_name, data_dir=data_dir, train_size=train_size,
                         seed=seed, method="prefix", init="words:table-to-text:", max_steps=steps,
                         batch_size=8, eval_every=50, dev_size=100, save_every=50)
    result = train(config, model, tokenizer, overwrite=True)  # the demo is meant to be run again
    bank.add("e2e", result.prefix_file)
    with tqdm(total=len(test), desc="prefix decode") as bar:
        after, hyps = evaluate(bank, test, "e2e", decoding, out_dir=out / "after", full_metrics=False,
                               progress=bar.update)

    table = Table(title="generations (first 4 test MRs)", show_lines=True)
    table.add_column("input")
    table.add_column("prefix output")
    for record, hyp in zip(test[:4], hyps[:4]):
        table.add_row(record.source, hyp)
    console.print(table)
    model_params = sum(p.numel() for p in model.parameters())
    pct = 100 * result.shipped_params / model_params
    size_kib = Path(result.prefix_file).stat().st_size / 1024
    console.print(f"prefix file: {result.prefix_file} ({size_kib:.0f} KiB, {result.shipped_params:,} parameters = "
                  f"{pct:.3f}% of the model's {model_params:,}); trained {result.steps} steps at "
                  f"{result.tokens_per_s:.0f} tokens/s, best dev loss {result.best_dev_loss:.3f} at step {result.best_step}")
    console.print(f"BLEU (sacreBLEU, lowercased, grouped refs) before: {before['sacreBLEU']:.1f}  "
                  f"after: {after['sacreBLEU']:.1f}  ({time.perf_counter() - started:.0f} s in all)")
    summary = {"bleu_before": round(before["sacreBLEU"], 2), "bleu_after": round(after["sacreBLEU"], 2),
               "prefix_file": result.prefix_file, "prefix_params_pct": round(pct, 4)}
    atomic_write_bytes(out / "summary.json", json.dumps(summary).encode())
    return summary
