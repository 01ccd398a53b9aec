"""Multi-turn rollouts (vlm_rl/rollout/multi_turn.py, tools.py, tool_calls.py, environment.py): the trajectory is the
conversation the chat template renders, images mid-conversation included, and only the model's tokens train."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from multi_turn_helpers import ZOOM_CALL, Scripted
from trainer_helpers import completion_length, make_trainer, start
from vlm_rl.data.prompts import encode_prompts
from vlm_rl.errors import ConfigError
from vlm_rl.models.families import family_of, get_family
from vlm_rl.models.tool_template import QWEN_VL_TOOLS_TEMPLATE, use_tool_template
from vlm_rl.rollout import multi_turn
from vlm_rl.rollout.environment import ToolEnvironment, environment_factory
from vlm_rl.rollout.generation import eos_token_ids, make_generation_config, pad_token_id
from vlm_rl.rollout.logprobs import response_logprobs
from vlm_rl.rollout.multi_turn import MultiTurnLimits, multi_turn_rollout
from vlm_rl.rollout.tool_calls import MalformedCall, ToolCall, parse_tool_calls
from vlm_rl.rollout.tools import load_tools, tool_schema, zoom


def scene(colour=(200, 20, 20), size=(112, 112)) -> Image.Image:
    """A plain image with a differently coloured top-left quarter (so that a zoom shows something else)."""
    image = Image.new("RGB", size, colour)
    image.paste((20, 20, 200), (0, 0, size[0] // 2, size[1] // 2))
    return image


def samples(n=3):
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    return [{"prompt": prompt, "images": [scene(size=(112 + 28 * i, 112))], "_source": f"s{i}", "answer": "red"} for i in range(n)]


def tool_processor(processor):
    use_tool_template(processor, get_family("qwen2_vl"))
    return processor


def scripted_rollout(model, processor, monkeypatch, turns, limits=MultiTurnLimits(3, 400), n=3):
    """A rollout of `n` samples with the zoom tool in which every row's model turns are `turns` (Scripted)."""
    processor = tool_processor(processor)
    script = Scripted(processor.tokenizer, turns)
    monkeypatch.setattr(multi_turn, "generate_responses", script)
    tools = [tool_schema(zoom)]
    batch = samples(n)
    query = encode_prompts(processor, batch, tools=tools)
    tok = processor.tokenizer
    rollout = multi_turn_rollout(
        model, processor, batch, query, lambda: ToolEnvironment([zoom]), make_generation_config(tok, 80), limits,
        family=family_of(model), eos_ids=eos_token_ids(tok), pad_id=pad_token_id(tok), tools=tools, seed=0,
    )  # fmt: skip
    return rollout, batch, script, tools


# ---------------------------------------------------------------- tool calls, tools, environments


def test_tool_calls_are_parsed_and_malformed_ones_say_what_is_wrong():
    two = ZOOM_CALL + '\n<tool_call>\n{"name": "zoom", "arguments": "{\\"region\\": \\"top right\\"}"}\n</tool_call>'
    assert parse_tool_calls(two) == [ToolCall("zoom", {"region": "top left"}), ToolCall("zoom", {"region": "top right"})]
    assert parse_tool_calls("red") == []
    cases = {
        "<tool_call>\n{\"name\": \"zoom\"": "not closed",
        "<tool_call>{name: zoom}</tool_call>": "not valid JSON",
        '<tool_call>{"arguments": {}}</tool_call>': 'no "name"',
        '<tool_call>{"name": "zoom", "arguments": [1]}</tool_call>': "not a JSON object",
    }
    for text, why in cases.items():
        (call,) = parse_tool_calls(text)
        assert isinstance(call, MalformedCall) and why in call.error, (text, call)


def test_tool_environment_answers_bad_calls_and_failing_tools_with_an_observation():
    env = ToolEnvironment([zoom])
    env.reset({"images": [scene()]})
    step = env.step(ZOOM_CALL)
    assert not step.done and step.tool_calls == 1 and step.tool_errors == 0
    (message,) = step.observation
    crop = message["content"][0]["image"]
    assert message["role"] == "tool" and crop.size == (28, 28) and crop.getpixel((0, 0)) == (20, 20, 200)  # full resolution
    bad = env.step(
        '<tool_call>{"name": "zoom", "arguments": {"region": "middle"}}</tool_call><tool_call>{"name": "ocr"}</tool_call>'
        '<tool_call>{"name": "zoom", "arguments": {"area": "top left"}}</tool_call><tool_call>zoom'
    )
    assert bad.tool_calls == 4 and bad.tool_errors == 4 and not bad.done
    texts = [m["content"][0]["text"] for m in bad.observation]
    assert "unknown region 'middle'" in texts[0] and "there is no tool 'ocr'" in texts[1]
    assert "unexpected keyword argument 'area'" in texts[2] and "not closed" in texts[3]
    assert env.step("red").done  # no tool call: the answer


