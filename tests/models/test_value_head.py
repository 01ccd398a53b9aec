"""The value head: starts at zero, sits on the policy's hidden states, saves and loads beside the policy."""

import pytest
import torch

from vlm_rl.models.value_head import VALUE_HEAD_FILE, ValueHead, load_value_head, save_value_head


def test_fresh_head_predicts_zero():
    head = ValueHead(8)
    assert torch.equal(head(torch.randn(2, 3, 8)), torch.zeros(2, 3))


def test_head_is_fp32_even_for_bf16_hidden_states():
    head = ValueHead(8)
    torch.nn.init.normal_(head.summary.weight)
    out = head(torch.randn(2, 3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (2, 3)


def test_save_load_round_trip(tmp_path):
    head = ValueHead(16)
    torch.nn.init.normal_(head.summary.weight)
    save_value_head(head, tmp_path)
    assert (tmp_path / VALUE_HEAD_FILE).exists()
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_value_head(tmp_path, 16)
    x = torch.randn(1, 4, 16)
    assert torch.equal(head(x), loaded(x))


def test_missing_or_mismatched_head_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no value head"):
        load_value_head(tmp_path, 16)
    save_value_head(ValueHead(16), tmp_path)
    with pytest.raises(ValueError, match="hidden size 16, the policy has 32"):
        load_value_head(tmp_path, 32)


def test_value_head_stays_fp32_under_bf16_autocast():
    head = ValueHead(8)
    torch.nn.init.normal_(head.summary.weight)
    hidden = torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = head(hidden.bfloat16())
    assert values.dtype == torch.float32
    assert torch.equal(values, head(hidden.bfloat16().float()))  # exactly the fp32 computation


def test_a_head_an_engine_cast_to_bf16_computes_in_bf16_and_returns_fp32():
    # DeepSpeed's bf16 mode casts the whole model, the value head included, and hands it bf16 or fp32 states.
    head = ValueHead(8)
    torch.nn.init.normal_(head.summary.weight)
    head.to(torch.bfloat16)
    hidden = torch.randn(2, 3, 8)
    for states in (hidden, hidden.bfloat16()):
        values = head(states)
        assert values.dtype == torch.float32 and values.shape == (2, 3)
        assert torch.equal(values, head.summary(hidden.bfloat16()).float().squeeze(-1))
