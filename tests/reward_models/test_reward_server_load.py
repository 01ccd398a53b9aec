"""The reward server under load: concurrent clients, one reward call at a time, bounded requests, timeouts."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import zlib

import pytest
from http_helpers import post

from reward_models.base import Reward
from reward_models.remote import RemoteReward, RemoteRewardError
from reward_models.server import running_server


def fingerprint(prompt: str, completion: str, answer: str) -> float:
    """The score that only this exact (prompt, completion, answer) gets."""
    return float(zlib.crc32(f"{prompt}|{completion}|{answer}".encode()))


class Fingerprint(Reward):
    """Scores each sample by its fingerprint after a random short sleep; counts calls running at once."""

    name = "fingerprint"

    def __init__(self, min_sleep: float = 0.0, max_sleep: float = 0.003):
        self.min_sleep, self.max_sleep = min_sleep, max_sleep
        self.active = 0
        self.most_active = 0
        self.batch_sizes: list[int] = []
        self._count = threading.Lock()  # guards the counters only, never the call

    def __call__(self, prompts, completions, answer, **kwargs):
        with self._count:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.batch_sizes.append(len(completions))
        time.sleep(random.uniform(self.min_sleep, self.max_sleep))
        scores = [fingerprint(p, c, a) for p, c, a in zip(prompts, completions, answer)]
        with self._count:
            self.active -= 1
        return scores


def test_32_concurrent_clients_each_get_exactly_their_own_scores():
    reward = Fingerprint()
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def client(index: int, url: str, start: threading.Barrier) -> None:
        rng = random.Random(index)
        remote = RemoteReward(url, timeout=10, retries=0, batch_size=rng.randint(1, 4))
        start.wait()
        try:
            for call in range(3):
                n = rng.randint(1, 7)
                prompts = [f"client {index} call {call} prompt {i}" for i in range(n)]
                completions = [f"c{rng.random()}" for _ in range(n)]
                answers = [f"a{index}.{i}" for i in range(n)]
                expected = [fingerprint(*sample) for sample in zip(prompts, completions, answers)]
                results.setdefault(index, []).append((remote(prompts, completions, answer=answers), expected))
        except BaseException as e:  # noqa: BLE001  (re-raised by the test)
            errors.append(e)

    with running_server(reward) as server:
        start = threading.Barrier(32)
        threads = [threading.Thread(target=client, args=(i, server.url, start)) for i in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors[0]
    assert sorted(results) == list(range(32))
    for index, calls in results.items():
        assert len(calls) == 3
        for got, expected in calls:
            assert got == expected, f"client {index} got someone else's scores"
    assert reward.most_active == 1
    assert len(reward.batch_sizes) > 64  # the 96 calls really were split into many requests


def test_the_reward_lock_serialises_calls():
    reward = Fingerprint(min_sleep=0.02, max_sleep=0.02)  # long enough for the other requests to arrive meanwhile
    start = threading.Barrier(8)
    statuses: list[int] = []

    def client(url: str) -> None:
        start.wait()
        status, _ = post(url, json.dumps({"completions": ["x"], "prompts": ["p"], "kwargs": {"answer": ["a"]}}).encode())
        statuses.append(status)

    with running_server(reward) as server:
        threads = [threading.Thread(target=client, args=(f"{server.url}/score",)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
    assert statuses == [200] * 8
    assert len(reward.batch_sizes) == 8 and reward.most_active == 1


def test_an_oversized_body_is_413_without_being_read():
    reward = Fingerprint()
    with running_server(reward, max_body_bytes=1000) as server:
        host, port = server.server_address[:2]
        with socket.create_connection((host, port), timeout=2) as conn:
            # Announce 100 MB and send none of it: a server that tried to read the body would hang here.
            conn.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n")
            answer = b""
            while chunk := conn.recv(4096):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split()[1] == b"413"
        assert "100000000 bytes" in json.loads(body)["error"] and "--max-body-bytes" in json.loads(body)["error"]

        # The client keeps under the limit by itself: it halves batches whose body would be too large ...
        remote = RemoteReward(server.url, timeout=5, retries=0, batch_size=8)
        completions = [f"{i}" * 200 for i in range(8)]
        answers = [str(i) for i in range(8)]
        assert remote(["p"] * 8, completions, answer=answers) == [fingerprint("p", c, a) for c, a in zip(completions, answers)]
        # ... and names the limit when one sample alone is over it.
        with pytest.raises(RemoteRewardError, match=r"sample 1 alone .* 1000-byte limit .*--max-body-bytes"):
            remote(["p", "p"], ["short", "x" * 2000], answer=["a", "b"])
    assert reward.batch_sizes and max(reward.batch_sizes) < 8


def test_an_oversized_batch_is_400_naming_the_limit_and_the_client_splits_below_it():
    reward = Fingerprint()
    with running_server(reward, max_batch=4) as server:
        five = {"completions": list("abcde"), "prompts": list("abcde"), "kwargs": {"answer": list("abcde")}}
        status, answer = post(f"{server.url}/score", json.dumps(five).encode())
        assert status == 400 and "limit of 4" in answer["error"] and "--max-batch" in answer["error"]
        assert reward.batch_sizes == []  # refused before the reward ran

        remote = RemoteReward(server.url, timeout=5, retries=0, batch_size=64)
        completions = [f"c{i}" for i in range(10)]
        scores = remote(["p"] * 10, completions, answer=["a"] * 10)
    assert scores == [fingerprint("p", c, "a") for c in completions]
    assert reward.batch_sizes == [4, 4, 2]


def test_a_slow_reward_times_out_for_its_client_while_health_answers():
    entered, release = threading.Event(), threading.Event()

    def stuck(prompts, completions, **kwargs):
        entered.set()
        release.wait(10)
        return [1.0] * len(completions)

    def health_seconds(remote: RemoteReward) -> float:
        start = time.monotonic()
        assert remote.health()["status"] == "ok"
        return time.monotonic() - start

    with running_server(stuck, timeout=0.3) as server:
        remote = RemoteReward(server.url, timeout=5, retries=0)
        failure: list[BaseException] = []

        def score() -> None:
            try:
                remote(["p"], ["x"])
            except RemoteRewardError as e:
                failure.append(e)

        thread = threading.Thread(target=score)
        start = time.monotonic()
        thread.start()
        assert entered.wait(5)
        assert health_seconds(remote) < 1  # while the reward runs
        thread.join(timeout=5)
        assert time.monotonic() - start < 2
        assert failure and "HTTP 504" in str(failure[0]) and "did not finish within 0.3 s" in str(failure[0])

        assert server.lock.locked()  # the abandoned call still holds the reward
        assert health_seconds(remote) < 1
        status, answer = post(f"{server.url}/score", json.dumps({"completions": ["y"]}).encode())
        assert status == 503 and "busy" in answer["error"]

        release.set()
        assert remote(["p"], ["x"]) == [1.0]  # the reward is free again


def test_time_spent_waiting_for_the_lock_counts_against_the_timeout():
    """A request that waited part of its timeout for another's call gets only the rest of it for its own call."""
    first_in = threading.Event()
    durations = iter([0.8, 0.8])  # each call alone fits the 1 s timeout; waiting + calling does not

    def slow(prompts, completions, **kwargs):
        first_in.set()
        time.sleep(next(durations))
        return [1.0] * len(completions)

    with running_server(slow, timeout=1.0) as server:
        results = {}

        def client(name: str) -> None:
            start = time.monotonic()
            results[name] = (*post(f"{server.url}/score", json.dumps({"completions": [name]}).encode()), time.monotonic() - start)

        first = threading.Thread(target=client, args=("first",))
        first.start()
        assert first_in.wait(5)
        client("second")  # waits ~0.8 s for the lock, then would need 0.8 s more
        first.join(timeout=5)
    assert results["first"][0] == 200
    status, answer, seconds = results["second"]
    assert status == 504 and "did not finish within 1 s" in answer["error"]
    assert seconds < 1.45  # answered at its deadline (~1 s), not a full timeout after it got the lock (1.6 s)


def test_limits_must_be_positive_numbers(capsys):
    from reward_models.server import main, make_server

    for flag, value in (("--max-batch", "0"), ("--max-body-bytes", "-1"), ("--timeout", "0")):
        with pytest.raises(SystemExit):
            main(["exact_match", flag, value])
        assert f"argument {flag}: must be > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="timeout must be a finite number > 0"):
        make_server(Fingerprint(), timeout=float("inf"))
    from reward_models.server import _positive

    assert (_positive(int)("1"), _positive(float)("0.5")) == (1, 0.5)  # the flags' smallest values are allowed


def test_the_command_serves_the_sum_of_several_specs(monkeypatch):
    import reward_models.server as server

    served = []
    monkeypatch.setattr(server, "serve", lambda spec, *args, **kwargs: served.append(spec))
    server.main(["exact_match", "length:0.5", "--port", "8123"])
    assert served == [["exact_match", "length:0.5"]]