def test_tool_schema_comes_from_the_function_and_hides_what_the_environment_passes():
    schema = tool_schema(zoom)["function"]
    assert schema["name"] == "zoom" and schema["parameters"]["required"] == ["region"]
    assert set(schema["parameters"]["properties"]) == {"region"}  # `images` is the environment's to pass
    assert load_tools("zoom") == [zoom]
    with pytest.raises(ConfigError, match="unknown tool 'crop'"):
        load_tools("crop")
    with pytest.raises(ConfigError, match="cannot import module"):
        load_tools("no_such_module_here:crop")
    with pytest.raises(ConfigError, match="exclusive"):
        environment_factory("zoom", "multi_turn_helpers:ZoomEveryTurn")


def test_tool_template_renders_the_qwen2_vl_template_without_tools_and_llava_is_refused(tiny_processor):
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}],
    ]
    for messages in conversations:
        for generation_prompt in (True, False):
            ours = tiny_processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False, chat_template=QWEN_VL_TOOLS_TEMPLATE)
            assert ours == tiny_processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    class NoTools:
        chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

        def apply_chat_template(self, messages, **kwargs):
            return "".join(str(m["content"]) for m in messages if m["role"] != "tool")

    with pytest.raises(ConfigError, match="LLaVA"):
        use_tool_template(NoTools(), get_family("llava"))


# ---------------------------------------------------------------- the trajectory


def test_trajectory_is_the_conversation_processed_in_one_go_positions_and_logprobs_included(tiny_model, tiny_processor, monkeypatch):
    """Turn 1 calls zoom, the crop comes back mid-conversation, turn 2 answers. Each row's tokens are those of the
    whole conversation rendered by the chat template and processed in one go (both images); its M-RoPE positions
    (get_rope_index over the padded batch) and the logprobs of the model's tokens equal that single sequence's."""
    rollout, batch, _, tools = scripted_rollout(tiny_model, tiny_processor, monkeypatch, [ZOOM_CALL, "red"])
    family = family_of(tiny_model)
    processor = tiny_processor
    inputs = rollout.model_inputs()
    positions = family.positions(tiny_model.model, inputs)  # (3, B, T)
    logprobs, _ = response_logprobs(tiny_model, rollout, temperature=1.0)  # (B, T_r)
    c = rollout.context_length
    for row, (sample, trajectory) in enumerate(zip(batch, rollout.trajectories)):
        assert trajectory.turns == 2 and trajectory.tool_calls == 1 and not trajectory.truncated and trajectory.answer == "red"
        crop = trajectory.messages[1]["content"][0]["image"]
        conversation = sample["prompt"] + trajectory.messages
        text = processor.apply_chat_template(conversation, tools=tools, tokenize=False)
        alone = processor(text=[text], images=sample["images"] + [crop], return_tensors="pt")
        real = rollout.attention_mask[row].bool()
        ids = rollout.query_response[row][real]
        n = len(ids)
        assert torch.equal(alone["input_ids"][0, :n], ids) and processor.tokenizer.decode(alone["input_ids"][0, n:]) == "\n"
        assert rollout.num_images[row] == 2
        alone_positions = family.positions(tiny_model.model, dict(alone))  # (3, 1, T)
        assert torch.equal(positions[:, row][:, real], alone_positions[:, 0, :n])
        with torch.no_grad():
            logits = tiny_model(**alone).logits[0, :n].float()  # (n, V)
        own = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0]  # (n - 1,) token t + 1 from t
        prompt_length = int(real[:c].sum())
        wrote = torch.nonzero(rollout.response_mask[row])[:, 0]  # response columns of the model's tokens
        # another batch layout (padding, three rows of other images): float rounding apart
        torch.testing.assert_close(logprobs[row][wrote], own[prompt_length - 1 + wrote], rtol=0, atol=1e-5)


