"""Preallocated key/value slots: one slot per running row, filled in place, never grown by copying.

`k` and `v` are (layers, max_batch, kv_heads, max_len, head_dim) views of one buffer laid out as
(layers, 2, max_batch, kv_heads, max_len, head_dim), so one indexed copy per layer writes a step's
keys and values together (`flat`, `write_index`). A row owns one slot; entry j of the slot holds
the keys/values of the row's position j. A prefix is simply what is already there
at admission: its P keys (post-RoPE, as a cache holds them) are copied into entries 0..P-1, and the
row's real tokens follow from entry P, exactly where a cached prompt of P tokens would sit.

Running rows occupy slots 0..B-1, so a step attends over `k[l, :B, :, :L]`, a view. When a row
leaves, the last row moves into its slot (one copy of that row's filled entries).
"""
from __future__ import annotations

import torch


class SlotKV:
    def __init__(self, num_layers: int, max_batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device="cpu", bucket: int = 32):
        # zeros, not empty: masked entries are multiplied by a zero weight, and 0 * NaN would be NaN
        self.buffer = torch.zeros(num_layers, 2, max_batch, num_kv_heads, max_len, head_dim, dtype=dtype,
                                  device=device)
        self.k, self.v = self.buffer[:, 0], self.buffer[:, 1]
        self.max_batch, self.max_len, self.bucket = max_batch, max_len, bucket
        self.kv_heads, self.head_dim = num_kv_heads, head_dim

    def flat(self, layer: int) -> torch.Tensor:
        """Layer `layer` as rows of head_dim: row ((kind * max_batch + slot) * kv_heads + head) * max_len + position."""
        return self.buffer[layer].view(-1, self.head_dim)

    def write_index(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows of `flat` for tokens at (slot, position): (tokens * 2 * kv_heads,), in the order of a
        projection's key heads then value heads, as they sit in a fused qkv output."""
        j = torch.arange(2 * self.kv_heads, device=slots.device)
        kind, head = j // self.kv_heads, j % self.kv_heads
        rows = (kind[None, :] * self.max_batch + slots[:, None]) * self.kv_heads + head[None, :]
        return (rows * self.max_len + positions[:, None]).reshape(-1)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def span(self, longest: int) -> int:
        """Entries a step attends over: the longest row rounded up to a bucket, so shapes repeat."""
        return min(self.max_len, -(-longest // self.bucket) * self.bucket)

    def write_prefix(self, slot: int, kv: torch.Tensor):
        """kv: (layers, 2, kv_heads, P, head_dim), already in the cache dtype."""
        self.buffer[:, :, slot, :, : kv.shape[3]] = kv

    def move(self, src: int, dst: int, length: int):
        self.buffer[:, :, dst, :, :length] = self.buffer[:, :, src, :, :length]

    def fork(self, src: int, dst: int, length: int):
        """Slot `dst` continues slot `src`'s first `length` entries (a beam taking another's hypothesis);
        `src` stays as it is."""
        self.buffer[:, :, dst, :, :length] = self.buffer[:, :, src, :, :length]


def prefix_to_kv(p: torch.Tensor, num_kv_heads: int, head_dim: int, dtype) -> torch.Tensor:
    """P of one group, (len, layers*2*H*D) in prefixtune's layout, as (layers, 2, H, len, D)."""
    length, width = p.shape
    layers = width // (2 * num_kv_heads * head_dim)
    return p.to(dtype).reshape(length, layers, 2, num_kv_heads, head_dim).permute(1, 2, 3, 0, 4)
