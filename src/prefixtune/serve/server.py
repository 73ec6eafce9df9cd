"""Running the app: `serve` (the CLI's blocking server) and `BackgroundServer` (tests, benchmarks)."""
from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

from .settings import ServeSettings
from .tenants import ENV_VAR, KeyRing

log = logging.getLogger("prefixtune.serve")


def serve(model: str, store: str | Path, host: str = "127.0.0.1", port: int = 8000,
          keys_file: str | Path | None = None, threads: int | None = None, log_level: str = "info",
          device: str = "auto", **limits):
    """Load the base model, the keys and the store, and serve until interrupted."""
    import torch
    import uvicorn

    from ..models import load_base_model
    from .app import create_app

    from ..models import resolve_device

    where = resolve_device(device)  # a wrong --device fails before the model loads
    keys = KeyRing.load(keys_file)
    if not len(keys):
        raise ValueError(f"no API keys: set ${ENV_VAR}='key:tenant,...' or pass --keys-file")
    settings = ServeSettings(store_dir=Path(store), **limits)
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the model in the engine's dtype, and only that copy: the engine decodes every request, beams included
    # (fp32 only where `--dtype fp32` asks for it)
    from ..engine import resolve_dtype

    dtype = resolve_dtype(settings.dtype, where)
    base, tokenizer = load_base_model(model, dtype=dtype, device=device)
    app = create_app(base, tokenizer, settings, keys)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class BackgroundServer:
    """uvicorn in a daemon thread on a free loopback port; a context manager that stops it by itself.

        with BackgroundServer(app) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", start_timeout: float = 60.0, log_level: str = "warning"):
        import uvicorn

        self.host, self.start_timeout = host, start_timeout
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5,
                                backlog=512)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="prefixtune-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0):
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
