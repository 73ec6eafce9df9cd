"""The benchmark scripts' own logic (no timing: what they compare, and how they refuse bad arguments)."""
from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def test_train_throughput_peft_takes_as_many_steps_as_ours():
    # the trainer goes on into a second epoch for --steps; PEFT's loop stopped after one (25 of 30 steps at the
    # defaults: 200 rows, batch 8), so its dev loss was compared after fewer steps
    from train_throughput import peft_batches

    batches = peft_batches(200, 8, 30, seed=1)
    assert len(batches) == 30 and all(len(b) == 8 for b in batches)
    assert sorted(i for b in batches[:25] for i in b) == list(range(200))  # the first epoch: every row once
    assert batches[25:] != batches[:5]  # a new shuffle for the next epoch
    assert len(peft_batches(200, 8, 3, seed=1)) == 3
