"""No warnings a user cannot act on: a short run prints none; the ones a user's own flags cause still come."""

from __future__ import annotations

import logging
import warnings

import pytest
from transformers.utils import logging as transformers_logging

from vlm_rl import quiet
from vlm_rl.cli import main as cli_main
from vlm_rl.sft import VLMSFTConfig


def test_a_short_lora_ppo_run_with_evaluation_and_samples_prints_no_warning(tmp_path, capfd, tiny_model_dir, synthetic_data_dir):
    argv = [
        "ppo", "--model_name_or_path", str(tiny_model_dir), "--train_data", str(synthetic_data_dir / "train.jsonl"),
        "--eval_data", str(synthetic_data_dir / "test.jsonl"), "--eval_num_samples", "4", "--output_dir", str(tmp_path / "run"),
        "--use_cpu", "true", "--use_peft", "true", "--total_episodes", "8", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--local_rollout_forward_batch_size", "8", "--max_new_tokens", "4",
        "--num_sample_generations", "2", "--report_to", "none",
    ]  # fmt: skip
    transformers_logging.enable_progress_bar()  # as in a fresh process (an earlier test may have turned them off)
    with warnings.catch_warnings(record=True) as caught:  # as a user's Python shows them, instead of pytest's summary
        quiet.silence()  # pytest dropped the filters vlm_rl installed on import when it collected the tests
        cli_main(argv)
    out, err = capfd.readouterr()
    assert "samples at iteration 1" in out and "PPO done: 1 iterations; policy, value head and processor in" in out
    assert [str(w.message) for w in caught] == []
    assert [line for line in (out + err).splitlines() if "warn" in line.lower()] == []
    # stdout is no terminal here: no progress bar at all, transformers' "Loading weights"/"Writing model shards" included
    assert "it/s]" not in out + err and "Loading weights" not in out + err and "Writing model shards" not in out + err


def test_deepspeed_notice_that_it_found_no_gpu_is_silenced(monkeypatch):
    real_accelerator = pytest.importorskip("deepspeed.accelerator.real_accelerator")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("DeepSpeed").addHandler(handler)
    monkeypatch.setattr(real_accelerator, "ds_accelerator", None)  # detect again, as on first import
    try:
        real_accelerator.get_accelerator()
    finally:
        logging.getLogger("DeepSpeed").removeHandler(handler)
    assert [r.getMessage() for r in records if "accelerator" in r.getMessage()] == []


def test_sft_config_turns_activation_checkpointing_on_without_the_deprecated_name(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        default = VLMSFTConfig(output_dir=str(tmp_path), use_cpu=True)
    assert default.activation_checkpointing is True and [str(w.message) for w in caught] == []
    with pytest.warns(FutureWarning, match="`gradient_checkpointing` is deprecated"):  # a user's own old flag
        old_flag = VLMSFTConfig(output_dir=str(tmp_path), use_cpu=True, gradient_checkpointing=False)
    assert old_flag.activation_checkpointing is False
