"""`vlm-rl compare`: the figures from hand-made generations, and the command end to end."""

import json
import statistics

import compare_helpers
import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from reward_models.registry import load_rewards
from vlm_rl.evaluation import compare
from vlm_rl.evaluation.compare import parse_named, run_compare, score_generations
from vlm_rl.evaluation.statistics import summarize
from vlm_rl.data.formats import load_samples


@pytest.fixture(scope="module")
def samples(synthetic_data_dir):
    return list(load_samples(synthetic_data_dir / "test.jsonl"))[:4]


def test_figures_from_hand_made_generations(samples):
    compare_helpers.calls.clear()
    reward = load_rewards(["exact_match", "compare_helpers:record_kwargs"])  # the second scores 0.0
    answers = [s["answer"] for s in samples]
    # baseline right on prompts 0 and 1; "rl" right on 0, 1, 2 and wrong on 3; "worse" right on 0 only
    made = {
        "base": ([answers[0], answers[1], "nope", "nope"], [True, True, False, True], [2, 2, 5, 3], [0.0] * 4),
        "rl": ([answers[0], f"The {answers[1].upper()}.", answers[2], "nope"], [True] * 4, [2, 3, 2, 2], [0.1, 0.2, 0.3, 0.4]),
        "worse": ([answers[0], "nope", "nope", "nope"], [False] * 4, [8, 8, 8, 8], [1.0, 1.0, 1.0, 1.0]),
    }
    records = {name: score_generations(reward, samples, *m)[0] for name, m in made.items()}
    assert [c["completion_ended"] for c in compare_helpers.calls] == [m[1] for m in made.values()]  # the eos flags
    assert [r["reward"] for r in records["rl"]] == [1.0, 1.0, 1.0, 0.0]  # exact match normalises case, article, punctuation
    summary = summarize(records, list(made))
    base, rl, worse = (summary["models"][n] for n in made)
    assert base["mean_reward"] == 0.5 and rl["mean_reward"] == 0.75 and worse["mean_reward"] == 0.25
    assert base["eos_rate"] == 0.75 and rl["eos_rate"] == 1.0 and worse["eos_rate"] == 0.0
    assert base["mean_length"] == 3.0 and rl["mean_length"] == 2.25
    assert rl["kl_to_first"] == pytest.approx(0.25) and base["kl_to_first"] == 0.0
    assert (rl["win"], rl["tie"], rl["loss"]) == (1, 3, 0)
    assert (worse["win"], worse["tie"], worse["loss"]) == (0, 3, 1)
    assert summary["differences"]["rl"]["mean"] == pytest.approx(0.25)
    assert summary["differences"]["worse"]["mean"] == pytest.approx(-0.25)
    # Percentile bootstrap of 4 values: a resample mean has the law Binomial(4, p) / 4 with p the share of 1s.
    # rl's rewards [1, 1, 1, 0]: P(mean <= 0.25) = 0.051 > 2.5% > P(mean = 0) = 0.004, so the CI is [0.25, 1].
    assert rl["ci95"] == [0.25, 1.0] and base["ci95"] == [0.0, 1.0]
    # Paired differences rl - base, [0, 0, 1, 0]: P(mean >= 0.75) = 0.051, P(mean = 1) = 0.004 -> [0, 0.75]
    # (resampling the two models independently instead would reach below 0).
    assert summary["differences"]["rl"]["ci95"] == [0.0, 0.75]


def test_named_arguments_are_checked():
    assert parse_named(["a=/x", "b=/y"], "--model") == {"a": "/x", "b": "/y"}
    with pytest.raises(SystemExit, match="NAME=PATH"):
        parse_named(["/x"], "--model")
    with pytest.raises(SystemExit, match="used twice"):
        parse_named(["a=/x", "a=/y"], "--model")


