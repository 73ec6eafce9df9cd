"""Serving many tenants' prefixes from one frozen model: OpenAI-compatible API, dynamic mixed batches.

    from prefixtune.serve import create_app, ServeSettings, KeyRing
    app = create_app(model, tokenizer, ServeSettings(store_dir="store"), KeyRing([("key1", "alice")]))

See docs/serving.md.
"""
from .app import create_app
from .batcher import Batcher, Job
from .errors import QueueFull, ServeError
from .server import BackgroundServer, serve
from .settings import ServeSettings
from .store import PrefixStore
from .tenants import KeyRing, tenant_dir_name, valid_name

__all__ = ["create_app", "serve", "BackgroundServer", "ServeSettings", "KeyRing", "PrefixStore", "ServeError",
           "Batcher", "Job", "QueueFull", "tenant_dir_name", "valid_name"]
