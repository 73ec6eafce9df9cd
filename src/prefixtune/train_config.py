"""`TrainConfig`: every training option with its default, in one place (the CLI takes its defaults from here)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .models import DEFAULT_MODEL, learned_positions, model_name, model_spec
from .prefix import PrefixConfig
from .templates import check_template


@dataclass
class TrainConfig:
    output_dir: str = "runs/prefix"
    model: str = DEFAULT_MODEL
    task: str = "e2e"
    data_dir: str | None = None
    task_options: dict = field(default_factory=dict)
    train_size: int | None = None        # low-data: sample this many (source, target) pairs
    seed: int = 1
    method: str = "prefix"
    prefix_len: int = 10
    mlp_dim: int = 512
    prefix_dropout: float = 0.0
    init: str = "random"
    lr: float | None = None              # None: the method's default
    batch_size: int = 8
    max_steps: int | None = None         # None: run `epochs` epochs
    epochs: float = 5.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 50                 # dev loss every N steps (0: only at the end)
    early_stop_patience: int = 0         # stop after N dev evaluations without a new best (0: never)
    dev_size: int = 100                  # dev pairs used for the dev loss
    save_every: int = 50                 # checkpoint every N steps (0: only at the end)
    precision: str = "auto"              # auto (bf16 where the hardware has it) | bf16 | fp32
    gradient_checkpointing: bool = False
    template: str | None = None          # how the source is written before the target, e.g. "{source}\n"
    max_source_len: int = 256
    max_target_len: int = 128
    adapter_budget: float = 0.001        # adapter: a fraction of the base model's parameters (0.001 / 0.03)
    export: bool = True                  # write the trained artefact at the end (experiments skip it)
    device: str = "auto"                 # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    report_to: str = "none"              # accelerate trackers: tensorboard, wandb, mlflow, ... (comma list) | all | none
    # The user's own data (data/files.py): a file, dataset folder or hub id; when set, `task` does not apply.
    data: str | None = None
    dev_data: str | None = None          # its dev rows; without them, `dev_fraction` of `data` is held out by seed
    dev_fraction: float = 0.1
    source_field: str | None = None      # None: detected (source/target, input/output, prompt/completion, ...)
    target_field: str | None = None
    user_field: str | None = None        # one prefix per distinct value of this field (prefixtune.users)

    def __post_init__(self):  # refuse a bad option before loading anything (not a ZeroDivisionError later)
        for name in ("batch_size", "prefix_len", "max_source_len", "max_target_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "train_size"):  # None: unset; 0 or less would train nothing, or everything, silently
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "early_stop_patience", "dev_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.epochs < math.inf:  # inf: no step count (an OverflowError once the model loaded)
            raise ValueError(f"epochs must be > 0 and finite, got {self.epochs}")
        if self.lr is not None and not 0 < self.lr < math.inf:  # inf: every weight NaN after one step
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}")
        if not 0 <= self.grad_clip < math.inf:  # 0: no clipping; a negative norm flips every gradient (ascent)
            raise ValueError(f"grad_clip must be >= 0 and finite (0: no clipping), got {self.grad_clip}")
        if not 0 <= self.prefix_dropout < 1:
            raise ValueError(f"prefix_dropout must be in [0, 1), got {self.prefix_dropout}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if not 0 < self.adapter_budget < math.inf:  # inf was an OverflowError traceback, NaN a cryptic line
            raise ValueError(f"adapter_budget must be a fraction > 0 of the model's parameters, got "
                             f"{self.adapter_budget}")
        if self.template is not None:
            check_template(self.template)
        if not 0 <= self.dev_fraction < 1:
            raise ValueError(f"dev_fraction must be in [0, 1), got {self.dev_fraction}")

    def prefix_config(self) -> PrefixConfig:
        return PrefixConfig(prefix_len=self.prefix_len, mlp_dim=self.mlp_dim, reparam=self.method != "prefix-flat",
                            dropout=self.prefix_dropout, init=self.init)


def check_early_stopping(config: TrainConfig):
    """Early stopping needs dev losses while training: without them the option was ignored silently. Checked when a
    run starts, not in __post_init__: a saved run's config must still load to be exported or resumed."""
    if config.early_stop_patience and not (config.eval_every and config.dev_size):
        raise ValueError(f"early_stop_patience {config.early_stop_patience} needs a dev loss during training: "
                         f"eval_every >= 1 and dev_size >= 1 (got {config.eval_every} and {config.dev_size})")


# The options only some methods read: a prefix's dropout (on P, through the MLP or not: prefix, prefix-flat, infix)
# and its initialisation (those and embedding-only's virtual tokens). The others have no prefix to apply them to.
PREFIX_OPTIONS = {"prefix_dropout": ("prefix", "prefix-flat", "infix"),
                  "init": ("prefix", "prefix-flat", "infix", "embedding-only")}


def check_method_options(config: TrainConfig):
    """A prefix option set (away from its default) for a method without a prefix (finetune, finetune-top2,
    adapter) was accepted and ignored silently, and written in train_config.json as if it had applied. Checked
    when a run starts, as `check_early_stopping`: a saved run's config must still load to be exported or resumed."""
    defaults = TrainConfig.__dataclass_fields__
    for name, methods in PREFIX_OPTIONS.items():
        value = getattr(config, name)
        if value != defaults[name].default and config.method not in methods:
            raise ValueError(f"--{name.replace('_', '-')} ({name}={value!r}) applies to the methods "
                             f"{', '.join(methods)}; method {config.method!r} has no prefix to apply it to: leave it "
                             f"at its default ({defaults[name].default!r})")


# Methods whose k = prefix_len virtual tokens take positions 0..k-1 before x, in a decoder-only model; in an
# encoder-decoder model only embedding-only's (in front of the encoder input) do.
VIRTUAL_POSITIONS = {"decoder": ("prefix", "prefix-flat", "infix", "embedding-only"),
                     "encoder-decoder": ("embedding-only",)}


def check_positions(config: TrainConfig, model):
    """A model with a learned position table (GPT-2, OPT, BART) has no position past its last row: a training row
    of prefix + source + target beyond it was an IndexError from inside the forward, after the model loaded and
    the run started. Refused here, from the configured maximum lengths (what a row can reach whatever the data),
    naming the flags to lower. Models with computed positions (RoPE, T5's relative bias) have no such limit."""
    positions = learned_positions(model)
    if positions is None:
        return
    family, name = model_spec(model).family, model_name(model)
    virtual = config.prefix_len if config.method in VIRTUAL_POSITIONS[family] else 0
    if family == "decoder":  # one token stream: [virtual; source; target]
        parts = [("--max-source-len", config.max_source_len), ("--max-target-len", config.max_target_len)]
    else:  # the encoder reads [virtual; source], the decoder the target
        parts = [("--max-source-len", config.max_source_len)]
        if config.max_target_len > positions:
            raise ValueError(f"--max-target-len {config.max_target_len} exceeds the {positions} learned positions of "
                             f"{name}'s decoder (its position table): lower --max-target-len to at most "
                             f"{positions}")
    if virtual:
        parts.insert(0, ("--prefix-len", virtual))
    total = sum(n for _, n in parts)
    if total > positions:
        flags = [flag for flag, _ in parts]
        lower = flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} or {flags[-1]}"
        spelled = " + ".join(f"{flag} {n}" for flag, n in parts)
        raise ValueError(f"{spelled} = {total} positions a training row may take, but {name} has "
                         f"{positions} learned positions (its position table): lower {lower} so that "
                         f"{'they sum' if len(flags) > 1 else 'it comes'} to at most {positions}")
