"""Watching a run: accelerate's experiment trackers (`--report-to`) and a PNG of the loss curves.

The trackers are accelerate's own (TensorBoard, W&B, MLflow, ...): this module only checks that the
one asked for is installed (before any model loads), starts it, and says what to log at every dev
evaluation. The curve (`loss_curve.png` in the run directory) needs no tracker.

Keys logged at every evaluation: `train/loss` (mean over the steps since the previous evaluation),
`dev/loss`, `train/lr`, `train/tokens_per_s`. A many-users job (`UsersLog`) logs `train/loss/<user>` and
`dev/loss/<user>` at each of that user's evaluations, at the user's own step.
"""
from __future__ import annotations

import importlib
import io
import json
from pathlib import Path

from .atomic import atomic_write_bytes

CURVE_FILE = "loss_curve.png"
LOG_DIR = "logs"              # RUN_DIR/logs/<PROJECT>/: TensorBoard's event files (trackers that write locally)
PROJECT = "prefixtune"        # the W&B project / TensorBoard run folder

# --report-to NAME -> (modules of which one must import, the extra that installs them); accelerate's trackers
TRACKERS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "comet_ml": (("comet_ml",), "comet"),
    "aim": (("aim",), "aim"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
    "trackio": (("trackio",), "trackio"),
}
REPORT_TO_HELP = f"experiment trackers, comma-separated: {' | '.join(TRACKERS)} | all (every installed one) | none"


def _installed(name: str) -> bool:
    for module in TRACKERS[name][0]:
        try:
            importlib.import_module(module)
            return True
        except ImportError:
            continue
    return False


def check_trackers(report_to: str | None) -> list[str]:
    """The tracker names in `report_to` ("tensorboard,wandb", "all", "none"); ValueError for an unknown one or
    one that is not installed, naming the extra to install. Call it before loading a model."""
    names = [n.strip().lower() for n in (report_to or "").split(",") if n.strip().lower() not in ("", "none")]
    if not names:
        return []
    if names == ["all"]:  # HF Trainer's meaning: every tracker that is installed
        return [n for n in TRACKERS if _installed(n)]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker {', '.join(map(repr, unknown))} for --report-to; choose from "
                         f"{', '.join(TRACKERS)}, all or none")
    for name in dict.fromkeys(names):
        if not _installed(name):
            raise ValueError(f"--report-to {name}: {name} is not installed; install it with "
                             f"pip install 'prefixtune[{TRACKERS[name][1]}]'")
    return list(dict.fromkeys(names))


def _hparam(value):
    """TensorBoard's hparams take bool, str, int, float or None: anything else goes as JSON text."""
    return value if value is None or isinstance(value, (bool, str, int, float)) else json.dumps(value, default=str)


def log_user_dev_losses(accelerator, step: int, losses: dict[str, float]):
    """For a many-user trainer: each user's dev loss (`dev/loss/<user>`) to the run's trackers at `step`.
    A no-op without trackers; call it at every dev evaluation, on every process (accelerate logs on the main one)."""
    if accelerator.trackers and losses:
        accelerator.log({f"dev/loss/{user}": float(loss) for user, loss in losses.items()}, step=step)


