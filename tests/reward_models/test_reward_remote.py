"""The HTTP reward server and client on loopback."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
from http_helpers import post
from PIL import Image

from reward_models.base import Reward
from reward_models.registry import load_reward, load_rewards
from reward_models.remote import RemoteReward, RemoteRewardError, encode_image
from reward_models.server import decode_image, is_loopback, make_server, running_server

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}]


class MeanRed(Reward):
    """Mean red value of each sample's first image, in [0, 1]; records what it was called with."""

    name = "mean_red"

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, prompts, completions, images=None, **kwargs):
        with self.lock:
            self.calls.append({"prompts": prompts, "completions": completions, "images": images, "kwargs": kwargs})
        scores = []
        for sample in images:
            if not sample:
                scores.append(None)
                continue
            image = sample[0]
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            scores.append(float(np.asarray(image)[..., 0].mean()) / 255)
        return scores


def solid(red: int, size=(8, 6)) -> Image.Image:
    return Image.new("RGB", size, (red, 10, 20))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_images_travel_as_base64_in_batches():
    reward = MeanRed()
    with running_server(reward) as server:
        assert server.url.startswith("http://127.0.0.1:")
        client = RemoteReward(server.url, timeout=5, batch_size=2, name="mean_red")
        assert client.health() == {
            "status": "ok", "name": "mean_red", "reward": "mean_red", "required_columns": [], "max_batch": 1024,
            "max_body_bytes": 64 * 1024 * 1024, "timeout": 50.0,
        }
        reds = [0, 51, 102, 255, 200]
        images = [[solid(r)] for r in reds]
        images[2] = [solid(102), solid(7)]  # only the first image counts
        images[4] = []  # no image -> None
        scores = client(
            [PROMPT] * 5,
            [f"c{i}" for i in range(5)],
            images=images,
            answer=["a", "b", "c", "d", "e"],
            task="colour",
            trainer_state=object(),  # not JSON: left out
        )
    assert scores == pytest.approx([0.0, 0.2, 0.4, 1.0, None])
    assert scores[4] is None
    assert [len(call["completions"]) for call in reward.calls] == [2, 2, 1]
    first, last = reward.calls[0], reward.calls[-1]
    assert first["prompts"] == [PROMPT, PROMPT]
    assert first["completions"] == ["c0", "c1"]
    assert first["kwargs"] == {"answer": ["a", "b"], "task": "colour"}
    assert last["kwargs"] == {"answer": ["e"], "task": "colour"}
    assert [len(s) for s in reward.calls[1]["images"]] == [2, 1]
    assert reward.calls[0]["images"][0][0].size == (8, 6)


def test_load_reward_url_end_to_end_with_weights():
    with running_server("exact_match") as server:
        assert load_reward(server.url).health()["reward"] == "exact_match"
        combined = load_rewards([f"{server.url}:0.5", "length(max_length=1)"])
        completions = ["Red.", [{"role": "assistant", "content": "blue"}], "it is red"]
        columns, total = combined.score([PROMPT] * 3, completions, answer=["red", "red", None])
    # Named by the server's /health, not "remote"
    assert columns == {"exact_match": [1.0, 0.0, None], "length": [1.0, 1.0, 0.0]}
    assert total == [1.5, 1.0, 0.0]


def test_prompts_with_inline_images_and_path_images(tmp_path):
    path = tmp_path / "img.png"
    solid(255).save(path)
    reward = MeanRed()
    prompt_with_pil = [{"role": "user", "content": [{"type": "image", "image": solid(0)}, {"type": "text", "text": "q"}]}]
    with running_server(reward) as server:
        by_path = RemoteReward(server.url, timeout=5, send_image_paths=True)
        assert by_path([prompt_with_pil], ["x"], images=[[str(path)]]) == [1.0]
        encoded_here = RemoteReward(server.url, timeout=5)
        assert encoded_here([prompt_with_pil], ["x"], images=[[path]]) == [1.0]
    assert reward.calls[0]["prompts"][0][0]["content"][0] == {"type": "image"}


def test_server_down_is_a_clear_error_after_bounded_retries():
    port = closed_port()
    client = RemoteReward(f"http://127.0.0.1:{port}", timeout=0.5, retries=2, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError) as info:
        client([PROMPT], ["red"], answer=["red"])
    assert time.monotonic() - start < 3
    message = str(info.value)
    assert f"http://127.0.0.1:{port}" in message
    assert "3 attempt(s)" in message
    assert "vlm-rl serve-reward" in message
    with pytest.raises(RemoteRewardError, match="unreachable"):
        client.health()


