"""Decoding throughput: prefixtune's batched decoder against PEFT prefix tuning's `generate`.

Same model, same inputs (E2E test MRs), same batches (sorted by length, left-padded), same
prefix length, greedy, exactly `--new-tokens` tokens per row (no early stop), interleaved
rounds (ours, PEFT, ours, PEFT, ...). Ours keeps the prefix and the source in the cache across
steps and drops finished rows; PEFT goes through transformers' `generate`.

    python benchmarks/decode_throughput.py [--inputs 32] [--batch-size 8] [--new-tokens 40] [--json]
"""
from __future__ import annotations

import json
import sys
import time

import torch

from common import at_least, benchmark_parser


def main():
    parser = benchmark_parser(__doc__)
    parser.add_argument("--inputs", type=at_least(1), default=32)
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--new-tokens", type=at_least(1), default=40)
    parser.add_argument("--prefix-len", type=at_least(1), default=10)
    parser.add_argument("--rounds", type=at_least(1), default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import PrefixTuningConfig, get_peft_model

    from prefixtune.bank import PrefixBank
    from prefixtune.data import load_task
    from prefixtune.generation import DecodingConfig, left_pad
    from prefixtune.prefix_file import ExportedPrefix
    from prefixtune.models import load_base_model, model_spec
    from prefixtune.prefix import PrefixConfig, build_prefix_encoder

    model, tokenizer = load_base_model(args.model)
    spec = model_spec(model)
    records = load_task("e2e", "test", args.data_dir)[: args.inputs]
    bank = PrefixBank(model, tokenizer)
    with torch.no_grad():
        p = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=args.prefix_len), seed=0)()
    bank.add("p", ExportedPrefix({g: t.detach() for g, t in p.items()},
                                 {"fingerprint": spec.fingerprint(), "train_config": "{}"}))
    sequences = sorted((bank.encode(r.source, "p") for r in records), key=len)
    batches = [sequences[i:i + args.batch_size] for i in range(0, len(sequences), args.batch_size)]
    config = DecodingConfig(max_new_tokens=args.new_tokens, stop_at_newline=False, ignore_eos=True)

    torch.manual_seed(0)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prefix_len,
                                                          prefix_projection=True, encoder_hidden_size=512))
    peft_model.eval()

    def ours():
        n = 0
        for batch in batches:
            out = bank.generate_ids(batch, ["p"] * len(batch), config)
            n += sum(len(o) for o in out)
        return n

    def peft():
        n = 0
        pad = tokenizer.pad_token_id
        for batch in batches:
            ids, mask = left_pad(batch, pad, model.device)
            with torch.no_grad():
                out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                          min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)
            n += (out.shape[1] - ids.shape[1]) * out.shape[0]
        return n

    # PEFT's wrapper patches the base model's forward only through its own object; ours uses the
    # bare model, so both can share it. A warm-up of each first.
    with peft_model.disable_adapter():
        pass
    ours(), peft()
    times = {"ours": [], "peft": []}
    tokens = {}
    for _ in range(args.rounds):
        for name, fn in (("ours", ours), ("peft", peft)):
            start = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - start)
            print(f"{name:5s} {tokens[name] / times[name][-1]:8.1f} tokens/s", file=sys.stderr)
    tps = {k: tokens[k] * len(v) / sum(v) for k, v in times.items()}
    print(f"\ndecode tokens/s (batch {args.batch_size}, {args.inputs} inputs, {args.new_tokens} new tokens each): "
          f"ours {tps['ours']:.1f}, PEFT generate {tps['peft']:.1f}, ratio {tps['ours'] / tps['peft']:.2f}x")
    out = {"decode_ratio_vs_peft": tps["ours"] / tps["peft"], "decode_tokens_per_s_ours": tps["ours"],
           "decode_tokens_per_s_peft": tps["peft"], "batch_size": args.batch_size, "inputs": args.inputs,
           "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
