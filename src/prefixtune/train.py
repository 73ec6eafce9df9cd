"""The trainer: AdamW with warmup and linear decay, length-grouped batches, dev loss with the
best step kept, exact resume, and several processes through accelerate.

It knows datasets only as (source, target) pairs and methods only through `Method`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import finite_json
from .atomic import atomic_write_bytes
from .cache import enable_gradient_checkpointing
from .checkpoint import CHECKPOINT, Checkpoint, load_trained_state, trained_state
from .data import check_pairs, load_task, load_train_dev, sample_pairs, training_pairs
from .data.collate import Collator, check_chat_examples, encode_example, length_grouped_batches
from .data_parallel import threaded_halves
from .methods import EXPORT_FILES, build_method
from .models import load_base_model, model_spec, resolve_device
from .tracking import TrainingLog
from .run_dir import (RESULT, TRAIN_CONFIG, USERS_KEY, check_output_dir, checkpoint_facts, clear_run, data_dir_of,
                      data_provenance, describe_data, finished_result, given_options, remove_stale_temps_of_run,
                      resumed_config, saved_config, with_local_paths)
from .precision import FrozenBf16Step, bf16_available
from .train_config import TrainConfig, check_early_stopping, check_method_options, check_positions

PREFIX_FILE = EXPORT_FILES["prefix"]


@dataclass
class TrainResult:
    output_dir: str
    prefix_file: str | None
    steps: int
    best_step: int | None
    best_dev_loss: float | None
    final_dev_loss: float | None
    tokens_per_s: float
    target_tokens_per_s: float
    trainable_params: int
    shipped_params: int
    history: list = field(default_factory=list)
    train_seconds: float = 0.0           # optimiser steps only
    padded_tokens: int = 0               # positions computed, padding included (this process)
    stop_reason: str = "step_limit"      # early_stop | epoch_limit | step_limit | diverged (a non-finite loss)
    epochs_run: float = 0.0              # optimiser steps / steps per epoch
    # the trained method, to decode with; not in result.json
    method: object = field(default=None, repr=False, compare=False, metadata={"json": False})
    train_cpu_seconds: float = 0.0       # optimiser steps in this process's CPU time

    def to_json(self) -> dict:
        # field by field, not asdict: asdict would deep-copy the method and its model
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("json", True)}


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "bf16" and not bf16_available(device):
        raise ValueError(f"bf16 was asked for but {device} does not support it")
    return precision == "bf16" or (precision == "auto" and bf16_available(device))


def _rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def early_stop_due(history: list[dict], best_step: int | None, patience: int) -> bool:
    """True when the last `patience` dev evaluations all came after the best one (none improved on it)."""
    if patience <= 0 or best_step is None:
        return False
    since_best = [h for h in history if h.get("dev_loss") is not None and h["step"] > best_step]
    return len(since_best) >= patience


def load_records_of(config: TrainConfig):
    """(train records, dev records): the config's data file when it has one (checked row by row), else its task."""
    if config.data is not None:
        return load_train_dev(config.data, config.dev_data, config.dev_fraction, config.seed,
                              source_field=config.source_field, target_field=config.target_field,
                              user_field=config.user_field)
    return (load_task(config.task, "train", config.data_dir, **config.task_options),
            load_task(config.task, "dev", config.data_dir,
                      **{k: v for k, v in config.task_options.items() if k != "train_from"}))


def load_pairs(config: TrainConfig, tokenizer=None):
    """(train pairs, dev pairs) for the config's data or task, with the low-data sampler applied (dev_size 0: no
    dev pairs, so no dev loss). Chat rows are encoded once here, before the model loads, to refuse a bad one."""
    train_records, dev_records = load_records_of(config)
    train = sample_pairs(training_pairs(train_records), config.train_size, config.seed)
    dev = sample_pairs(training_pairs(dev_records), config.dev_size, config.seed) if config.dev_size else []
    if not train:
        where = config.data if config.data else f"the {config.task} train split in {data_dir_of(config)}"
        raise ValueError(f"no training examples: {where} is empty")
    check_chat_examples(config.model, train + dev, config.max_source_len, config.max_target_len, tokenizer)
    return train, dev


def _finished_run(config: TrainConfig, saved: dict, model, tokenizer) -> TrainResult:
    """A finished run, as `train` returned it, without training: its method holds the best (exported) state."""
    out_dir = Path(config.output_dir)
    if model is None:
        model, tokenizer = load_base_model(config.model)
    method = build_method(config.method, model, tokenizer, model_spec(model), config)
    load_trained_state(method.module, Checkpoint.load(out_dir).state("best"))
    known = {f.name for f in fields(TrainResult)}
    return TrainResult(**{k: v for k, v in saved.items() if k in known and k != "method"}, method=method)


