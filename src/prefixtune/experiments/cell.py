"""A study's cells and scales. A *cell* is one training run and its evaluations; its id is a hash of
everything that decides its numbers, so a re-run finds finished cells and a changed setting re-runs
only the cells it affects. Ids must never change for a cell whose numbers do not: committed reports
and resumed studies find their cells by id (tests/test_report_ids.py).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

# TrainConfig fields added after reports were committed: at these values they are left out of a cell's id,
# so every id computed before they existed stays the same.
ID_NEUTRAL_DEFAULTS = {"early_stop_patience": 0,
                       # the user's own data (issue 22): studies train on their task
                       "data": None, "dev_data": None, "dev_fraction": 0.1, "source_field": None, "target_field": None,
                       "user_field": None}


@dataclass(frozen=True)
class Scale:
    """How big a study runs. `cpu` fits about an hour on a 2-core CPU; `paper` follows the paper."""

    name: str
    max_steps: int | None = None         # None: train `epochs` epochs
    epochs: float = 5.0
    batch_size: int = 8
    train_size: int | None = None        # pairs sampled for studies that are not about data size (None: all)
    dev_size: int = 50
    eval_every: int = 0                  # dev loss every N steps (0: only at the end)
    test_size: int | None = 50           # test inputs per evaluation (None: the whole split)
    beams: int = 1
    max_new_tokens: int = 64
    length_penalty: float = 1.0
    full_metrics: bool = True            # the official-equal suite (else sacreBLEU / ROUGE only)
    precision: str = "auto"
    samples: int = 1                     # data samples per (size, config)
    seeds: tuple = (1,)                  # training seeds per sample
    decode_batch: int = 16
    decode_dtype: str = "model"          # the engine's dtype for test decoding (DecodingConfig.dtype); "bf16" is
                                         # about 3x faster than fp32 here, and its rows are batch-invariant
    max_source_len: int = 256
    max_target_len: int = 128
    lr: dict = field(default_factory=dict)      # method -> learning rate (absent: the method's default)
    early_stop_patience: int = 0                # stop a cell after N dev evaluations without a new best
    lr_sweep: dict = field(default_factory=dict)  # method -> rates tried on one sample; the best dev loss wins
    sweep_max_steps: int | None = None          # sweep cells' budget (None: the full one, and they decode)
    sweep_size: int | None = None                # sweep at this training size only; its rate serves every size
    save_every: int = 0                          # checkpoint a cell every N steps (a killed cell resumes there)
    final_epochs: float | None = None            # `--epochs`: the final cells' epoch limit (step-bounded sweeps keep theirs)
    rates_from: str | None = None                # `--rates-from`: the study whose sweep chose every cell's rate
    beam_subset: dict = field(default_factory=dict)  # a second test evaluation, e.g. {"beams": 5, "test_size": 500}
    extra: dict = field(default_factory=dict)   # TrainConfig overrides for every cell (e.g. mlp_dim)

    def describe(self) -> dict:
        """The settings as a report shows them."""
        d = asdict(self)
        if self.max_steps is not None:
            d.pop("epochs")
        else:
            d.pop("max_steps")
        d["train_size"] = "per cell" if self.train_size is None else self.train_size
        d["test_size"] = "whole split" if self.test_size is None else self.test_size
        d["decoding"] = "greedy" if self.beams == 1 else f"beam {self.beams}"
        d.pop("beams")
        if self.decode_dtype == "model":  # as in the id: the reports of cells decoded in the model's dtype stand
            d.pop("decode_dtype")
        d["seeds"] = ", ".join(map(str, self.seeds))
        d["lr"] = ", ".join(f"{m} {v:g}" for m, v in self.lr.items()) or "each method's default"
        if self.rates_from:
            d["lr"] = f"each configuration's rate as chosen on dev loss by the sweep of {self.rates_from} (no sweep here)"
        elif self.lr_sweep:
            d["lr"] = "chosen on dev loss (see the learning-rate table)"
            d["lr_sweep"] = "; ".join(f"{m}: {', '.join(f'{r:g}' for r in rs)}" for m, rs in self.lr_sweep.items())
            d["sweep_max_steps"] = self.sweep_max_steps or "the full budget (sweep cells are the first sample's cells)"
            d["sweep_size"] = self.sweep_size or "each training size"
        else:
            for k in ("lr_sweep", "sweep_max_steps", "sweep_size"):
                d.pop(k)
        if not self.early_stop_patience:
            d.pop("early_stop_patience")
        d.pop("save_every")
        d.pop("rates_from")  # `lr` says it
        if self.beam_subset:
            d["beam_subset"] = (f"also beam {self.beam_subset['beams']} on a fixed subset of "
                                f"{self.beam_subset['test_size']} test inputs (drawn with seed 0)")
        else:
            d.pop("beam_subset")
        if self.final_epochs is None:
            d.pop("final_epochs")
        else:
            d["epochs"] = self.final_epochs
            d["final_epochs"] = "set by --epochs for every final run (sweep runs are step-bounded)"
        d["extra"] = ", ".join(f"{k}={v}" for k, v in self.extra.items()) or "–"
        return d


@dataclass
class Cell:
    study: str
    task: str
    method: str
    label: str                                   # how the report names its configuration, e.g. "EMB-10"
    train_size: int | None
    sample: int
    seed: int
    params: dict = field(default_factory=dict)   # TrainConfig overrides: prefix_len, init, lr, adapter_budget, ...
    train_options: dict = field(default_factory=dict)       # loader options of train/dev
    evals: dict = field(default_factory=lambda: {"test": {}})  # evaluation name -> loader options of its test split
    tags: dict = field(default_factory=dict)     # what the report groups by (not part of the id beyond `config`)

    def config(self, scale: Scale, model_name: str) -> dict:
        """Every value that decides this cell's numbers (the id is a hash of it)."""
        train = asdict(self.train_config(scale, model_name, "."))
        for k in ("output_dir", "data_dir", "export", "save_every", "device", "report_to"):  # where, not what: not in the id
            train.pop(k, None)
        for k, default in ID_NEUTRAL_DEFAULTS.items():  # settings added later leave older ids (and reports) valid
            if train.get(k) == default:
                train.pop(k)
        return {"study": self.study, "task": self.task, "method": self.method, "label": self.label,
                "train_size": self.train_size, "sample": self.sample, "seed": self.seed,
                "train_options": self.train_options, "evals": self.evals, "train": train,
                "test_size": scale.test_size, "dev_size": scale.dev_size,
                "decoding": {"beams": scale.beams, "max_new_tokens": scale.max_new_tokens,
                             "length_penalty": scale.length_penalty, "greedy": scale.beams == 1,
                             # only when set: the cells decoded in the model's dtype keep their ids
                             **({"dtype": scale.decode_dtype} if scale.decode_dtype != "model" else {})},
                "full_metrics": scale.full_metrics, "tags": self.tags}

    def train_config(self, scale: Scale, model_name: str, output_dir: str):
        from ..train import TrainConfig

        values = dict(output_dir=output_dir, model=model_name, task=self.task, task_options=self.train_options,
                      seed=self.seed, method=self.method, batch_size=scale.batch_size, max_steps=scale.max_steps,
                      epochs=scale.epochs, eval_every=scale.eval_every, dev_size=scale.dev_size,
                      save_every=scale.save_every,
                      early_stop_patience=scale.early_stop_patience,
                      precision=scale.precision, max_source_len=scale.max_source_len,
                      max_target_len=scale.max_target_len, lr=scale.lr.get(self.method), export=False)
        values.update(scale.extra)
        values.update(self.params)
        return TrainConfig(**values)

    def id(self, scale: Scale, model_name: str) -> str:
        blob = json.dumps(self.config(scale, model_name), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:10]
