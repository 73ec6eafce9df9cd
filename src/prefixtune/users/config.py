"""`UsersConfig`: the options of a many-users job beyond `TrainConfig` (which still sets the method, the
schedule, the learning rate and the dev loss of every user)."""
from __future__ import annotations

from dataclasses import dataclass

from ..serve.tenants import valid_name

METHODS = ("prefix", "prefix-flat")   # one prefix per user: the methods whose export is a prefix


@dataclass
class UsersConfig:
    tenant: str = "default"              # the store tenant that owns every user's prefix (API keys map to it)
    resident_users: int | None = None    # users whose training state is held at once (None: from resident_mb)
    resident_mb: float = 2048.0          # memory for resident users' state (parameters, AdamW, best step)
    pad_to: int = 16                     # rows are padded to a multiple of this (see step.py: why)
    max_tokens_per_forward: int = 4096   # padded tokens in one forward/backward: bounds activation memory
                                         # (about 1 MB a token on SmolLM2-135M); fewer, fuller passes train faster
    share_passes: bool = False           # False: a forward pass holds one user's rows only, so no user's numbers
                                         # depend on another's, on any kernel. True: users are packed into
                                         # fewer, fuller passes (faster where passes are costly, e.g. GPUs); the
                                         # isolation then holds only with kernels whose result for a row does not
                                         # depend on the row count of the call (not bf16 with AMX: docs/users.md)

    def __post_init__(self):
        if not valid_name(self.tenant):
            raise ValueError(f"tenant {self.tenant!r} is not a valid tenant name "
                             "(1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)")
        for name in ("pad_to", "max_tokens_per_forward"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resident_users is not None and self.resident_users < 1:
            raise ValueError(f"resident_users must be >= 1, got {self.resident_users}")
        if self.resident_mb <= 0:
            raise ValueError(f"resident_mb must be > 0, got {self.resident_mb}")
