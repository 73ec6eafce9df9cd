"""Paged keys/values: a pool of fixed-size blocks, taken by traffic, shared read-only by prefix.

The pool is one buffer laid out as (layers, 2, kv_heads, blocks, block_size, head_dim): block b
of layer l holds `block_size` consecutive entries (positions) of one row, keys and values. A row
(a "slot": the engine's running index, or a key above max_batch while it is being prefilled) owns a
block table, its blocks in position order; entry j of the row is entry j % block_size of block
table[j // block_size]. The pool starts empty and doubles when it runs out of free blocks, up to
`max_blocks` (enough for every row at max_len); block 0 is never handed out: it stays zeros, the
padding of a decode step's batched read (`padded`).

A prefix's keys/values (post-RoPE, as a cache holds them) are written once into blocks of their own
and kept in a small LRU keyed by the prefix tensor's identity (the entry holds the tensor, so the id
stays its own; a prefix a row still shares is never the one dropped). A row using the prefix references its full blocks (a refcount each) and copies only
its partly-filled last block, since the row's own tokens follow there. `fork` shares a row's full
blocks the same way (copy-on-write: a full block is never written again). A block returns to the
free list when nothing references it: no row and no cached prefix.

A decode step reads the running rows' entries side by side, padded to a common span with block 0, in
one gather per layer (`padded_index` once a step, then `padded`); a prefill reads a row's entries
exactly, contiguous, as in a slot of its own (`gather`).
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class PagedKV:
    def __init__(self, num_layers: int, max_batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device="cpu", block_size: int = 16, cached_prefixes: int = 64,
                 initial_blocks: int = 0):
        self.layers, self.kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_batch, self.max_len, self.block_size = max_batch, max_len, block_size
        self.dtype, self.device = dtype, device
        # every row at max_len (running and being prefilled: max_batch in all), each with its prefix's
        # partly-filled last block held by the cache too; at the cap, cached prefixes no row uses are dropped
        per_row = -(-max_len // block_size) + 1
        self.max_blocks = 1 + max_batch * per_row
        self.buffer = self._zeros(1 + initial_blocks)
        self.refs = [0] * self.num_blocks
        self.free = list(range(self.num_blocks - 1, 0, -1))
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.prefixes: OrderedDict[int, tuple[torch.Tensor, list[int], int]] = OrderedDict()
        self.cached_prefixes = cached_prefixes

    def _zeros(self, blocks: int) -> torch.Tensor:
        # zeros, not empty: padded entries are multiplied by a zero weight, and 0 * NaN would be NaN
        return torch.zeros(self.layers, 2, self.kv_heads, blocks, self.block_size, self.head_dim, dtype=self.dtype,
                           device=self.device)

    @property
    def num_blocks(self) -> int:
        return self.buffer.shape[3]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def nbytes_per_block(self) -> int:
        return self.nbytes // self.num_blocks

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - 1 - len(self.free)

    # -- blocks --------------------------------------------------------------------------------
    def _grow(self):
        if self.num_blocks >= self.max_blocks:
            raise RuntimeError(f"the KV pool is full ({self.max_blocks} blocks)")
        old = self.num_blocks
        new = min(self.max_blocks, max(2 * old, 16))
        buffer = self._zeros(new)
        buffer[:, :, :, :old] = self.buffer
        self.buffer = buffer
        self.refs += [0] * (new - old)
        self.free = list(range(new - 1, old - 1, -1)) + self.free

    def _unused_prefix(self, keep: int | None = None) -> int | None:
        """The least recently used cached prefix that no row shares (its blocks held by the cache alone)."""
        return next((key for key, (_, blocks, _) in self.prefixes.items()
                     if key != keep and all(self.refs[b] == 1 for b in blocks)), None)

    def _alloc(self) -> int:
        while not self.free:
            unused = self._unused_prefix()
            if unused is not None and self.num_blocks >= self.max_blocks:
                self._drop_prefix(unused)  # at the cap: a cached prefix no row uses gives its blocks back
            else:
                self._grow()
        block = self.free.pop()
        self.refs[block] = 1
        return block

    def _unref(self, blocks):
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)

    def _copy_block(self, src: int, dst: int, entries: int):
        self.buffer[:, :, :, dst, :entries] = self.buffer[:, :, :, src, :entries]

    # -- rows ----------------------------------------------------------------------------------
    def length(self, slot: int) -> int:
        return self.lengths.get(slot, 0)

    def reserve(self, slot: int, length: int):
        """Blocks for the slot's entries up to `length` (not yet written)."""
        table = self.tables.setdefault(slot, [])
        while len(table) * self.block_size < length:
            table.append(self._alloc())
        self.lengths[slot] = max(self.lengths.get(slot, 0), length)

    def attach_prefix(self, slot: int, key: torch.Tensor):
        """Start the slot's row with a prefix: its full blocks shared, its last partial block copied.
        `key` is the prefix's P of the decoder group, (len, layers*2*H*D); its identity names it."""
        self.release(slot)
        cached = self.prefixes.get(id(key))  # the entry holds its tensor: an id in the cache is that tensor's
        if cached is None:
            kv = prefix_to_kv(key.to(self.device), self.kv_heads, self.head_dim, self.dtype)
            length = kv.shape[3]
            blocks = [self._alloc() for _ in range(-(-length // self.block_size))]
            for i, b in enumerate(blocks):
                part = kv[:, :, :, i * self.block_size: (i + 1) * self.block_size]
                self.buffer[:, :, :, b, : part.shape[3]] = part
            cached = (key, blocks, length)
            self.prefixes[id(key)] = cached
        self.prefixes.move_to_end(id(key))
        _, blocks, length = cached
        full, tail = divmod(length, self.block_size)
        table = blocks[:full]
        for b in table:
            self.refs[b] += 1
        if tail:
            own = self._alloc()
            self._copy_block(blocks[full], own, tail)
            table = table + [own]
        self.tables[slot], self.lengths[slot] = table, length
        # over the LRU's size, drop the oldest prefixes no row shares: a running row's prefix stays, so the next
        # row using it shares its blocks instead of writing a copy (in use: at most one per row, max_batch)
        while len(self.prefixes) > self.cached_prefixes:
            unused = self._unused_prefix(keep=id(key))
            if unused is None:
                break
            self._drop_prefix(unused)

    def _drop_prefix(self, key_id: int):
        _, blocks, _ = self.prefixes.pop(key_id)
        self._unref(blocks)

    def release(self, slot: int):
        self._unref(self.tables.pop(slot, []))
        self.lengths.pop(slot, None)

    def move(self, src: int, dst: int, length: int | None = None):
        """The row in `src` now sits in `dst` (whose row has left): its table changes hands, no copy."""
        self.release(dst)
        self.tables[dst] = self.tables.pop(src, [])
        self.lengths[dst] = self.lengths.pop(src, 0)

    def fork(self, src: int, dst: int, length: int):
        """dst's row starts as the first `length` entries of src's: src's full blocks shared (never written
        again: both rows write from `length` on), the partly-filled last one copied."""
        self.release(dst)
        full, tail = divmod(length, self.block_size)
        table = self.tables[src][:full]
        for b in table:
            self.refs[b] += 1
        if tail:
            own = self._alloc()
            self._copy_block(self.tables[src][full], own, tail)
            table = table + [own]
        self.tables[dst], self.lengths[dst] = table, length

    # -- reading and writing -------------------------------------------------------------------
    def flat(self, layer: int) -> torch.Tensor:
        """Layer `layer` as rows of head_dim: row ((kind * kv_heads + head) * blocks + block) * block_size + entry."""
        return self.buffer[layer].view(-1, self.head_dim)

    def write_index(self, slots: list[int], positions: list[int]) -> torch.Tensor:
        """Rows of `flat` for tokens at (slot, position), blocks reserved: (tokens * 2 * kv_heads,), in
        the order of a projection's key heads then value heads, as they sit in a fused qkv output."""
        bs = self.block_size
        for slot, pos in zip(slots, positions):
            if pos >= self.lengths.get(slot, 0):
                self.reserve(slot, pos + 1)
        entries = torch.tensor([self.tables[s][p // bs] * bs + p % bs for s, p in zip(slots, positions)])
        j = torch.arange(2 * self.kv_heads)
        return (j[None, :] * (self.num_blocks * bs) + entries[:, None]).reshape(-1)

    def gather(self, layer: int, slots: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Every slot's blocks of one layer, in one copy: (2, H, entries, D), and where each slot starts.
        Slot s's entries are [start, start + length(s)), contiguous, exactly its own."""
        tables = [self.tables[s] for s in slots]
        index = torch.tensor([b for t in tables for b in t])
        out = self.buffer[layer].index_select(2, index)
        starts, at = [], 0
        for t in tables:
            starts.append(at)
            at += len(t) * self.block_size
        return out.view(2, self.kv_heads, -1, self.head_dim), starts

    def padded_index(self, slots: list[int], span: int) -> torch.Tensor:
        """Blocks holding the slots' first `span` entries, row after row; past a row's blocks, block 0 (zeros)."""
        blocks = -(-span // self.block_size)
        return torch.tensor([(self.tables[s] + [0] * blocks)[:blocks] for s in slots]).reshape(-1)

    def padded(self, layer: int, index: torch.Tensor, rows: int, span: int) -> torch.Tensor:
        """Keys and values of `rows` rows side by side, (2, rows, H, span, D), from `padded_index`'s blocks."""
        # on a 3-d view: twice as fast as on the 5-d layer (measured), the same copy
        out = self.buffer[layer].view(2 * self.kv_heads, self.num_blocks, -1).index_select(1, index)
        out = out.view(2, self.kv_heads, rows, -1, self.head_dim)[:, :, :, :span]
        return out.transpose(1, 2)

    def span(self, longest: int) -> int:
        """Entries a batched step attends over: the longest row rounded up to a block, so shapes repeat."""
        return -(-longest // self.block_size) * self.block_size


def prefix_to_kv(p: torch.Tensor, num_kv_heads: int, head_dim: int, dtype) -> torch.Tensor:
    """P of one group, (len, layers*2*H*D) in prefixtune's layout, as (layers, 2, H, len, D)."""
    length, width = p.shape
    layers = width // (2 * num_kv_heads * head_dim)
    return p.to(dtype).reshape(length, layers, 2, num_kv_heads, head_dim).permute(1, 2, 3, 0, 4)
