"""`train_users`: one frozen model, one job, one prefix per user, written into a prefix store.

Users are trained in rounds: in each round every resident user takes one step on their own next batch,
and all their rows go through the frozen model together (step.py). A user who is done (their step limit,
or early stopping on their own dev loss) is exported at once and their state freed, and the next user
takes their place: at most `resident_users` users' state is held at a time, so 1,000 users fit in the
memory of a few. Which users share a round changes nothing for any of them (see step.py), so the
result does not depend on the order of users, the rounds, or the memory budget.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write_bytes
from ..finite_json import finite
from ..checkpoint import load_trained_state
from ..data.collate import Collator, encode_example
from ..data_parallel import threaded_halves
from ..methods import build_method
from ..methods.base import count_parameters
from ..exported import read_header
from ..models import load_base_model, model_name, model_spec, resolve_device
from ..precision import FrozenBf16Step
from ..prefix_file import PrefixFileError, save_prefix
from ..run_dir import (NOT_THE_RUN, USERS_KEY, USERS_STORE, check_output_dir, clear_run, given_options,
                       remove_stale_temps_of_run, resumed_config, saved_config, with_local_paths)
from ..serve.tenants import tenant_dir_name
from ..tracking import UsersLog
from ..train import use_bf16
from ..train_config import TrainConfig, check_early_stopping, check_positions
from .config import METHODS, UsersConfig
from .names import prefix_names
from .result import UsersResult, write_summary
from .state import UserState
from .step import gradient_leaves, plan, run_passes, target_count


def store_dir(output_dir: str | Path, tenant: str) -> Path:
    """Where the users' prefixes go: the store layout of serve/store.py (STORE/<tenant hash>/<name>.safetensors)."""
    return Path(output_dir) / USERS_STORE / tenant_dir_name(tenant)


def resumed_users_config(out: Path, given: dict, tenant: str | None, flags: bool = False
                         ) -> tuple[TrainConfig, UsersConfig] | None:
    """The saved options of the many-users job in OUT (train_config.json), to finish it as it was started, or None
    when OUT holds no job yet. `given` (the options the caller set) and `tenant` (None: not set) must agree with
    them: a contradiction is refused naming both values, as `train --resume` refuses one."""
    saved = saved_config(out)
    if saved is None:
        return None
    if USERS_KEY not in saved:
        raise ValueError(f"{out} holds a single-prefix run (train without --user-field), not a many-users one")
    config = resumed_config(out, given, flags)
    users = UsersConfig(**saved[USERS_KEY])
    if tenant is not None and tenant != users.tenant:
        raise ValueError(f"{out} holds a many-users run with {'--tenant' if flags else 'tenant'} {users.tenant!r}, "
                         f"not {tenant!r}: --resume finishes that run as it was started")
    return config, users


def _data_digest(train: list, dev: list) -> str:
    return hashlib.sha256(json.dumps([train, dev], default=str).encode()).hexdigest()


def _job_file(path: Path, config: TrainConfig) -> dict | None:
    """The metadata of a user's prefix that this job wrote (its user, the digest of their rows, the job's options),
    or None: a file written otherwise (an upload, another job, another version) is not this job's."""
    try:
        meta = json.loads(read_header(path)[0].get("train_config") or "{}") if path.is_file() else {}
    except (PrefixFileError, json.JSONDecodeError):
        return None
    # where the job runs and on what device are no options of its users (run_dir.NOT_THE_RUN): a moved job keeps them
    wanted = {k: v for k, v in json.loads(json.dumps(asdict(config), sort_keys=True, default=str)).items()
              if k not in NOT_THE_RUN}
    ours = isinstance(meta, dict) and "user" in meta and "data_digest" in meta
    return meta if ours and all(meta.get(k) == v for k, v in wanted.items()) else None


def _finished(path: Path, user: str, digest: str, config: TrainConfig) -> dict | None:
    """The summary row of a user an earlier run of this job exported, when their file says it was trained on the
    same rows with the same options; else None (they are trained again: each user's training is deterministic)."""
    meta = _job_file(path, config)
    same = meta is not None and meta.get("user") == user and meta.get("data_digest") == digest
    return meta.get("summary") if same else None


