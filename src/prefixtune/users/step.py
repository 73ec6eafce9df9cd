"""One joint step: many users' rows in forward passes, each row attending to its own user's prefix, and each
user's loss normalised by their own target tokens.

By default (`UsersConfig.share_passes` False) a forward pass holds one user's rows only: what a user's rows
compute cannot depend on another user's rows, on any kernel, so changing one user's data changes no bit of
another user's prefix (tests/test_users.py, also on a simulated kernel whose rows depend on the rows of the
call). With `share_passes` users' rows are packed into fewer, fuller passes (up to `max_tokens_per_forward`
padded tokens): faster where a pass costs much more than its rows (GPUs), and isolated only where the kernels
give a row the same bits at any row count. On the CPU here they do in fp32, and not in bf16 with AMX (SmolLM2:
14 of 384 rows of the q projection round differently in a 768-row call; another user in the pass moved a user's
gradient of P by 1.6-2.7% and their prefix by 5-11% of max|P| after 2 steps; docs/users.md).

Rows are padded to their own length rounded up to `pad_to`, and one forward holds rows of one padded
length. Why: on CPU (measured here with SmolLM2, fp32 and bf16) a row's backward is bit-identical only at the
same padded length: the kernels block their sums over the sequence by its length. A row's padded length that
depends on the row alone keeps a user's numbers independent of the other users' rows. For the same reason a
user's rows of one length are never split across two forwards, and their gradients are summed over the
forwards in a fixed order (ascending length).

Each user's P is computed once per step and its gradient gathered in float32 over the forwards
(`gradient_leaves`); it then goes back through the user's MLP (if any) once, as in a step of `train.train`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..forward import grouped_prefix_kv, target_logits


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_key(example: dict, family: str, pad_to: int) -> tuple[int, ...]:
    """The padded lengths of a row: (input,) for decoder-only models, (input, decoder input) otherwise."""
    if family == "decoder":
        return (_round_up(len(example["input_ids"]), pad_to),)
    return (_round_up(len(example["input_ids"]), pad_to), _round_up(len(example["labels"]), pad_to))


def target_count(example: dict, family: str) -> int:
    """Target tokens of a row, as `forward.target_logits` selects them."""
    labels = example["labels"][1:] if family == "decoder" else example["labels"]
    return sum(1 for t in labels if t != -100)


def plan(batches: dict[int, list[dict]], family: str, pad_to: int, max_tokens: int,
         share_passes: bool = False) -> list[tuple[tuple, list]]:
    """Forward passes for one step: [(padded key, [(user, rows), ...])], ascending by length, then in user order.

    A user's rows of one padded length stay together in one pass. By default a pass holds one user only
    (`UsersConfig.share_passes` False). With `share_passes` users of one padded length are packed into a pass of
    at most `max_tokens` padded tokens (unless one user's rows alone need more)."""
    buckets: dict[tuple, list] = {}
    for user, batch in batches.items():
        by_key: dict[tuple, list] = {}
        for example in batch:
            by_key.setdefault(padded_key(example, family, pad_to), []).append(example)
        for key, rows in by_key.items():
            buckets.setdefault(key, []).append((user, rows))
    passes = []
    for key in sorted(buckets):
        if not share_passes:
            passes.extend((key, [group]) for group in buckets[key])
            continue
        per_row, current, tokens = sum(key), [], 0
        for user, rows in buckets[key]:
            if current and tokens + per_row * len(rows) > max_tokens:
                passes.append((key, current))
                current, tokens = [], 0
            current.append((user, rows))
            tokens += per_row * len(rows)
        passes.append((key, current))
    return passes


def collate_padded(collate, rows: list[dict], key: tuple, family: str, device) -> dict:
    """`Collator` output padded on the right to the pass's lengths."""
    batch = collate(rows)
    source, target = key[0], key[-1]
    widths = {"input_ids": source, "attention_mask": source, "labels": source if family == "decoder" else target,
              "decoder_input_ids": target, "decoder_attention_mask": target}
    fill = {"input_ids": collate.pad_id, "attention_mask": 0, "labels": -100,
            "decoder_input_ids": collate.pad_id, "decoder_attention_mask": 0}
    return {k: F.pad(v, (0, widths[k] - v.shape[1]), value=fill[k]).to(device) for k, v in batch.items()}


def gradient_leaves(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where a user's gradient is gathered over the passes: P itself when it is a float32 parameter (prefix-flat
    without dropout: no copy), else a float32 copy of P whose gradient then goes back through the MLP once."""
    return {g: t if t.is_leaf and t.requires_grad and t.dtype == torch.float32 else t.detach().float().requires_grad_()
            for g, t in p.items()}


def split_users(groups: list, parts: int = 2) -> list[list]:
    """A pass's [(user, rows), ...] in up to `parts` pieces of whole users, about equal in rows, in order."""
    total, pieces, rows = sum(len(group) for _, group in groups), [[]], 0
    for user, group in groups:
        if pieces[-1] and len(pieces) < parts and rows >= total * len(pieces) / parts:
            pieces.append([])
        pieces[-1].append((user, group))
        rows += len(group)
    return pieces


def _run_pass(model, spec, key, groups, prefixes, collate, device, bf16, normalisers):
    """One forward of whole users' rows at one padded length: ({user: (loss sum, target tokens)}, {user: gradients
    of their `prefixes` entry, or None without `normalisers`})."""
    rows = [example for _, group in groups for example in group]
    batch = collate_padded(collate, rows, key, spec.family, device)
    counts = [sum(target_count(e, spec.family) for e in group) for _, group in groups]
    grad = contextlib.nullcontext() if normalisers else torch.no_grad()
    with grad, torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        prefix_kv = grouped_prefix_kv([(prefixes[user], len(group)) for user, group in groups], spec)
        logits, targets, _ = target_logits(model, spec, batch, prefix_kv)
        token_losses = F.cross_entropy(logits.float(), targets, reduction="none")
    parts = token_losses.split(counts)  # rows are grouped by user, tokens are row-major
    grads = None
    if normalisers:
        leaves = [(user, g, t) for user, _ in groups for g, t in prefixes[user].items()]
        loss = sum(part.sum() / normalisers[user] for (user, _), part in zip(groups, parts))
        found = torch.autograd.grad(loss, [t for _, _, t in leaves], allow_unused=True)
        grads = {}
        for (user, g, _), d in zip(leaves, found):
            grads.setdefault(user, {})[g] = d
    sums = {user: (part.detach().double().sum().item(), count) for (user, _), part, count in zip(groups, parts, counts)}
    return sums, grads


def run_passes(model, spec, passes, prefixes: dict, collate, device, bf16: bool, normalisers: dict | None = None,
               frozen=contextlib.nullcontext(), halves=None):
    """Run the passes; returns {user: (sum of target-token losses, target tokens)}. `frozen`: the job's
    `precision.FrozenBf16Step` under bf16 (as train.py: weights cast and fused once per job).

    With `normalisers` (user -> target tokens of their batch) each pass backpropagates
    sum over users of (their token losses / their normaliser) into the `prefixes` tensors' `.grad`: a user's
    gradient is the mean over their own tokens, whatever else is in the pass. Without, nothing is
    backpropagated (dev loss). With `halves` (a `data_parallel.ThreadedHalves`, as train.py makes with 2+
    torch threads) the training passes run on its two single-threaded worker threads, two at a time: a pass
    of several users (`share_passes`) is split into two pieces of whole users, a pass of one user runs whole,
    and consecutive pieces run concurrently. A user's rows still run together at their padded length on one
    single-threaded worker, and the results are summed in the passes' order, so every gradient is the one
    the passes give run one after another on one thread, to the bit."""
    if halves is not None and normalisers:
        pieces = [(key, part) for key, groups in passes
                  for part in (split_users(groups) if len(groups) > 1 else [groups])]
        with frozen:
            results = halves.map(lambda piece: _run_pass(model, spec, piece[0], piece[1], prefixes, collate, device,
                                                         bf16, normalisers), pieces)
    else:
        results = []
        for key, groups in passes:
            with frozen:
                results.append(_run_pass(model, spec, key, groups, prefixes, collate, device, bf16, normalisers))
    sums: dict = {}
    for piece_sums, grads in results:  # fixed order: passes ascending, then the pieces of a pass in order
        for user, (total, count) in piece_sums.items():
            before, n = sums.get(user, (0.0, 0))
            sums[user] = (before + total, n + count)
        for user, by_group in (grads or {}).items():
            for g, d in by_group.items():
                leaf = prefixes[user][g]
                if d is not None:
                    leaf.grad = d if leaf.grad is None else leaf.grad + d
    return sums
