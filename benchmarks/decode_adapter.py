"""The adapter baselines' decoding: the lean Llama step against the HF forward, on one model.

SmolLM2 with a bottleneck adapter after every attention and MLP output projection (the budget of
`--budget`, 0.001 = the paper's adapter-0.1%; up projections random, as after training, so the adapters
change the output), E2E test sources, beam 5 by default, interleaved rounds (lean, HF, lean, HF) per
dtype. Prints the HF path's CPU time over the lean step's (the lower of the rounds each) and how many
outputs the two paths share.

    python benchmarks/decode_adapter.py [--inputs 12] [--beams 5] [--new-tokens 40] [--threads 1] [--json]
"""
from __future__ import annotations

import json
import sys
import time

import torch

from common import at_least, benchmark_parser


def main():
    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--inputs", type=at_least(1), default=12)
    parser.add_argument("--beams", type=at_least(1), default=5)
    parser.add_argument("--new-tokens", type=at_least(1), default=40)
    parser.add_argument("--budget", type=at_least(0, float, exclusive=True), default=0.001)
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--rounds", type=at_least(1), default=2)
    args = parser.parse_args()
    from prefixtune.generation import DTYPES

    unknown = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}; choose from {','.join(DTYPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from prefixtune.bank import PrefixBank
    from prefixtune.data import load_task
    from prefixtune.engine.offline import EngineCache, decode_ids
    from prefixtune.generation import DecodingConfig
    from prefixtune.methods.adapter import Adapter, AdapterMethod
    from prefixtune.models import load_base_model, model_spec
    from prefixtune.train_config import TrainConfig

    model, tokenizer = load_base_model(args.model, dtype=torch.float32)
    method = AdapterMethod("adapter", model, tokenizer, model_spec(model), TrainConfig(adapter_budget=args.budget))
    torch.manual_seed(0)
    for module in method.trained.modules():
        if isinstance(module, Adapter):
            torch.nn.init.normal_(module.up.weight, std=0.02)
    adapted = method.trained.eval()
    bank = PrefixBank(model, tokenizer)
    sources = [bank.encode(r.source, None) for r in load_task("e2e", "test", args.data_dir)[: args.inputs]]

    out = {"inputs": args.inputs, "beams": args.beams, "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
           "adapter_width": method.width}
    for dtype in args.dtypes.split(","):
        config = DecodingConfig(max_new_tokens=args.new_tokens, num_beams=args.beams, dtype=dtype)
        cpu, outputs = {True: [], False: []}, {}
        for _ in range(args.rounds):
            for lean in (True, False):
                engines = EngineCache(adapted, tokenizer, lean)
                start = time.process_time()
                outputs[lean] = decode_ids(adapted, tokenizer, sources, [None] * len(sources), config, engines=engines)
                cpu[lean].append(time.process_time() - start)
                path = engines._engine.path
                print(f"{dtype} {path:10s} {cpu[lean][-1]:6.1f} CPU-s", file=sys.stderr)
        ratio = min(cpu[False]) / min(cpu[True])
        same = sum(a == b for a, b in zip(outputs[True], outputs[False]))
        print(f"{dtype}: the HF forward took {ratio:.2f}x the lean step's CPU time; {same} of {len(sources)} "
              f"outputs identical")
        out[f"hf_over_lean_cpu_{dtype}"] = ratio
        out[f"identical_outputs_{dtype}"] = same
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
