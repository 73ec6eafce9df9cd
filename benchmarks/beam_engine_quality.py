"""Beam search on the engine against the loop it replaces: a trained E2E prefix decodes the E2E test
MRs at beam 5 through `PrefixBank.generate` (the engine: beam groups as rows, continuous batching) and
through `generation.decode`'s batched loop (length-sorted batches, as `PrefixBank.generate` decoded beam
search before), both in fp32; outputs are compared text for text and both are scored.

    prefixtune train -o runs/e2e-beam --task e2e --train-size 2000 --max-steps 80 --lr 1e-3
    python benchmarks/beam_engine_quality.py --prefix runs/e2e-beam/prefix.safetensors [--limit N] [--json]

On two cores the sides can run at once: `--sides engine --outputs-dir D` in one process and `--sides loop
--outputs-dir D` in another; a side not decoded in a run is read from D when it is there.

Keys of `--json`: `rows_equal` (outputs equal as text) of `test_mrs`, `bleu_engine`, `bleu_loop`,
`bleu_difference` (engine - loop), each side's decoding seconds and full metrics; with `--bf16`, also
the engine in bf16 (`bleu_engine_bf16`, `rows_equal_bf16` against the fp32 loop).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from common import benchmark_parser


def loop_outputs(bank, sources: list[str], config, batch_size: int) -> list[str]:
    """`generation.decode` in length-sorted batches, as `PrefixBank.generate` decoded beam search before."""
    encoded = [bank.encode(s, "e2e") for s in sources]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        for i, ids in zip(rows, bank.generate_ids([encoded[i] for i in rows], ["e2e"] * len(rows), config)):
            out[i] = bank.tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0].strip()
    return out


def main():
    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--prefix", required=True, help="a trained E2E prefix file")
    parser.add_argument("--limit", type=int, default=None, help="only N test MRs (default: all 630)")
    parser.add_argument("--offset", type=int, default=0, help="from this test MR on")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="inputs per batch of the loop (x beams rows)")
    parser.add_argument("--bf16", action="store_true", help="also decode on the engine in bf16")
    parser.add_argument("--sides", default="engine,loop", help="which sides to decode in this run")
    parser.add_argument("--outputs-dir", type=Path, default=None, help="save each side's outputs there; read "
                                                                      "the sides not decoded from there")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from prefixtune.bank import PrefixBank
    from prefixtune.data import load_task
    from prefixtune.evaluate import score_records
    from prefixtune.generation import DecodingConfig
    from prefixtune.models import load_base_model

    records = load_task("e2e", "test", args.data_dir)[args.offset:][: args.limit]
    sources = [r.source for r in records]
    model, tokenizer = load_base_model(args.model, dtype=torch.float32)
    bank = PrefixBank(model, tokenizer)
    bank.add("e2e", args.prefix)
    config = DecodingConfig(max_new_tokens=args.max_new_tokens, num_beams=args.beams, dtype="fp32")
    result = {"model": args.model, "prefix": str(args.prefix), "test_mrs": len(records), "offset": args.offset,
              "beams": args.beams,
              "threads": args.threads}
    sides = {"engine": lambda c: bank.generate(sources, "e2e", c, batch_size=args.batch_size),
             "loop": lambda c: loop_outputs(bank, sources, c, args.batch_size)}
    if args.bf16:
        sides["engine_bf16"] = lambda c: bank.generate(sources, "e2e", DecodingConfig(
            max_new_tokens=args.max_new_tokens, num_beams=args.beams, dtype="bf16"), batch_size=args.batch_size)
    outputs = {}
    for name, run in sides.items():
        saved = args.outputs_dir / f"{name}-{args.offset}-{len(records)}.json" if args.outputs_dir else None
        if name in args.sides.split(","):
            start = time.perf_counter()
            outputs[name] = run(config)
            seconds = time.perf_counter() - start
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps({"outputs": outputs[name], "seconds": seconds}))
        elif saved is not None and saved.is_file():
            data = json.loads(saved.read_text())
            outputs[name], seconds = data["outputs"], data["seconds"]
        else:
            continue
        scores = score_records("e2e", outputs[name], records, full=True)
        result[f"decode_s_{name}"] = round(seconds, 1)
        result[f"metrics_{name}"] = {k: round(v, 4) for k, v in scores.items() if isinstance(v, (int, float))}
        result[f"bleu_{name}"] = round(scores.get("BLEU", scores["sacreBLEU"]), 2)
        print(f"{name}: BLEU {result[f'bleu_{name}']:.2f}  ({seconds:.0f} s)", flush=True)
    if not {"engine", "loop"} <= set(outputs):
        return  # the other side is decoded elsewhere: compare when both are in --outputs-dir
    result["rows_equal"] = sum(a == b for a, b in zip(outputs["engine"], outputs["loop"]))
    result["bleu_difference"] = round(result["bleu_engine"] - result["bleu_loop"], 2)
    if "engine_bf16" in outputs:
        result["rows_equal_bf16"] = sum(a == b for a, b in zip(outputs["engine_bf16"], outputs["loop"]))
    result["differing"] = [{"mr": s, "engine": a, "loop": b}
                           for s, a, b in zip(sources, outputs["engine"], outputs["loop"]) if a != b][:10]
    print(f"engine = loop on {result['rows_equal']}/{len(records)} outputs; BLEU engine - loop: "
          f"{result['bleu_difference']:+.2f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