class TrainingLog:
    """What `train` calls to be watched: the Accelerator's tracker arguments, one `step` call per optimiser step,
    and `finish` at the end. The curve is drawn from the run's history, which checkpoints keep; the train-loss mean
    is not checkpointed, so after a resume the first one covers the steps since the checkpoint."""

    def __init__(self, report_to: str | None, out_dir: str | Path, run_config: dict | None = None):
        self.trackers = check_trackers(report_to)  # before the model loads: a missing tracker fails in a second
        self.out_dir = Path(out_dir)
        self.run_config = run_config or {}
        self.started = False
        self.losses: list[float] = []

    def accelerator_kwargs(self) -> dict:
        if not self.trackers:
            return {}
        from accelerate.utils import ProjectConfiguration

        return {"log_with": self.trackers,
                "project_config": ProjectConfiguration(project_dir=str(self.out_dir),
                                                       logging_dir=str(self.out_dir / LOG_DIR))}

    def _start(self, accelerator):
        if self.trackers and not self.started:
            try:
                accelerator.init_trackers(PROJECT, {k: _hparam(v) for k, v in self.run_config.items()},
                                          init_kwargs={"wandb": {"name": self.out_dir.name},
                                                       "mlflow": {"run_name": self.out_dir.name}})
            except Exception as e:  # not logged in, no server: one line, not the tracker's traceback
                raise ValueError(f"--report-to {','.join(self.trackers)}: the tracker did not start: "
                                 f"{type(e).__name__}: {e}") from e
        self.started = True

    def step(self, accelerator, logs: dict, history: list[dict]):
        """After every optimiser step. At an evaluation (`dev_loss` in `logs`, whose copy is `history[-1]`) the
        mean train loss since the previous one goes into the history and, with the rest, to the trackers."""
        self._start(accelerator)
        self.losses.append(logs["loss"])
        if "dev_loss" not in logs:
            return
        train_loss = sum(self.losses) / len(self.losses)
        self.losses = []
        history[-1]["train_loss"] = train_loss
        values = {"train/loss": train_loss, "train/lr": logs["lr"], "train/tokens_per_s": logs["tokens_per_s"]}
        if logs["dev_loss"] is not None:
            values["dev/loss"] = logs["dev_loss"]
        if self.trackers:
            accelerator.log(values, step=logs["step"])
        if accelerator.is_main_process:
            write_loss_curve(history, None, self.out_dir / CURVE_FILE, title=self.out_dir.name)

    def finish(self, accelerator, history: list[dict], best_step: int | None) -> Path | None:
        """The final curve with the best step marked; the trackers closed (not `end_training`: that would also
        tear down the process group)."""
        path = None
        if accelerator.is_main_process:
            path = write_loss_curve(history, best_step, self.out_dir / CURVE_FILE, title=self.out_dir.name)
        if self.started:
            for tracker in accelerator.trackers:
                tracker.finish()
        return path


class UsersLog(TrainingLog):
    """What `train_users` calls to be watched. It trains without an Accelerator, so one is made for the trackers
    alone (none without a tracker: a job without one is as it was). No loss curve: one per user would be noise."""

    def __init__(self, report_to: str | None, out_dir: str | Path, run_config: dict | None = None):
        super().__init__(report_to, out_dir, run_config)
        self.accelerator = None

    def start(self, cpu: bool):
        if self.trackers:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=cpu, **self.accelerator_kwargs())
            self._start(self.accelerator)

    def evaluation(self, user: str, logs: dict):
        """At one user's dev evaluation (`logs`: their history entry): their mean train loss since the previous
        one and their dev loss, at their own step."""
        if self.accelerator is None:
            return
        if logs.get("train_loss") is not None:
            self.accelerator.log({f"train/loss/{user}": logs["train_loss"]}, step=logs["step"])
        if logs.get("dev_loss") is not None:
            log_user_dev_losses(self.accelerator, logs["step"], {user: logs["dev_loss"]})

    def close(self):
        if self.accelerator is not None:
            for tracker in self.accelerator.trackers:
                tracker.finish()


def write_loss_curve(history: list[dict], best_step: int | None, path: str | Path, title: str = "") -> Path | None:
    """A PNG of train and dev loss against steps from a run's evaluation history, the best step marked; None when
    the history is empty. Drawn on a bare `Figure` (Agg canvas): no pyplot, no global backend."""
    if not history:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [h["step"] for h in history]
    # runs recorded before the mean was kept have only the loss of the evaluation's own step
    ax.plot(steps, [h.get("train_loss", h.get("loss")) for h in history], marker=".", label="train loss")
    dev = [(h["step"], h["dev_loss"]) for h in history if h.get("dev_loss") is not None]
    if dev:
        ax.plot(*zip(*dev), marker="o", label="dev loss")
    best = dict(dev).get(best_step)
    if best is not None:
        ax.axvline(best_step, color="grey", linestyle="--", linewidth=1)
        ax.plot([best_step], [best], marker="*", markersize=14, color="C3", linestyle="none",
                label=f"best: step {best_step}, dev {best:.4f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