def test_observation_tokens_carry_no_loss_kl_advantage_or_value_target(tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch):
    """The tokens the model wrote are exactly the scripted turns' tokens; every other response token (the tool's answer,
    its image's tokens, the template around it) has loss_mask, train_mask False and 0 advantage, return and KL."""
    trainer = make_trainer(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], tools="zoom", kl_coef=0.1, max_total_tokens=400)
    with torch.no_grad():  # a policy already apart from its reference (KL), a critic that predicts something (values)
        generator = torch.Generator().manual_seed(0)
        for weight in (trainer.model.policy.lm_head.weight, trainer.model.value_head.summary.weight):
            weight.add_(0.1 * torch.randn(weight.shape, generator=generator))
    start(trainer)
    script = Scripted(trainer.processor.tokenizer, [ZOOM_CALL, "red"])
    monkeypatch.setattr(multi_turn, "generate_responses", script)
    batch = trainer.batch_samples(0)
    rollout = trainer.make_rollout(batch)
    scored = trainer.score(rollout, batch)
    old = trainer.advantages(rollout, scored)
    first, second = (len(ids) for ids in script.turns)
    for row, trajectory in enumerate(rollout.trajectories):
        length = int(rollout.response_lengths[row])
        wrote = torch.zeros(rollout.response_mask.shape[1], dtype=torch.bool)
        wrote[:first] = True
        wrote[length - second : length] = True  # the answer after the observation
        assert trajectory.turns == 2 and length > first + second
        assert torch.equal(old["loss_mask"][row], wrote) and torch.equal(old["train_mask"][row], wrote)
        for name in ("advantages", "returns", "kl"):
            assert old[name][row][~wrote].abs().sum() == 0, name
            assert old[name][row][wrote].abs().sum() > 0, name
        assert trajectory.turn_ends == [first - 1, length - 1]


def test_max_total_tokens_and_max_turns_end_a_trajectory_as_truncated(tiny_model, tiny_processor, monkeypatch):
    calls = len(tiny_processor.tokenizer(ZOOM_CALL).input_ids) + 1
    # room for the call but not for the observation and another turn
    rollout, *_ = scripted_rollout(tiny_model, tiny_processor, monkeypatch, [ZOOM_CALL, "red"], MultiTurnLimits(3, calls + 5), n=2)
    assert all(t.truncated and t.turns == 1 for t in rollout.trajectories) and not rollout.has_eos.any()
    assert rollout.response_lengths.tolist() == [calls, calls]  # the observation was not added
    # the model keeps calling the tool: max_turns ends it
    rollout, *_ = scripted_rollout(tiny_model, tiny_processor, monkeypatch, [ZOOM_CALL], MultiTurnLimits(2, 1000), n=2)
    assert all(t.truncated and t.turns == 2 and t.tool_calls == 2 for t in rollout.trajectories)
    assert rollout.num_images == [2, 2]  # the prompt's and the first call's crop (the second call's never shown)


def test_observation_images_are_encoded_once_and_their_reuse_is_exact(tmp_path, tiny_model_dir, synthetic_data_dir):
    """With reuse, the policy's tower runs once on the prompts' images and once per turn that brought new images (the
    zooms), and the reference never; the whole iteration (sampled tokens, old/reference logprobs, values, scores,
    every gradient) is that of the run in which every forward encodes the pixels itself."""
    from test_vision_reuse import MICRO, assert_same_iteration, iteration, models_of, tower_calls, twins

    on, off = twins(tmp_path, tiny_model_dir, synthetic_data_dir, reward=[completion_length], environment="multi_turn_helpers:ZoomEveryTurn", **MICRO)
    for trainer in (on, off):  # the random tiny model ends a turn after a token or two: turns that end, not truncated ones
        trainer.generation_config.sequence_bias = {(trainer.eos_ids[0],): 8.0}
    with tower_calls(*models_of(on)) as calls_on:
        reused = iteration(on)
    with tower_calls(*models_of(off)) as calls_off:
        encoded = iteration(off)
    rollout = reused[0]
    assert [t.turns for t in rollout.trajectories] == [3] * len(rollout) and rollout.num_images == [3] * len(rollout)
    assert calls_on == [1 + 2, 0]  # the prompts, then turn 1's and turn 2's zooms; turn 3 brought none
    assert calls_off[0] > 3 and calls_off[1] > 0
    assert_same_iteration(reused, encoded)


def test_prompts_with_videos_are_refused_in_one_line(tmp_path, tiny_model_dir, video_data_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, video_data_dir, tools="zoom")
    start(trainer)
    clips = [s for s in trainer.train_dataset if s.get("videos")][:2]
    with pytest.raises(ConfigError, match="multi-turn rollouts take prompts with images, not videos"):
        trainer.make_rollout(clips)
