"""The interface every training method implements."""
from __future__ import annotations

import torch
from torch import nn


def count_parameters(module: nn.Module) -> int:
    """Parameters of a module, each shared (tied) tensor counted once."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def percent_of_base(count: int, base_model: nn.Module) -> float:
    """`count` as a percentage of the base model's parameters (what the paper's tables report)."""
    return 100.0 * count / max(count_parameters(base_model), 1)


class Method:
    """A way of adapting a frozen model: owns the trainable module and computes the loss.

    `module` is what the trainer optimises (and what accelerate wraps for several
    processes); `loss` must call the module it is given (the wrapped one) so that
    gradients synchronise.
    """

    name: str
    module: nn.Module
    model: nn.Module        # the shared frozen base model (its weights never change)
    default_lr: float = 5e-5

    def loss(self, module: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def export(self, path, metadata: dict):
        """Write what users ship for this method."""
        raise NotImplementedError

    def load_export(self, tensors: dict[str, torch.Tensor]):
        """The inverse of `export` for a weights file: put its tensors back (`generate`/`eval` decode with it)."""
        raise NotImplementedError

    def generate(self, sources: list[str], config=None, batch_size: int = 32, progress=None) -> list[str]:
        """Decode sources with the trained method (evaluation and experiments use this);
        `progress(n)` is called after each batch of n sources."""
        raise NotImplementedError

    def loss_modules(self) -> tuple[nn.Module, ...]:
        """Every module `loss` runs through (the trainer casts their frozen weights to bf16 once)."""
        return (self.model, self.module)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def shipped_parameters(self) -> int:
        """Parameters in the exported artefact (for prefixes: P without the MLP)."""
        return self.trainable_parameters()

    def trainable_percent(self) -> float:
        """Trainable parameters as a percentage of the frozen base model's parameters."""
        return percent_of_base(self.trainable_parameters(), self.model)

    def shipped_percent(self) -> float:
        return percent_of_base(self.shipped_parameters(), self.model)


def generate_texts(method: Method, sources: list[str], config, batch_size: int, decode_batch,
                   progress=None, engine_model=None) -> list[str]:
    """Decode `sources` like `PrefixBank.generate` (same template and text cleanup).

    `method` supplies `model`, `tokenizer`, `spec`, `template` and `max_source_len`. Decoding (greedy or beams) runs
    on the engine when the method decodes as a plain model (`engine_model`: its trained copy) and the
    engine takes the config (`engine.offline.engine_decodes`); otherwise `decode_batch(sequences, config)`
    returns the generated ids of each length-sorted batch.
    """
    from ..data.collate import source_ids
    from ..engine.offline import decode_ids, engine_decodes
    from ..generation import DecodingConfig

    config = config or DecodingConfig()
    encoded = [source_ids(method.tokenizer, method.spec.family, s, method.template, method.max_source_len)
               for s in sources]
    if engine_model is not None and engine_decodes(config, method.spec):
        ids = decode_ids(engine_model, method.tokenizer, encoded, [None] * len(encoded), config,
                         batch_size=batch_size, progress=progress)
        return [_clean(method.tokenizer.decode(seq, skip_special_tokens=True), config) for seq in ids]
    order = sorted(range(len(sources)), key=lambda i: len(encoded[i]))
    outputs = [""] * len(sources)
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        for i, seq in zip(rows, decode_batch([encoded[i] for i in rows], config)):
            outputs[i] = _clean(method.tokenizer.decode(seq, skip_special_tokens=True), config)
        if progress is not None:
            progress(len(rows))
    return outputs


def _clean(text: str, config) -> str:
    return text.split("\n")[0].strip() if config.stop_at_newline else text.strip()


def save_weights(path, tensors: dict[str, torch.Tensor], method: Method, metadata: dict):
    """Write trained weights (safetensors, atomically) with the method, base model and config as metadata."""
    import json
    from pathlib import Path

    from safetensors.torch import save

    from ..atomic import atomic_write_bytes
    from ..models import model_name

    tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in tensors.items()}
    meta = {"format": "prefixtune.weights/1", "method": method.name, "base_model": model_name(method.model),
            "fingerprint": method.spec.fingerprint(),
            "train_config": json.dumps(metadata or {}, sort_keys=True, default=str)}
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return Path(path)
