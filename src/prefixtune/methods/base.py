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


def generate_texts(method: Method, sources: list[str], config, batch_size: int, progress=None, *, model=None,
                   prefix=None, prefix_embeds=None, infix: bool = False) -> list[str]:
    """Decode `sources` like `PrefixBank.generate` (same template and text cleanup), on the engine
    (`engine.offline.decode_ids`: greedy or beams, continuously batched, `batch_size` inputs at a time).

    `method` supplies `model`, `tokenizer`, `spec`, `template` and `max_source_len`; `model` replaces the
    frozen model (a method's trained copy); every row reads `prefix` (P per group), `prefix_embeds`
    (virtual tokens as input embeddings) and, with `infix`, the prefix as an infix.
    """
    from ..data.collate import source_ids
    from ..engine.offline import decode_ids
    from ..generation import DecodingConfig

    config = config or DecodingConfig()
    encoded = [source_ids(method.tokenizer, method.spec.family, s, method.template, method.max_source_len)
               for s in sources]
    ids = decode_ids(method.model if model is None else model, method.tokenizer, encoded, [prefix] * len(encoded),
                     config, prefix_embeds=prefix_embeds, infix=infix, batch_size=batch_size, progress=progress)
    return [_clean(method.tokenizer.decode(seq, skip_special_tokens=True), config) for seq in ids]


def _clean(text: str, config) -> str:
    return text.split("\n")[0].strip() if config.stop_at_newline else text.strip()


def save_weights(path, tensors: dict[str, torch.Tensor], method: Method, metadata: dict):
    """Write trained weights (safetensors, atomically) with the method, base model and config as metadata."""
    from pathlib import Path

    from safetensors.torch import save

    from .. import finite_json
    from ..atomic import atomic_write_bytes
    from ..models import model_name

    tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in tensors.items()}
    meta = {"format": "prefixtune.weights/1", "method": method.name, "base_model": model_name(method.model),
            "fingerprint": method.spec.fingerprint(),
            "train_config": finite_json.dumps(metadata or {}, sort_keys=True, default=str)}  # NaN: null
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return Path(path)