def remove_departed_users(prefixes: Path, config: TrainConfig, users) -> list[str]:
    """On resume: delete from the store the prefixes this job wrote for users no longer in its data (a user is
    removed by removing their prefix: what `serve --store` serves is what is in the store). Returns their users.
    Only this job's files (`_job_file`); each goes in one unlink, so the store never holds half a file."""
    removed = []
    for path in sorted(prefixes.glob("*.safetensors")):
        meta = _job_file(path, config)
        if meta is not None and str(meta["user"]) not in users:
            path.unlink()
            removed.append(str(meta["user"]))
    return removed


def check_users(config: TrainConfig, train: dict, reserved: tuple[str, ...] = ()) -> dict[str, str]:
    """What can be refused before the model loads: the method, users without examples, users without a
    prefix name of their own (names.py). Returns user -> prefix name."""
    if config.method not in METHODS:
        raise ValueError(f"many users train one prefix each: --method must be one of {', '.join(METHODS)}, "
                         f"not {config.method!r}")
    if not train:
        raise ValueError("no users: the training data holds no rows")
    empty = [u for u, examples in train.items() if not examples]
    if empty:
        raise ValueError(f"user {str(empty[0])!r} has no training examples")
    return prefix_names(train, reserved=(config.model, *reserved))


def train_users(config: TrainConfig, model=None, tokenizer=None, train: dict | None = None, dev: dict | None = None,
                users: UsersConfig | None = None, progress: bool = True, overwrite: bool = False,
                resume: bool = False, given: dict | None = None, flags: bool = False) -> UsersResult:
    """Train one prefix per user in one job and write them into OUTPUT_DIR/store for `prefixtune serve`.

    `train` and `dev` map each user to their examples ((source, target) pairs, or chat conversations); without
    them they are read from `config.data` with `config.user_field` (users/data.py). Every user is trained as
    `train.train` would train their data alone with `config` (same seed, same batches, same schedule), and
    independently of every other user. `resume` finishes a killed job with its saved options and tenant: users
    already in the store (same rows, same options) are kept, the others are trained, and the prefixes of users no
    longer in the data are deleted from the store (`UsersResult.removed_users`). The options set (`given`;
    default: those of `config` that differ from the defaults) and `users.tenant` must agree with the saved ones
    (`flags`: a refusal names them as command-line flags); what else `users` sets (a memory budget) is kept.
    """
    resumed = None
    if resume:  # the job in OUTPUT_DIR as it was started (its options, its tenant), like `train`'s resume
        resumed = resumed_users_config(Path(config.output_dir), given_options(config) if given is None else given,
                                       None if users is None else users.tenant, flags)
        if resumed is not None:
            config, saved_users = resumed  # with the job options the caller set (a memory budget, say)
            default = asdict(UsersConfig())
            users = replace(saved_users, **{k: v for k, v in asdict(users or UsersConfig()).items() if v != default[k]})
    if resumed is None:  # saved with its data files absolute: --resume from another directory finds them
        config = with_local_paths(config)
        check_early_stopping(config)
    users = users or UsersConfig()
    # a missing tracker fails before data or model load
    watch = UsersLog(config.report_to, config.output_dir, {**asdict(config), "tenant": users.tenant})
    if train is None:  # data before the model: a bad file fails in a second
        from .data import load_user_pairs

        train, dev = load_user_pairs(config, tokenizer)
    train = {str(user): examples for user, examples in train.items()}
    dev = {str(user): examples for user, examples in (dev or {}).items()}
    check_users(config, train)
    out = Path(config.output_dir)
    replacing = check_output_dir(out, resume, overwrite, users=True)  # after the checks: bad input never clears a run
    device = resolve_device(config.device)
    if model is None:
        model, tokenizer = load_base_model(config.model)
    check_positions(config, model)  # nor do lengths past the model's learned positions
    if replacing:  # nor does a model that fails to load
        clear_run(out)
    remove_stale_temps_of_run(out)  # what a killed write of the job's files left
    names = check_users(config, train, reserved=(model_name(model),))
    removed = remove_departed_users(store_dir(out, users.tenant), config, set(train)) if resume else []
    if removed and progress:
        tqdm.write(f"removed from the store, no longer in the data: {', '.join(removed)}", file=sys.stderr)
    model.to(device)
    spec = model_spec(model)
    # Every user starts from the module a lone run with this seed starts from, and from its RNG state.
    torch.manual_seed(config.seed)
    method = build_method(config.method, model, tokenizer, spec, config)
    template = method.module
    rng = None
    if config.prefix_dropout > 0:
        rng = torch.cuda.get_rng_state() if device.type == "cuda" else torch.get_rng_state()
    if config.gradient_checkpointing:
        from ..cache import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    lr = config.lr if config.lr is not None else method.default_lr
    bf16 = use_bf16(config.precision, device)
    # bf16: the frozen weights are cast once for the job, not at every pass (see precision.py), and frozen
    # Llama layers run on fused weights (llama_training.py): train.py's numerics, so a user's prefix is the
    # one a separate `prefixtune train` on their rows gives
    frozen = FrozenBf16Step(model) if bf16 else contextlib.nullcontext()
    # 2+ torch threads on a CPU: the passes run on two single-threaded workers, as train.py's halves
    halves = threaded_halves(device, model, template)
    encode = lambda example: encode_example(tokenizer, spec.family, example, config.template,  # noqa: E731
                                            config.max_source_len, config.max_target_len)
    collate = Collator(tokenizer.pad_token_id, spec.family, getattr(model.config, "decoder_start_token_id", None))
    # a resident user holds 5 copies of their parameters: themselves, a gradient, AdamW's two moments, the best state
    per_user = 5 * sum(p.numel() * p.element_size() for p in template.parameters())
    resident = min(len(train), users.resident_users or max(1, int(users.resident_mb * 2**20 // per_user)))

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "train_config.json",
                       json.dumps({**asdict(config), USERS_KEY: asdict(users)}, indent=2).encode())
    prefixes = store_dir(out, users.tenant)
    base_params = count_parameters(model)
    digests = {user: _data_digest(train[user], dev.get(user, [])) for user in train}
    rows, pending, active = [], deque(), []
    for user in train:
        row = _finished(prefixes / f"{names[user]}.safetensors", user, digests[user], config) if resume else None
        if row is None:
            pending.append(user)
        else:
            rows.append(row)
    state_bytes = 0
    tokens = padded = 0
    train_time = dev_time = export_time = 0.0
    bar = tqdm(total=len(train), initial=len(rows), disable=not progress, desc="users", dynamic_ncols=True)
    watch.start(cpu=device.type == "cpu")

    def export(state: UserState):
        nonlocal state_bytes
        state_bytes = max(state_bytes, state.state_bytes())
        module = state.module
        if state.best["state"] is not None:  # the exported prefix is the user's lowest dev loss
            load_trained_state(module, state.best["state"])
        module.eval()
        with torch.no_grad():
            p = {g: t.detach().float().cpu() for g, t in module().items()}
        final = state.history[-1].get("dev_loss") if state.history else None
        stop = ("diverged" if state.diverged else "early_stop" if state.stopped_early
                else "step_limit" if config.max_steps else "epoch_limit")
        # a diverged user's last training loss (and a dev loss measured after it) is NaN: None, as JSON's null
        row = finite({"user": state.user, "prefix": state.name, "examples": len(state.examples),
               "dev_examples": len(state.dev_examples), "steps": state.step, "best_step": state.best["step"],
               "best_dev_loss": state.best["loss"], "final_dev_loss": final, "last_train_loss": state.last_loss,
               "stop_reason": stop})
        save_prefix(prefixes / f"{state.name}.safetensors", p, spec, model_name(model),
                    {**asdict(config), "user": state.user, "best_step": state.best["step"],
                     "best_dev_loss": state.best["loss"], "base_params": base_params, "summary": row,
                     "data_digest": digests[state.user]})
        rows.append(row)
        bar.update(1)

    while pending or active:
        while pending and len(active) < resident:
            user = pending.popleft()
            active.append(UserState.create(user, names[user], [encode(e) for e in train[user]],
                                           [encode(e) for e in dev.get(user, [])], template, config, lr,
                                           spec.family, rng))
        start = time.perf_counter()
        batches = {i: state.next_batch() for i, state in enumerate(active)}
        round_tokens, round_padded = _train_round(active, batches, model, spec, collate, device, bf16, users, config,
                                                   frozen, halves)
        train_time += time.perf_counter() - start
        tokens, padded = tokens + round_tokens, padded + round_padded
        due = [i for i, state in enumerate(active) if not state.diverged and state.eval_due(config.eval_every)]
        start = time.perf_counter()
        dev_losses = _dev_losses({i: active[i] for i in due}, model, spec, collate, device, bf16, users, config,
                                frozen)
        dev_time += time.perf_counter() - start
        for i in due:
            state = active[i]
            state.record({"step": state.step, "loss": state.last_loss, "lr": state.scheduler.get_last_lr()[0],
                          "dev_loss": dev_losses.get(i)}, config.early_stop_patience)
            watch.evaluation(state.user, state.history[-1])
        start = time.perf_counter()
        for state in [s for s in active if s.done]:
            export(state)
        export_time += time.perf_counter() - start
        active = [s for s in active if not s.done]
        state = None  # the loops' last user: once exported, it would stay resident (past the budget) a round more
        bar.set_postfix(resident=len(active), tok_s=f"{tokens / max(train_time, 1e-9):.0f}")
    bar.close()
    if halves is not None:
        halves.close()
    watch.close()
    result = UsersResult(str(out), str(out / USERS_STORE), users.tenant, rows, tokens / max(train_time, 1e-9),
                         train_time, tokens, padded, resident, state_bytes, per_user, dev_time, export_time, removed)
    write_summary(result, out)
    return result


def _train_round(active: list[UserState], batches: dict, model, spec, collate, device, bf16: bool,
                 users: UsersConfig, config: TrainConfig, frozen, halves=None) -> tuple[int, int]:
    """Every resident user takes one step on their own batch; returns (tokens, padded tokens) computed."""
    prefixes = {i: state.prefix(device) for i, state in enumerate(active)}
    leaves = {i: gradient_leaves(p) for i, p in prefixes.items()}
    normalisers = {i: sum(target_count(e, spec.family) for e in batch) for i, batch in batches.items()}
    passes = plan(batches, spec.family, users.pad_to, users.max_tokens_per_forward, users.share_passes)
    sums = run_passes(model, spec, passes, leaves, collate, device, bf16, normalisers, frozen, halves)
    for i, state in enumerate(active):
        state.step_with(prefixes[i], leaves[i], config.grad_clip)
        state.last_loss = sums[i][0] / max(sums[i][1], 1)
        state.train_losses.append(state.last_loss)
        state.check_finite()
    tokens = sum(len(e["input_ids"]) + (len(e["labels"]) if spec.family != "decoder" else 0)
                 for batch in batches.values() for e in batch)
    return tokens, sum(sum(key) * len(group) for key, groups in passes for _, group in groups)


def _dev_losses(states: dict, model, spec, collate, device, bf16, users: UsersConfig, config: TrainConfig,
                frozen) -> dict:
    """Each due user's mean dev loss per target token, their dev rows run together (no gradients)."""
    batches = {i: s.dev_examples for i, s in states.items() if s.dev_examples}
    if not batches:
        return {}
    for state in states.values():
        state.module.eval()
    with torch.no_grad(), torch.autocast(device.type, enabled=False):  # P in float32, as train.py's dev loss
        prefixes = {i: states[i].module() for i in batches}
    for state in states.values():
        state.module.train()
    passes = plan(batches, spec.family, users.pad_to, users.max_tokens_per_forward, users.share_passes)
    sums = run_passes(model, spec, passes, prefixes, collate, device, bf16, frozen=frozen)
    return {i: total / max(n, 1) for i, (total, n) in sums.items()}
