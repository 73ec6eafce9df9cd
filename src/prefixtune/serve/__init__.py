"""Serving many tenants' prefixes from one frozen model: OpenAI-compatible API, dynamic mixed batches.

    from prefixtune.serve import create_app, ServeSettings, KeyRing
    app = create_app(model, tokenizer, ServeSettings(store_dir="store"), KeyRing([("key1", "alice")]))

See docs/serving.md.
"""
from importlib import import_module

# Imported on first use (PEP 562): `prefixtune.serve.settings` stays light, so the CLI can read the
# server's defaults without loading FastAPI.
_WHERE = {"create_app": ".app", "Job": ".jobs", "QueueFull": ".errors",
          "ServeError": ".errors", "EngineWorker": ".engine_worker", "BackgroundServer": ".server", "serve": ".server", "ServeSettings": ".settings",
          "PrefixStore": ".store", "KeyRing": ".tenants", "tenant_dir_name": ".tenants", "valid_name": ".tenants"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_WHERE[name], __name__), name)
