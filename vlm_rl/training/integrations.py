"""Sample generations: a table on the console and, with their images, in the `report_to` integrations that show
tables: wandb and trackio (optional extras), logged the way TRL's GRPOTrainer logs its completions. The metrics reach
every integration through transformers' own callbacks; this module adds only the table."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from PIL import Image
from transformers.integrations import is_trackio_available, is_wandb_available

from vlm_rl.data.formats import prompt_text
from vlm_rl.training import console

TABLE = "samples"  # the table's key in the run


@dataclass
class LoggedSample:
    """One sample generation as logged: the prompt's text and images, the completion, the combined score and each
    reward's score (None where it could not score)."""

    prompt: str
    images: list[Image.Image]
    completion: str
    score: float | None
    rewards: dict[str, float | None]


def table_loggers(report_to: list[str]) -> list[ModuleType]:
    """The integrations among `report_to` that show tables (the wandb and trackio modules) with a run open here;
    none on processes other than the main one, where their callbacks open no run."""
    loggers = []
    if "wandb" in report_to and is_wandb_available():
        import wandb

        if wandb.run is not None:
            loggers.append(wandb)
    if "trackio" in report_to and is_trackio_available():
        import trackio

        if trackio.context_vars.current_run.get() is not None:
            loggers.append(trackio)
    return loggers


def one_picture(images: list[Image.Image]) -> Image.Image | None:
    """A sample's images side by side (a wandb table cell holds one image); None without images."""
    if len(images) <= 1:
        return images[0] if images else None
    picture = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    x = 0
    for image in images:
        picture.paste(image.convert("RGB"), (x, 0))
        x += image.width
    return picture


def log_samples(report_to: list[str], step: int, samples: list[LoggedSample]) -> None:
    """The table `samples` of iteration `step` (columns: iteration, prompt, image, completion, score, then
    score/<reward> for each reward) in every integration of `report_to` that shows tables and has a run open."""
    loggers = table_loggers(report_to)
    if not loggers or not samples:
        return
    columns = ["iteration", "prompt", "image", "completion", "score", *(f"score/{name}" for name in samples[0].rewards)]
    for logger in loggers:
        rows = []
        for s in samples:
            picture = one_picture(s.images)
            image = None if picture is None else logger.Image(picture)
            rows.append([step, s.prompt, image, s.completion, s.score, *s.rewards.values()])
        # train/global_step: transformers' callbacks plot every key against it, the table at this iteration
        logger.log({TABLE: logger.Table(columns=columns, data=rows), "train/global_step": step})


def show_samples(report_to: list[str], step: int, samples: list[dict], old: dict) -> None:
    """`samples` (the batch's first ones) of iteration `step` with their completions and scores (`old`: the
    iteration's scored rollout) as a table on the console and in the wandb/trackio runs of `report_to`. A sample
    the rewards could not score has no score."""
    scores = [None if unscored else score for score, unscored in zip(old["scores"].tolist(), old["unscored"].tolist())]
    shown = [
        LoggedSample(prompt_text(s["prompt"]), s["images"], completion, score, {k: v[i] for k, v in old["reward_columns"].items()})
        for i, (s, completion, score) in enumerate(zip(samples, old["completions"], scores))
    ]
    console.write(console.samples_table(step, [(s.prompt, s.completion, s.score) for s in shown]))
    log_samples(report_to, step, shown)
