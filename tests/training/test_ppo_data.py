"""`vlm-rl ppo` on data as people keep it: OpenAI image parts reach the policy's forwards; bad rows are skipped and
named when asked; the rewards' columns and servers are checked before any model loads."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from cli_helpers import stops_early
from vlm_rl.ppo import build_trainer
from vlm_rl.training.config import PPOConfig

FIXTURES = Path(__file__).parents[1] / "data" / "fixtures" / "formats"


def openai_rows(tmp_path: Path, n: int, bad_at: tuple[int, ...] = ()) -> Path:
    """`n` rows of the OpenAI fixture (0-based `bad_at` ones naming an image that does not exist) in tmp_path."""
    shutil.copytree(FIXTURES / "imgs", tmp_path / "imgs", dirs_exist_ok=True)
    row = json.loads((FIXTURES / "openai.jsonl").read_text())
    bad = copy.deepcopy(row)
    bad["messages"][0]["content"][0]["image_url"]["url"] = "imgs/missing.png"
    rows = [copy.deepcopy(bad if i in bad_at else row) for i in range(n)]
    for i, r in enumerate(rows):  # distinct prompts: rows with one prompt would share its encoding (share_prompts)
        r["messages"][0]["content"][1]["text"] += f" ({i})"
    path = tmp_path / "openai.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_ppo(tmp_path: Path, model_dir: Path, data: Path, **overrides) -> PPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"), model_name_or_path=str(model_dir), train_data=str(data), use_cpu=True,
        report_to="none", seed=0, max_new_tokens=2, per_device_train_batch_size=2, gradient_accumulation_steps=1,
        num_ppo_epochs=1, total_episodes=2, disable_tqdm=True, reuse_vision_features=False,
    )
    return PPOConfig(**{**settings, **overrides})


def test_openai_images_reach_the_policy_and_bad_rows_are_skipped_and_named(tiny_model_dir, tmp_path, capsys):
    data = openai_rows(tmp_path, 10, bad_at=(4,))
    trainer = build_trainer(tiny_ppo(tmp_path, tiny_model_dir, data, skip_bad_rows=True))
    seen = []  # what the policy's backbone and vision tower receive in one PPO iteration

    def backbone(module, args, kwargs):
        if kwargs.get("cache") is not None:  # generate: the prefill brings the rollout's encoded images
            if kwargs["input_ids"].shape[1] > 1:
                seen.append(("generate", kwargs.get("mm_encoder_outputs") is not None))
        else:  # the scoring and training forwards over prompt + response
            pixels, grid = kwargs.get("pixel_values"), kwargs.get("image_grid_thw")
            seen.append(("forward", None if pixels is None else tuple(pixels.shape), None if grid is None else grid.tolist()))

    def tower(module, args, kwargs):
        seen.append(("tower", tuple(args[0].shape), kwargs["grid_thw"].tolist()))

    policy = trainer.model.policy if hasattr(trainer.model, "policy") else trainer.model
    handles = [policy.model.register_forward_pre_hook(backbone, with_kwargs=True),
               policy.model.visual.register_forward_pre_hook(tower, with_kwargs=True)]
    try:
        trainer.train()
    finally:
        for h in handles:
            h.remove()
    # The 56x56 picture is a 4x4 grid of 14-px patches (16 rows of 3*2*14*14 values), for both prompts of the batch.
    grid, patches = [[1, 4, 4], [1, 4, 4]], (2 * 16, 1176)
    assert ("generate", True) in seen
    assert [s for s in seen if s[0] == "forward"] == [("forward", patches, grid)] * 2  # scoring, then the PPO step
    assert [s for s in seen if s[0] == "tower"] == [("tower", patches, grid)] * 3  # rollout, scoring, PPO step
    assert trainer.state.global_step == 1

    assert "--skip_bad_rows: skipped 1 of 10 rows" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "skipped_rows.jsonl").read_text().splitlines()]
    assert record["file"] == str(data) and record["line"] == 5 and record["source"] == f"{data}:5"
    assert "field 'messages[0].content[0]'" in record["reason"] and "missing.png does not exist" in record["reason"]
    assert len(trainer.train_dataset) == 9 and f"{data}:5" not in [r["_source"] for r in trainer.train_dataset.rows]


def test_too_many_bad_rows_stop_the_run_before_the_policy_loads(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = openai_rows(tmp_path, 10, bad_at=(1, 4))
    monkeypatch.setattr("vlm_rl.ppo.load_policy_and_reference", lambda config: pytest.fail("the policy was loaded"))
    err = stops_early(capsys, ["ppo", "--model_name_or_path", str(tiny_model_dir), "--train_data", str(data), "--skip_bad_rows",
                               "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--report_to", "none"])
    assert "--skip_bad_rows: 2 of 10 rows are bad, more than max_bad_row_fraction=0.1 allows" in err
    assert f"{data}:2: field 'messages[0].content[0]'" in err and f"{data}:5: field" in err
    assert not (tmp_path / "run" / "skipped_rows.jsonl").exists()


def test_without_the_flag_one_bad_row_stops_the_run_listing_it(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = openai_rows(tmp_path, 10, bad_at=(4,))
    monkeypatch.setattr("vlm_rl.ppo.load_policy_and_reference", lambda config: pytest.fail("the policy was loaded"))
    err = stops_early(capsys, ["ppo", "--model_name_or_path", str(tiny_model_dir), "--train_data", str(data),
                               "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--report_to", "none"])
    assert f"{data}:5: field 'messages[0].content[0]': image file" in err


def test_a_reward_server_that_is_down_stops_the_run_before_the_policy_loads(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr("vlm_rl.ppo.load_policy_and_reference", lambda config: pytest.fail("the policy was loaded"))
    err = stops_early(capsys, ["ppo", "--model_name_or_path", str(tiny_model_dir), "--train_data", str(openai_rows(tmp_path, 2)),
                               "--reward", url, "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--report_to", "none"])
    assert f"reward server {url} is unreachable" in err