def test_same_model_twice_ties_everywhere(tmp_path, tiny_model_dir, synthetic_data_dir):
    # Same weights, same prompts, same seeds, same generation config: identical generations.
    summary = run_compare(
        {"a": str(tiny_model_dir), "b": str(tiny_model_dir)},
        str(synthetic_data_dir / "test.jsonl"),
        ["exact_match", "length:0.5"],
        str(tmp_path / "report"),
        max_new_tokens=4,
        batch_size=3,
    )
    b = summary["models"]["b"]
    assert (b["win"], b["loss"]) == (0, 0) and b["kl_to_first"] == pytest.approx(0.0, abs=1e-6)
    assert summary["differences"]["b"]["mean"] == 0.0
    assert json.loads((tmp_path / "report" / "summary.json").read_text()) == summary
    html = (tmp_path / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "exact_match, length:0.5" in html


def _temperature_scaled_copy(model_dir, out_dir, factor: float):
    """The tiny model with its LM head (untied) multiplied by `factor`: p(y) = softmax(factor * logits)."""
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        (out_dir / name).write_bytes((model_dir / name).read_bytes())
    return out_dir


@torch.no_grad()
def _response_log_probs(model_dir, rollout, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) over the whole vocabulary at each response position, from a plain forward. (B, T_r, V)"""
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()
    logits = model(**rollout.model_inputs(), use_cache=False).logits[:, rollout.context_length - 1 : -1]
    return torch.log_softmax(logits.double() / temperature, dim=-1)


def test_kl_to_first_is_the_kl_of_each_model_to_the_first_on_its_own_samples(
    tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch
):
    # "sharp" is the first model at a quarter of its temperature. Its KL to the first on its own samples is
    # recomputed here from full-vocabulary logits: the k1 figure exactly, and the exact per-position
    # KL(sharp || base), which is >= 0 and which k1 estimates without bias.
    sharp_dir = _temperature_scaled_copy(tiny_model_dir, tmp_path / "sharp", 4.0)
    rollouts, generate_all = {}, compare.generate_all

    def capture(model, processor, samples, config, batch_size, seed, desc, **kwargs):
        rollouts[desc] = generate_all(model, processor, samples, config, batch_size, seed, desc, **kwargs)
        return rollouts[desc]

    monkeypatch.setattr(compare, "generate_all", capture)
    compare_helpers.calls.clear()
    temperature = 0.7
    summary = run_compare(
        {"base": str(tiny_model_dir), "sharp": str(sharp_dir)}, str(synthetic_data_dir / "train.jsonl"),
        ["compare_helpers:record_kwargs"], str(tmp_path / "report"), max_samples=32, batch_size=4,
        max_new_tokens=8, temperature=temperature,
    )
    k1, exact = [], []  # per response: mean over its tokens
    for rollout in rollouts["generate sharp"]:
        own = _response_log_probs(sharp_dir, rollout, temperature)  # (B, T_r, V)
        first = _response_log_probs(tiny_model_dir, rollout, temperature)
        mask = rollout.response_mask.double()  # (B, T_r)
        sampled = (own - first).gather(-1, rollout.responses.unsqueeze(-1)).squeeze(-1)  # (B, T_r)
        full = (own.exp() * (own - first)).sum(-1)  # (B, T_r): KL(sharp || base) given the prefix
        k1 += ((sampled * mask).sum(1) / mask.sum(1)).tolist()
        exact += ((full * mask).sum(1) / mask.sum(1)).tolist()
    kl = summary["models"]["sharp"]["kl_to_first"]
    assert kl == pytest.approx(statistics.mean(k1), rel=1e-4)
    expected = statistics.mean(exact)
    assert expected > 0.1  # a real distance, whose sign a flipped estimate cannot keep
    standard_error = statistics.stdev(a - b for a, b in zip(k1, exact)) / len(k1) ** 0.5
    assert abs(kl - expected) < 4 * standard_error < expected
    assert summary["models"]["base"]["kl_to_first"] == 0.0
    ended = [[bool(e) for r in rollouts[f"generate {name}"] for e in r.has_eos] for name in ("base", "sharp")]
    assert [c["completion_ended"] for c in compare_helpers.calls] == ended  # the rewards see each generation's eos
