"""Server settings: every limit the server enforces, in one place (the CLI maps its options here)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20


@dataclass
class ServeSettings:
    store_dir: Path
    model_name: str | None = None        # the base model's name in /v1/models; default: the model's own name
    max_batch_size: int = 32             # rows per decoding step (a beam request takes one per beam)
    max_batch_tokens: int = 2048         # prompt tokens prefilled in one step: bounds the prefill, one uninterrupted step
    max_queue: int = 256                 # engine rows waiting (a beam search: num_beams); beyond: 429
    request_timeout_s: float = 120.0     # queueing + decoding; beyond that: 503
    max_upload_bytes: int = 16 * MiB     # one prefix file
    max_prefixes_per_tenant: int = 64
    max_bytes_per_tenant: int = 256 * MiB
    max_resident_prefixes: int | None = 256  # prefixes kept loaded (LRU); the others load on demand. None: all
    max_resident_bytes: int | None = None    # the same bound in bytes of prefix tensors (with the count, if both)
    max_prefix_len: int = 512            # virtual tokens of one uploaded prefix
    max_tokens_limit: int = 512          # the largest max_tokens a request may ask for
    default_max_tokens: int = 16         # OpenAI's default when max_tokens is absent
    max_prompts_per_request: int = 32
    max_prompt_chars: int = 32_768
    max_prompt_tokens: int = 512         # a prompt with its template; longer: 400, unless truncate_prompt_tokens
    max_json_bytes: int = 1 * MiB        # body of a JSON request (completions)
    body_timeout_s: float = 30.0         # to receive a whole request body (upload or JSON); then 408 (slowloris)
    worker_stall_s: float = 30.0         # /health is 503 when work waits and the worker has not stepped for this long
    dtype: str = "auto"                  # the engine's compute dtype: auto (bf16 where the CPU has it) | bf16 | fp32
    replicas: int = 1                    # engines over one copy of the weights, one torch thread each (engine/replicas.py)

    def __post_init__(self):
        self.store_dir = Path(self.store_dir)
        for name in ("max_batch_size", "max_batch_tokens", "max_queue", "max_upload_bytes", "max_prefixes_per_tenant",
                     "max_bytes_per_tenant", "max_prefix_len", "max_tokens_limit", "max_prompts_per_request",
                     "max_prompt_tokens", "replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        for name in ("max_resident_prefixes", "max_resident_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, or None for no limit")
        if min(self.request_timeout_s, self.body_timeout_s, self.worker_stall_s) <= 0:
            raise ValueError("request_timeout_s, body_timeout_s and worker_stall_s must be > 0")
