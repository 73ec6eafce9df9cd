"""`serve` and `experiment`: the long-running commands (a server, a study)."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer

from ..models import DEFAULT_MODEL
from ..serve.settings import MiB, ServeSettings
from .app import DATA_HELP, _device_option, _fail, app

# Option defaults come from the settings themselves, so a default changes in one place.
SERVE = {f.name: f.default for f in fields(ServeSettings)}


@app.command()
def serve(
    model: str = typer.Option(DEFAULT_MODEL, help="embedded name, local dir, .gguf file or hub id"),
    store: Path = typer.Option(Path("prefix-store"), help="directory of the tenants' prefixes (kept across restarts)"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000),
    keys_file: Optional[Path] = typer.Option(None, help="API keys: JSON {key: tenant} or 'key:tenant' lines "
                                                         "(also $PREFIXTUNE_API_KEYS='key:tenant,...')"),
    max_batch_size: int = typer.Option(SERVE["max_batch_size"], help="rows per decoding step (a beam request takes one per beam)"),
    max_batch_tokens: int = typer.Option(SERVE["max_batch_tokens"], help="prompt tokens prefilled in one step (bounds one step)"),
    max_queue: int = typer.Option(SERVE["max_queue"], help="engine rows waiting to be decoded (a beam search is num_beams rows); beyond that: 429"),
    request_timeout: float = typer.Option(SERVE["request_timeout_s"], help="seconds a completion may wait and decode; then 503"),
    max_upload_mb: float = typer.Option(SERVE["max_upload_bytes"] / MiB, help="largest prefix upload"),
    max_prefixes: int = typer.Option(SERVE["max_prefixes_per_tenant"], help="prefixes per tenant"),
    tenant_quota_mb: float = typer.Option(SERVE["max_bytes_per_tenant"] / MiB, help="bytes of prefixes per tenant"),
    max_resident_prefixes: int = typer.Option(SERVE["max_resident_prefixes"] or 0,
                                              help="prefixes kept loaded (LRU); others load on demand. 0: no limit"),
    max_resident_mb: float = typer.Option(0.0, help="the same bound in MB of prefix tensors. 0: no limit"),
    max_tokens_limit: int = typer.Option(SERVE["max_tokens_limit"], help="largest max_tokens a request may ask for"),
    max_prompt_tokens: int = typer.Option(SERVE["max_prompt_tokens"], help="longest prompt, template included; longer: 400 unless the "
                                                    "request sends truncate_prompt_tokens"),
    body_timeout: float = typer.Option(SERVE["body_timeout_s"], help="seconds to receive a request body (upload or JSON); then 408"),
    dtype: str = typer.Option(SERVE["dtype"], help="engine compute dtype: auto (bf16 where the CPU has it) | bf16 | fp32"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    replicas: Optional[int] = typer.Option(None, help="engines over one copy of the weights, stepped together on one "
                                                      "torch thread each (default: --threads, else 1); a replica "
                                                      "takes max_batch_size / replicas rows"),
    log_level: str = typer.Option("info"),
    device: str = _device_option(),
    engine: str = typer.Option("prefixtune", help="prefixtune | vllm (vLLM's OpenAI server with prefixtune's "
                                                 "connector; needs vLLM: `make vllm`)"),
    tensor_parallel_size: int = typer.Option(1, help="vllm: GPUs per model replica"),
    vllm_args: str = typer.Option("", help='vllm: more `vllm serve` arguments, e.g. "--max-model-len 4096"'),
):
    """Serve many tenants' prefixes from one frozen model: OpenAI-compatible /v1/completions (model = prefix)."""
    if engine == "vllm":
        from ..vllm.launcher import run as run_vllm

        try:
            run_vllm(model, store, host=host, port=port, keys_file=keys_file,
                     tensor_parallel_size=tensor_parallel_size, extra_args=vllm_args)
        except (ValueError, FileNotFoundError) as e:
            _fail(str(e))
        return
    if engine != "prefixtune":
        _fail(f"unknown engine {engine!r}: prefixtune | vllm")
    from ..serve import serve as run_server

    try:
        run_server(model, store, host=host, port=port, keys_file=keys_file, threads=threads, log_level=log_level,
                   device=device,
                   max_batch_size=max_batch_size,
                   max_batch_tokens=max_batch_tokens, max_queue=max_queue,
                   request_timeout_s=request_timeout, max_upload_bytes=int(max_upload_mb * MiB),
                   max_prefixes_per_tenant=max_prefixes, max_bytes_per_tenant=int(tenant_quota_mb * MiB),
                   max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens,
                   body_timeout_s=body_timeout, dtype=dtype, replicas=replicas,
                   max_resident_prefixes=max_resident_prefixes or None,
                   max_resident_bytes=int(max_resident_mb * MiB) or None)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