def train(config: TrainConfig, model=None, tokenizer=None, train_pairs=None, dev_pairs=None,
          resume: bool = False, on_step=None, progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Train `config.method` on the frozen model; returns where the exported prefix is and what was seen.

    `on_step(step, logs, module)` is called after every optimiser step with the (unwrapped)
    trainable module (tests use it to simulate a kill and to compare ranks). An output directory that
    holds a run is refused unless `resume` (continue it) or `overwrite` (start over).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if config.method not in EXPORT_FILES:
        raise ValueError(f"unknown method {config.method!r}; choose one of {sorted(EXPORT_FILES)}")
    if config.user_field is not None:  # else one prefix would train on every user's rows mixed
        raise ValueError(f"user_field {config.user_field!r} trains one prefix per user: call "
                         f"prefixtune.users.train_users(config, ...), not train.train (which trains one prefix)")
    out_dir = Path(config.output_dir)
    saved = saved_config(out_dir) if resume else None
    resuming = saved is not None  # resume=True in an empty directory starts the run
    if resuming and USERS_KEY in saved:  # else one prefix would train on every user's rows, into their job
        raise ValueError(f"{out_dir} holds a many-users run (--user-field): resume it with `prefixtune train -o "
                         f"{out_dir} --resume` or prefixtune.users.train_users(..., resume=True)")
    if resuming:  # the run in the directory, as it was started: a contradicting option is refused
        config = resumed_config(out_dir, given_options(config))
        finished = finished_result(out_dir)
        if finished is not None:
            return _finished_run(config, finished, model, tokenizer)
    else:  # saved with its data files absolute: --resume from another directory finds them
        config = with_local_paths(config)
        check_early_stopping(config)
        check_method_options(config)
    watch = TrainingLog(config.report_to, out_dir, asdict(config))  # a missing tracker fails before data or model load
    from_api = train_pairs is not None
    if from_api:
        train_pairs = check_pairs(train_pairs, "train_pairs")
        dev_pairs = check_pairs(dev_pairs, "dev_pairs") if dev_pairs is not None else None
        if not train_pairs:
            raise ValueError("no training examples: train_pairs is empty")
    else:  # data before the model and before --overwrite clears a run: bad rows change nothing
        train_pairs, dev_pairs = load_pairs(config, tokenizer)  # a caller's tokenizer checks its chat rows
    replacing = check_output_dir(out_dir, resume, overwrite)  # refused here; an old run is cleared once the model loads
    provenance = data_provenance(config, from_api, len(train_pairs), len(dev_pairs or []))
    accelerator = Accelerator(cpu=resolve_device(config.device).type == "cpu", **watch.accelerator_kwargs())
    set_seed(config.seed)
    if model is None:
        model, tokenizer = load_base_model(config.model)
    check_positions(config, model)  # before an old run is cleared: a row past GPT-2's positions was an IndexError
    if replacing:
        clear_run(out_dir)
    if accelerator.is_main_process:  # what a killed save of this run's files left (GBs, never renamed)
        remove_stale_temps_of_run(out_dir)
    model.to(accelerator.device)
    spec = model_spec(model)
    method = build_method(config.method, model, tokenizer, spec, config)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    lr = config.lr if config.lr is not None else method.default_lr
    bf16 = use_bf16(config.precision, accelerator.device)

    encode = lambda example: encode_example(tokenizer, spec.family, example, config.template,  # noqa: E731
                                            config.max_source_len, config.max_target_len)
    train_examples = [encode(e) for e in train_pairs]  # a pair, or a chat Conversation
    dev_examples = [encode(e) for e in (dev_pairs or [])]
    collate = Collator(tokenizer.pad_token_id, spec.family, getattr(model.config, "decoder_start_token_id", None))
    lengths = [len(e["input_ids"]) + len(e["labels"]) * (spec.family != "decoder") for e in train_examples]
    steps_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    total_steps = config.max_steps or max(1, int(config.epochs * steps_per_epoch))

    # fused: one pass over each parameter per step instead of a dozen (CPU and CUDA have the kernel)
    optimizer = torch.optim.AdamW([p for p in method.module.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=config.weight_decay,
                                  fused=accelerator.device.type in ("cpu", "cuda") or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, total_steps))
    module, optimizer = accelerator.prepare(method.module, optimizer)

    step, best = 0, {"loss": None, "step": None, "state": None}
    history: list[dict] = []
    if resume and (out_dir / CHECKPOINT).is_file():
        ckpt = Checkpoint.load(out_dir)
        if ckpt.data and ckpt.data.get("source") != provenance["source"]:  # never continue on other data
            raise ValueError(f"{out_dir} holds a run trained on {describe_data({**ckpt.config, 'data': ckpt.data})}"
                             f"; resume it on the same data ({'train_pairs' if from_api else 'its task'} "
                             f"cannot continue it)")
        started, now = (ckpt.data or {}).get("train_pairs"), (provenance["train_pairs"], provenance["dev_pairs"])
        if started is not None and (started, ckpt.data.get("dev_pairs")) != now:  # rows added or removed since
            raise ValueError(f"{out_dir} holds a run started on {started} train and {ckpt.data.get('dev_pairs')} dev "
                             f"pairs, but its data now gives {now[0]} and {now[1]}: resume it on the data it started "
                             f"with (or start a new run with --overwrite)")
        load_trained_state(accelerator.unwrap_model(module), ckpt.module)
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
        step, best, history = ckpt.step, ckpt.best, ckpt.history
        if best["state"] is not None:  # an older checkpoint's best is a full state_dict: keep what trains
            kept = trained_state(accelerator.unwrap_model(module)).keys()
            best = {**best, "state": {k: v for k, v in best["state"].items() if k in kept}}
        _set_rng_state(ckpt.rng)
        del ckpt  # else an older checkpoint's full state stays in memory all run
        accelerator.print(f"resumed from step {step} of {total_steps}")

    def save_checkpoint():
        if accelerator.is_main_process:
            Checkpoint(trained_state(accelerator.unwrap_model(module)), optimizer.state_dict(), scheduler.state_dict(),
                       step, best, history, _rng_state(), asdict(config), provenance).save(out_dir)
        accelerator.wait_for_everyone()

    def dev_loss():
        if not dev_examples:
            return None
        module.eval()
        total, count = 0.0, 0
        with torch.no_grad(), frozen_step, torch.autocast(accelerator.device.type, torch.bfloat16, enabled=bf16):
            for i in range(0, len(dev_examples), config.batch_size * 2):
                batch = {k: v.to(accelerator.device) for k, v in collate(dev_examples[i: i + config.batch_size * 2]).items()}
                loss, n = method.loss(module, batch)
                total, count = total + loss.item() * n, count + n
        module.train()
        return total / max(count, 1)

    if accelerator.is_main_process and not resuming:  # a resumed run keeps the config it was started with
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / TRAIN_CONFIG, json.dumps(asdict(config), indent=2).encode())
    # bf16: the frozen weights are cast once here, not at every step, and frozen Llama layers run on fused
    # weights (precision.FrozenBf16Step)
    frozen_step = FrozenBf16Step(*method.loss_modules()) if bf16 else contextlib.nullcontext()
    rank, world = accelerator.process_index, accelerator.num_processes
    # two or more torch threads on a CPU, one process: each batch's halves run on two Python threads
    # (data_parallel.py). Not with dropout, whose random draws would then depend on thread timing; not when
    # most weights train (finetune): each half then computes the whole model's weight gradient, and the
    # halves were slower than one pass on both threads (measured in docs/training_speed.md)
    trained = [p for p in module.parameters() if p.requires_grad]
    all_weights = sum(p.numel() for p in {id(p): p for m in method.loss_modules() for p in m.parameters()}.values())
    halves = (threaded_halves(accelerator.device, *method.loss_modules())
              if world == 1 and sum(p.numel() for p in trained) < all_weights / 4 else None)

    def non_finite(loss_value: float) -> bool:  # on any process: all stop at the same step (else they would hang)
        bad = torch.tensor(float(not math.isfinite(loss_value)), device=accelerator.device)
        return bool((accelerator.reduce(bad, "sum") if world > 1 else bad).item())

    def loss_of(batch):  # autocast is per thread: entered by the thread that runs the loss
        with torch.autocast(accelerator.device.type, torch.bfloat16, enabled=bf16):
            return method.loss(module, batch)
    module.train()
    bar = tqdm(total=total_steps, initial=step, disable=not (progress and accelerator.is_main_process),
               desc=f"train {config.method}", dynamic_ncols=True)
    tokens = target_tokens = padded_tokens = 0
    train_time = 0.0  # optimiser steps only: dev evaluation and checkpoints are not throughput
    train_cpu_time = 0.0  # the same steps in this process's CPU time (fair on a shared machine)
    stopped_early = early_stop_due(history, best["step"], config.early_stop_patience)
    diverged = False
    while step < total_steps and not stopped_early:
        epoch, offset = divmod(step, steps_per_epoch)
        batches = length_grouped_batches(lengths, config.batch_size, seed=config.seed * 100003 + epoch)
        for global_batch in batches[offset:]:
            if step >= total_steps or stopped_early:
                break
            local = global_batch[rank::world] or global_batch[:1]  # each process takes its share
            step_start, step_cpu_start = time.perf_counter(), time.process_time()
            batch = {k: v.to(accelerator.device) for k, v in collate([train_examples[i] for i in local]).items()}
            with frozen_step:
                if halves is not None and len(local) >= 2:
                    loss, n_target = halves.step(loss_of, batch, trained)
                else:
                    loss, n_target = loss_of(batch)
                    accelerator.backward(loss)
            if config.grad_clip:
                accelerator.clip_grad_norm_(module.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = loss.item()  # also waits for an accelerator to finish the step
            if non_finite(loss_value):  # every later step would train on NaN: stop, keeping the best step
                if best["state"] is None:  # else the export would be NaN weights
                    bar.close()
                    raise ValueError(f"training diverged: the loss is not finite ({loss_value} on this process) at "
                                     f"step {step}, before any dev loss was measured; lower --lr (or try --precision "
                                     f"fp32)")
                diverged = stopped_early = True
                break
            train_time += time.perf_counter() - step_start
            train_cpu_time += time.process_time() - step_cpu_start
            tokens += int(batch["attention_mask"].sum()) + int(batch.get("decoder_attention_mask", torch.zeros(1)).sum())
            target_tokens += n_target
            padded_tokens += sum(v.numel() for k, v in batch.items() if k in ("input_ids", "decoder_input_ids"))
            logs = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens * world / train_time}
            if config.eval_every and step % config.eval_every == 0 or step == total_steps:
                logs["dev_loss"] = dev_loss()
                if (logs["dev_loss"] is not None and math.isfinite(logs["dev_loss"])  # never a NaN/inf step as best
                        and (best["loss"] is None or logs["dev_loss"] < best["loss"])):
                    best = {"loss": logs["dev_loss"], "step": step,
                            "state": copy.deepcopy(trained_state(accelerator.unwrap_model(module)))}
                history.append({k: v for k, v in logs.items()})
                stopped_early = early_stop_due(history, best["step"], config.early_stop_patience)
            watch.step(accelerator, logs, history)  # trackers and loss_curve.png at each evaluation
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=f"{logs['tokens_per_s']:.0f}",
                            **({"dev": f"{logs['dev_loss']:.3f}"} if logs.get("dev_loss") is not None else {}))
            if config.save_every and step % config.save_every == 0 and step < total_steps and not stopped_early:
                save_checkpoint()
            if on_step is not None:
                on_step(step, logs, accelerator.unwrap_model(module))
    bar.close()
    if halves is not None:
        halves.close()
    elapsed = max(train_time, 1e-9)
    final_dev = history[-1].get("dev_loss") if history else None
    stop_reason = ("diverged" if diverged else "early_stop" if stopped_early
                   else "step_limit" if config.max_steps else "epoch_limit")
    save_checkpoint()
    watch.finish(accelerator, history, best["step"])
    # Keep the best step: the exported prefix comes from the lowest dev loss seen.
    if best["state"] is not None:
        load_trained_state(accelerator.unwrap_model(module), best["state"])
    prefix_file = None
    if accelerator.is_main_process and config.export:
        prefix_file = str(method.export(out_dir / EXPORT_FILES[config.method],
                                        {**asdict(config), "steps": step, "best_step": best["step"],
                                         "best_dev_loss": best["loss"], "provenance": provenance}))
    accelerator.wait_for_everyone()
    result = TrainResult(str(out_dir), prefix_file, step, best["step"], best["loss"], final_dev,
                         tokens * world / elapsed, target_tokens * world / elapsed,
                         method.trainable_parameters(), method.shipped_parameters(), history,
                         train_time, padded_tokens, stop_reason, round(step / steps_per_epoch, 3), method,
                         train_cpu_seconds=train_cpu_time)
    if accelerator.is_main_process:
        # a non-finite dev loss in the history is null (json.dumps would write NaN, which is no JSON)
        atomic_write_bytes(out_dir / RESULT, finite_json.dumps(result.to_json(), indent=2).encode())
    return result


def export_checkpoint(run_dir: str | Path, out: str | Path | None = None, which: str = "best") -> Path:
    """Export a run's `best` (lowest dev loss) or `last` step from its checkpoint, as `train` exports at its end:
    to OUT, default RUN_DIR/<the method's export file>."""
    ckpt = Checkpoint.load(run_dir)
    config = TrainConfig(**ckpt.config)
    model, tokenizer = load_base_model(config.model)
    method = build_method(config.method, model, tokenizer, model_spec(model), config)
    load_trained_state(method.module, ckpt.state(which))
    step = ckpt.best["step"] if which == "best" else ckpt.step
    return method.export(out or Path(run_dir) / EXPORT_FILES[config.method],
                         {**checkpoint_facts(ckpt), "exported_from_step": step})