def test_malformed_requests_get_400_naming_the_field():
    with running_server(MeanRed()) as server:
        url = f"{server.url}/score"
        status, answer = post(url, b"{not json")
        assert status == 400 and "not valid JSON" in answer["error"]
        status, answer = post(url, b"[1, 2]")
        assert status == 400 and "JSON object" in answer["error"]
        status, answer = post(url, json.dumps({"prompts": []}).encode())
        assert status == 400 and "'completions'" in answer["error"]
        status, answer = post(url, json.dumps({"completions": "red"}).encode())
        assert status == 400 and "'completions'" in answer["error"]
        status, answer = post(url, json.dumps({"completions": ["a"], "prompts": [1, 2]}).encode())
        assert status == 400 and "'prompts'" in answer["error"]
        status, answer = post(url, json.dumps({"completions": ["a"], "images": [["!!notbase64"]]}).encode())
        assert status == 400 and "images[0][0]" in answer["error"]
        not_image = base64.b64encode(b"hello").decode()
        status, answer = post(url, json.dumps({"completions": ["a", "b"], "images": [[], [not_image]]}).encode())
        assert status == 400 and "images[1][0]" in answer["error"]
        status, answer = post(url, json.dumps({"completions": ["a"], "kwargs": {"images": []}}).encode())
        assert status == 400 and "'kwargs'" in answer["error"]
        status, answer = post(f"{server.url}/nope", b"{}")
        assert status == 404
        # The client does not retry 4xx answers: it raises at once with the server's message.
        client = RemoteReward(f"{server.url}/wrong-prefix", timeout=5, retries=5, backoff=10)
        start = time.monotonic()
        with pytest.raises(RemoteRewardError, match="HTTP 404"):
            client([PROMPT], ["x"])
        assert time.monotonic() - start < 2


def test_reward_failures_are_500_and_retried_then_reported():
    calls = []

    def failing(prompts, completions, **kwargs):
        calls.append(1)
        raise RuntimeError("model exploded")

    def wrong_length(prompts, completions, **kwargs):
        return [1.0]

    with running_server(failing) as server:
        status, answer = post(f"{server.url}/score", json.dumps({"completions": ["a"]}).encode())
        assert status == 500 and "model exploded" in answer["error"]
        client = RemoteReward(server.url, timeout=5, retries=1, backoff=0.01)
        with pytest.raises(RemoteRewardError, match="model exploded"):
            client([PROMPT], ["x"])
    assert len(calls) == 3  # one direct post + two attempts by the client
    with running_server(wrong_length) as server:
        status, answer = post(f"{server.url}/score", json.dumps({"completions": ["a", "b"]}).encode())
        assert status == 500 and "returned 1 scores for 2 completions" in answer["error"]


def test_path_images_can_be_disabled(tmp_path):
    path = tmp_path / "img.png"
    solid(3).save(path)
    with running_server(MeanRed(), allow_image_paths=False) as server:
        status, answer = post(
            f"{server.url}/score", json.dumps({"completions": ["a"], "images": [[{"path": str(path)}]]}).encode()
        )
    assert status == 400 and "images[0][0]" in answer["error"] and "disabled" in answer["error"]


def test_loopback_only_unless_allowed():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("8.8.8.8")
    for host in ("0.0.0.0", "", "8.8.8.8"):
        with pytest.raises(ValueError, match="allow_remote=True"):
            make_server(MeanRed(), host=host)
    server = make_server("exact_match", host="localhost")
    try:
        assert server.reward.name == "exact_match" and server.allow_image_paths
    finally:
        server.server_close()


def test_image_codec_roundtrip():
    image = Image.new("RGBA", (3, 2), (10, 20, 30, 128))
    decoded = decode_image(encode_image(image), "images[0][0]")
    assert decoded.mode == "RGB" and decoded.size == (3, 2) and decoded.getpixel((0, 0)) == (10, 20, 30)
    buf = io.BytesIO()
    solid(9).save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert decode_image(data_url, "x").getpixel((0, 0)) == (9, 10, 20)
    assert decode_image({"base64": encode_image(solid(4))}, "x").getpixel((0, 0)) == (4, 10, 20)
