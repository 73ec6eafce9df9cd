"""bf16 against fp32 decoding, on quality: a trained prefix decodes the whole E2E test set greedily
through the engine in fp32 and in bf16 (weights and KV); both are scored with the same metrics.
Issue 13 allows bf16 (the CLI's and the server's default on CPUs with AVX512-BF16) a BLEU drop of
at most 0.3 against fp32.

    prefixtune train -o runs/e2e-dtype --task e2e --train-size 2000 --init 'words:table-to-text:' --max-steps 300
    python benchmarks/decode_dtype_quality.py --prefix runs/e2e-dtype/prefix.safetensors [--limit N] [--json]

Keys of `--json`: `bleu_fp32`, `bleu_bf16`, `bleu_drop_bf16` (fp32 - bf16), `rows_identical`
(outputs equal as text), and each side's decoding seconds and full metrics.
"""
from __future__ import annotations

import json
import time

import torch

from common import at_least, benchmark_parser


def main():
    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--prefix", required=True, help="a trained E2E prefix file")
    parser.add_argument("--limit", type=at_least(1), default=None, help="only the first N test MRs (default: all)")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=64)
    parser.add_argument("--batch-size", type=at_least(1), default=32)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from prefixtune.bank import PrefixBank
    from prefixtune.data import load_task
    from prefixtune.evaluate import score_records
    from prefixtune.generation import DecodingConfig
    from prefixtune.models import load_base_model

    records = load_task("e2e", "test", args.data_dir)[: args.limit]
    model, tokenizer = load_base_model(args.model)
    bank = PrefixBank(model, tokenizer)
    bank.add("e2e", args.prefix)
    result = {"model": args.model, "prefix": str(args.prefix), "test_mrs": len(records),
              "threads": torch.get_num_threads()}
    outputs = {}
    for dtype in ("fp32", "bf16"):
        config = DecodingConfig(max_new_tokens=args.max_new_tokens, dtype=dtype)
        start = time.perf_counter()
        outputs[dtype] = bank.generate([r.source for r in records], "e2e", config, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        scores = score_records("e2e", outputs[dtype], records, full=True)
        result[f"decode_s_{dtype}"] = round(seconds, 1)
        result[f"metrics_{dtype}"] = {k: round(v, 4) for k, v in scores.items() if isinstance(v, (int, float))}
        result[f"bleu_{dtype}"] = round(scores.get("BLEU", scores["sacreBLEU"]), 2)
        print(f"{dtype}: BLEU {result[f'bleu_{dtype}']:.2f}  ({seconds:.0f} s)", flush=True)
    result["bleu_drop_bf16"] = round(result["bleu_fp32"] - result["bleu_bf16"], 2)
    result["rows_identical"] = sum(a == b for a, b in zip(outputs["fp32"], outputs["bf16"]))
    print(f"bf16 - fp32 BLEU: {-result['bleu_drop_bf16']:+.2f} (limit: a drop of 0.3); "
          f"{result['rows_identical']}/{len(records)} outputs identical")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
