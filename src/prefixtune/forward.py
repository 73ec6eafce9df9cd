"""Running the frozen model with a prefix: positions, per-row prefixes, and the training loss.

Everything here goes through the same `position_ids` and `PrefixKV`, so a token
sees the same positions and the same prefix in training, scoring and decoding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cache
from .cache import PrefixKV
from .models import ModelSpec
from .prefix import p_to_kv


def prefix_kv_from_groups(p_groups: list[dict[str, torch.Tensor] | None], spec: ModelSpec,
                          device=None, dtype=None) -> PrefixKV | None:
    """A batch of prefixes, one per row (None = no prefix), padded to the longest with masked slots.

    Each element maps group -> P (len, width). Rows may have different lengths.
    """
    if all(p is None for p in p_groups):
        return None
    lengths = [0 if p is None else next(iter(p.values())).shape[0] for p in p_groups]
    longest, batch = max(lengths), len(p_groups)
    ref = next(p for p in p_groups if p is not None)
    device = device or next(iter(ref.values())).device
    dtype = dtype or next(iter(ref.values())).dtype
    keys, values = {}, {}
    for group, tensor in ref.items():
        width = tensor.shape[1]
        padded = torch.zeros(batch, longest, width, device=device, dtype=dtype)
        for row, p in enumerate(p_groups):
            if p is not None:
                padded[row, : lengths[row]] = p[group].to(device=device, dtype=dtype)
        k, v = p_to_kv(padded, spec, group)
        keys.update(k)
        values.update(v)
    mask = torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    return PrefixKV(keys=keys, values=values, mask=mask)


def single_prefix_kv(p: dict[str, torch.Tensor], spec: ModelSpec, batch: int) -> PrefixKV:
    """One prefix shared by every row of a batch (training): an expand, no copy, gradients flow."""
    keys, values = {}, {}
    for group, tensor in p.items():
        k, v = p_to_kv(tensor.unsqueeze(0).expand(batch, *tensor.shape), spec, group)
        keys.update(k)
        values.update(v)
    length = next(iter(p.values())).shape[0]
    mask = torch.ones(batch, length, dtype=torch.bool, device=next(iter(p.values())).device)
    return PrefixKV(keys=keys, values=values, mask=mask)


def position_ids(attention_mask: torch.Tensor, offsets: torch.Tensor | int = 0) -> torch.Tensor:
    """Positions of real tokens count from the row's prefix length, whatever the padding side.

    A decoder-only prefix occupies positions 0..len-1 (that is where real-word
    activations used to initialise it were computed), so x starts at len.
    """
    if not torch.is_tensor(offsets):
        offsets = torch.full((attention_mask.shape[0],), int(offsets), device=attention_mask.device)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0) + offsets[:, None].to(pos.device)


def prefix_offsets(prefix_kv: PrefixKV | None, batch: int, device) -> torch.Tensor:
    if prefix_kv is None or prefix_kv.mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return prefix_kv.mask.sum(-1).long()


def grouped_prefix_kv(groups: list[tuple[dict[str, torch.Tensor], int]], spec: ModelSpec) -> PrefixKV:
    """Rows grouped by prefix (many users in one batch): `groups` is [(P, rows)], each P given to its
    next `rows` rows. Each P is expanded, never copied per row, so its gradient is the sum over its own
    rows only, as in `single_prefix_kv`. All P must have one length."""
    keys, values = {}, {}
    for group in groups[0][0]:
        stacked = torch.cat([p[group].unsqueeze(0).expand(rows, *p[group].shape) for p, rows in groups])
        k, v = p_to_kv(stacked, spec, group)
        keys.update(k)
        values.update(v)
    ref = next(iter(groups[0][0].values()))
    mask = torch.ones(sum(rows for _, rows in groups), ref.shape[0], dtype=torch.bool, device=ref.device)
    return PrefixKV(keys=keys, values=values, mask=mask)


def target_logits(model, spec: ModelSpec, batch: dict, prefix_kv: PrefixKV | None):
    """(logits, targets, rows) of the target tokens y given x and the prefix, in row-major order;
    `rows[i]` is the batch row of target token i.

    Decoder-only models run the LM head on target positions only: the head is about a
    fifth of a small model's compute and the source and padding never need logits.
    """
    cache.install(model)
    if spec.family == "encoder-decoder":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=batch["decoder_input_ids"], decoder_attention_mask=batch["decoder_attention_mask"],
                    prefix_kv=prefix_kv, use_cache=False)
        labels = batch["labels"]
        selected = labels != -100
        logits = out.logits[selected]
    else:
        mask = batch["attention_mask"]
        offsets = prefix_offsets(prefix_kv, mask.shape[0], mask.device)
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=mask,
                                  position_ids=position_ids(mask, offsets), prefix_kv=prefix_kv,
                                  use_cache=False).last_hidden_state
        labels = batch["labels"][:, 1:]
        selected = labels != -100
        logits = model.get_output_embeddings()(hidden[:, :-1][selected])
    return logits, labels[selected], selected.nonzero()[:, 0]


def lm_loss(model, spec: ModelSpec, batch: dict, prefix_kv: PrefixKV | None):
    """Cross-entropy of the target tokens y given x and the prefix; returns (loss, number of target tokens)."""
    logits, targets, _ = target_logits(model, spec, batch, prefix_kv)
    return F.cross_entropy(logits.float(), targets), targets.numel()
