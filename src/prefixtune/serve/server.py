"""Running the app: `serve` (the CLI's blocking server) and `BackgroundServer` (tests, benchmarks)."""
from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import contextmanager
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
    if limits.get("replicas") is None:  # one engine per torch thread: at a server's batches a step's small ops
        limits["replicas"] = threads or 1  # do not split over OpenMP threads, whole replicas do (engine.md)
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent():  # runs in the child between fork and exec
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def popen_tied_to_parent(command: list, **kwargs):
    """subprocess.Popen whose child gets SIGTERM when its parent dies, even by SIGKILL (Linux; elsewhere a plain
    Popen). A killed study or benchmark then leaves no server behind holding a port and gigabytes of memory."""
    import subprocess
    import sys

    return subprocess.Popen(command, preexec_fn=_die_with_parent if sys.platform == "linux" else None, **kwargs)


@contextmanager
def serve_process(args: list, env: dict, log_file: Path, timeout_s: float = 600.0):
    """`prefixtune serve ARGS` in a subprocess on 127.0.0.1 (a free `--port` is added), its output in
    `log_file`; yields (process, base URL) once /health answers 200, and stops it on exit (terminate, then
    kill), or when this process is killed. A process that exits first, or a server not up in `timeout_s`,
    raises RuntimeError with the tail of its output. For tests, benchmarks and studies that need a real server process."""
    import subprocess
    import sys

    import httpx

    port = free_port()
    command = [sys.executable, "-m", "prefixtune.cli", "serve", *map(str, args), "--port", str(port)]
    with open(log_file, "w") as out:
        proc = popen_tied_to_parent(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefixtune serve did not come up: {Path(log_file).read_text()[-2000:]}")
            time.sleep(0.3)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
