"""vLLM loads a HF-format model directory: the embedded GGUF model is written out once as one."""
from __future__ import annotations

from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def exported_dir(name: str, dtype: str = "bfloat16") -> Path:
    from ..models import cache_dir

    return cache_dir() / "vllm" / f"{name}-{dtype}"


def hf_model_dir(name_or_path: str, dtype: str = "bfloat16") -> Path:
    """A directory vLLM can load for `name_or_path`: itself when it is one, else an export of prefixtune's model.

    The export (`save_pretrained` of `load_base_model(name)` in `dtype`) needs prefixtune's core
    dependencies; it is written once, atomically, under the prefixtune cache.
    """
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out = exported_dir(str(name_or_path).replace("/", "--"), dtype)
    if (out / "config.json").is_file():
        return out
    import torch

    from ..models import load_base_model

    try:
        model, tokenizer = load_base_model(str(name_or_path), dtype=getattr(torch, dtype))
    except (ImportError, FileNotFoundError) as e:
        raise ValueError(f"cannot export {name_or_path!r} for vLLM here ({e}); run `python -m "
                         f"prefixtune.vllm.model_dir {name_or_path} {dtype}` where prefixtune's core install is "
                         "(`make vllm` does), or pass a HF model directory") from None
    from ..atomic import atomic_save_pretrained

    return atomic_save_pretrained(model, tokenizer, out)


if __name__ == "__main__":  # python -m prefixtune.vllm.model_dir [NAME] [DTYPE]: prints the directory
    import sys

    print(hf_model_dir(*(sys.argv[1:] or ["smollm2-135m"])))
