"""What a person watching a PPO run reads: one aligned line per logged iteration with the metrics that matter,
and sample generations as a small table; every metric still goes to `report_to` and `trainer_state.json`."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

# (column title, metric, format): the few a person watches; the rest goes to the logging integrations.
COLUMNS = (
    ("iter", "step", "{:>5d}"),
    ("episode", "episode", "{:>8d}"),
    ("reward", "objective/scores", "{:>8.3f}"),
    ("kl", "objective/kl", "{:>7.3f}"),
    ("entropy", "objective/entropy", "{:>8.3f}"),
    ("len", "val/response_length", "{:>6.2f}"),
    ("clipfrac", "policy/clipfrac_avg", "{:>8.3f}"),
    ("v_loss", "loss/value_avg", "{:>8.4f}"),
    ("eps", "eps", "{:>6.1f}"),
    ("eval", "eval/scores", "{:>6.3f}"),
    ("eval_greedy", "eval/scores_greedy", "{:>11.3f}"),
)


def header() -> str:
    return "  ".join(f"{title:>{len(fmt.format(0))}}" for title, _, fmt in COLUMNS)


def metrics_line(logs: dict) -> str:
    """The watched metrics of one log entry, aligned under `header()`; blank where a metric is absent."""
    cells = []
    for _, name, fmt in COLUMNS:
        value = logs.get(name)
        width = len(fmt.format(0))
        cells.append(fmt.format(value) if isinstance(value, (int, float)) else " " * width)
    return "  ".join(cells)


def samples_table(step: int, rows: list[tuple[str, str, float | None]], width: int = 48) -> str:
    """Sample generations of iteration `step` as a table: prompt, completion, score (long texts cut with ...; no
    score where the rewards could not score the sample)."""
    cut = lambda text: (text if len(text) <= width else text[: width - 3] + "...").replace("\n", " ")  # noqa: E731
    lines = [f"  samples at iteration {step}:", f"  {'prompt':<{width}}  {'completion':<{width}}  {'score':>7}"]
    lines += [f"  {cut(p):<{width}}  {cut(c):<{width}}  {'' if s is None else format(s, '+.3f'):>7}" for p, c, s in rows]
    return "\n".join(lines)


def outputs_line(output_dir: str, callbacks: list[TrainerCallback]) -> str:
    """Where the run writes: `output_dir`, and the TensorBoard log directory where `report_to` has tensorboard (its
    callback names the directory when training begins)."""
    line = f"outputs in {output_dir} (checkpoint-N/, the final model, ppo_config.yaml, trainer_state.json)"
    tensorboard = next((cb for cb in callbacks if type(cb).__name__ == "TensorBoardCallback"), None)
    if tensorboard is not None and getattr(tensorboard, "logging_dir", None):
        logs = Path(tensorboard.logging_dir)
        line += f"; TensorBoard logs in {logs} (tensorboard --logdir {logs.parent})"
    return line


def write(text: str) -> None:
    """A line that does not tear the progress bar."""
    tqdm.write(text)


class RunLines:
    """Console callbacks' shared part: where the run writes and the header when training begins, then one aligned
    metrics line per log instead of the whole log dict. `callbacks`: the trainer's, read when training begins (after
    the integrations have set up)."""

    def __init__(self, callbacks: list[TrainerCallback], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.callbacks = callbacks

    def show(self, text: str) -> None:
        raise NotImplementedError

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if state.is_world_process_zero:
            self.show(outputs_line(args.output_dir, self.callbacks))
            self.show(header())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.show(metrics_line({"step": state.global_step, **logs}))


class MetricsLineCallback(RunLines, ProgressCallback):
    """The progress bar, with the run's lines written above it."""

    def show(self, text: str) -> None:
        write(text)


class MetricsLinePrinter(RunLines, PrinterCallback):
    """The run's lines without any progress bar (`disable_tqdm`): plain lines, for a log file or a pipe."""

    def show(self, text: str) -> None:
        print(text, flush=True)


def use_metrics_line(trainer) -> None:
    """Replace the Trainer's console callback (which prints every log dict whole) with the metrics line."""
    handler = trainer.callback_handler
    for old, new in ((ProgressCallback, MetricsLineCallback), (PrinterCallback, MetricsLinePrinter)):
        if any(type(cb) is old for cb in handler.callbacks):
            trainer.remove_callback(old)
            trainer.add_callback(new(handler.callbacks))
