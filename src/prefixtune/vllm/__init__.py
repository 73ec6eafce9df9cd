"""Serving prefixtune prefixes on vLLM, without a fork of vLLM: a KV connector plus an OpenAI front end.

    prefixtune serve --engine vllm --store prefix-store      # see docs/serving.md, "Scale out on vLLM"

* `protocol`   how a request names its prefix: P placeholder tokens, a cache salt, kv_transfer_params
* `connector`  PrefixtuneConnector, the vLLM v1 KV connector that writes a prefix's K/V into its slots
* `middleware` the OpenAI front end's tenants, prefix store and request rewriting (inside `vllm serve`)
* `launcher`   the `vllm serve` command line with all of the above configured

vLLM is optional (`make vllm` builds .venv-vllm: vLLM pins another transformers); only `connector`, `middleware` and
`launcher.run` import it.
"""
from .protocol import PARAMS_KEY, PLACEHOLDER_TOKEN_ID, PrefixRef, prompt_ids

CONNECTOR = "PrefixtuneConnector"
CONNECTOR_MODULE = "prefixtune.vllm.connector"


def kv_transfer_config(store, **extra) -> dict:
    """The `--kv-transfer-config` (or `LLM(kv_transfer_config=...)`) that enables the connector."""
    from pathlib import Path

    return {"kv_connector": CONNECTOR, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_consumer",
            "kv_load_failure_policy": "fail",
            "kv_connector_extra_config": {"store": str(Path(store).resolve()), **extra}}


def vllm_available() -> str | None:
    """None when vLLM can be imported, else why not (for skips and error messages)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything else
        return (f"vLLM is not importable ({type(e).__name__}: {e}): `make vllm` builds .venv-vllm with it "
                "(`make test-vllm` runs its tests)")
    return None


__all__ = ["CONNECTOR", "CONNECTOR_MODULE", "PARAMS_KEY", "PLACEHOLDER_TOKEN_ID", "PrefixRef", "kv_transfer_config",
           "prompt_ids", "vllm_available"]