@app.command()
def experiment(
    name: str = typer.Argument(..., help="lowdata | prefix-length | init | ablation | extrapolation | main | "
                                         "table1 (the summary of the converged main studies; runs nothing) | "
                                         "personalization (one prefix per WebNLG category, trained in one job "
                                         "and served together; --scale tiny | cpu)"),
    task: Optional[str] = typer.Option(None, help="e2e | webnlg | dart | xsum (main: a comma list or all); "
                                                  "default: the study's"),
    scale: str = typer.Option("cpu", help="tiny (seconds) | cpu (about an hour here) | paper (the paper's settings)"),
    out: Optional[Path] = typer.Option(None, help="default: reports/NAME"),
    model: Optional[str] = typer.Option(None, help="default: smollm2-135m (cpu), the paper's model (paper)"),
    data_dir: Optional[str] = typer.Option(None, help=DATA_HELP),
    report_only: bool = typer.Option(False, "--report-only",
                                     help="rewrite report.md and figures from finished cells; run nothing"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (1 is fastest on a busy 2-core machine)"),
    epochs: Optional[float] = typer.Option(None, help="epoch limit of the final runs instead of the scale's "
                                                      "(learning-rate sweep runs are step-bounded and unchanged)"),
    reuse_from: Optional[Path] = typer.Option(None, help="another study directory: its finished cells with the "
                                                         "same ids are copied in, not run again (e.g. its sweep)"),
    rates_from: Optional[Path] = typer.Option(None, help="another study directory: every configuration trains at "
                                                         "the rate its sweep chose there, with no sweep here"),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS",
                                      help="run every cell as a Ray task (needs `pip install 'prefixtune[ray]'`): "
                                           "local (start Ray on this machine), auto (the cluster this machine "
                                           "joined) or HOST:6379 / ray://HOST:10001; --threads: CPUs per cell"),
):
    """Run a study (resuming finished cells from OUT/cells.jsonl) and write OUT/report.md with PNG figures."""
    from ..experiments import run_experiment
    from ..experiments.ray_runner import CellDied

    if threads is not None and threads < 1:  # else torch's RuntimeError, as a traceback
        _fail(f"--threads must be >= 1, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if name == "table1":  # it reads the main studies' reports as they are: a study's options change nothing
        given = [flag for flag, value in (("--task", task), ("--model", model), ("--data-dir", data_dir),
                                          ("--epochs", epochs), ("--reuse-from", reuse_from),
                                          ("--rates-from", rates_from), ("--ray", ray)) if value is not None]
        if scale != "cpu":
            given.insert(0, "--scale")
        if given:
            _fail(f"table1 summarises the converged main studies' reports and runs nothing: {', '.join(given)} "
                  f"do not apply (regenerate a study with its own command, then table1)")
    if name == "personalization":  # one study of its own (WebNLG categories as users), not a grid of cells
        given = [flag for flag, value in (("--task", task), ("--epochs", epochs), ("--reuse-from", reuse_from),
                                          ("--rates-from", rates_from), ("--ray", ray)) if value is not None]
        if given:
            _fail(f"personalization takes --scale, --out, --model, --data-dir, --threads and --report-only: "
                  f"{', '.join(given)} do not apply (its users are WebNLG's categories; its stages resume from "
                  f"OUT/results.json)")
    try:
        if name == "table1":
            from ..experiments.table1 import write_summary

            typer.echo(json.dumps(write_summary(out or Path("reports/table1"))))
            return
        if name == "personalization":
            from ..experiments import personalization

            typer.echo(json.dumps(personalization.run(scale, out, model, data_dir, threads=threads or 1,
                                                      report_only=report_only)))
            return
        result = run_experiment(name, task, scale, out, model, data_dir, report_only=report_only, epochs=epochs,
                                reuse_from=reuse_from, rates_from=rates_from, ray=ray or False, threads=threads or 1)
    except (ValueError, FileNotFoundError, RuntimeError, CellDied) as e:
        _fail(str(e))
    typer.echo(json.dumps(result))
