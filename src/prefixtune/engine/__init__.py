"""prefixtune's decoding engine: continuous batching over paged KV blocks, a prefix per row."""
from .engine import Engine, resolve_dtype
from .replicas import Replicas, make_engine
from .request import Choice, Request, RequestOutput, TokenEvent

__all__ = ["Engine", "Replicas", "make_engine", "Request", "TokenEvent", "RequestOutput", "Choice", "resolve_dtype"]
