"""HTTP reward client: score completions with a reward served by :mod:`reward_models.server`.

Protocol (JSON over HTTP, standard library only):

* ``GET {url}/health`` -> ``{"status": "ok", "name": NAME, "required_columns": [COLUMN, ...], "max_batch": N,
  "max_body_bytes": B, "timeout": SECONDS}`` (everything but ``status`` is optional for other servers; ``reward``,
  the name's older key, is read too).
* ``POST {url}/score`` with ``{"prompts": [...], "completions": [...], "images": [[IMAGE, ...], ...],
  "kwargs": {COLUMN: [...], ...}}`` -> ``{"scores": [float | null, ...]}``. An IMAGE is a base64
  PNG string, or ``{"path": "/abs/path.png"}`` for a file the server reads itself. ``images`` is
  left out when the caller passes none. Errors come back as ``{"error": MESSAGE}`` with status
  400 (bad request, or more than ``max_batch`` completions), 404, 413 (body over ``max_body_bytes``),
  500 (the reward failed), 503 (the reward stayed busy) or 504 (the reward took over ``timeout``).

:class:`RemoteReward` reads the server's name, the dataset columns its reward reads and its limits from ``/health``
once (``connect``: ``load_reward`` calls it, so a server that is down stops a run before any model loads; the
name is the reward's in metrics and score columns), then sends the batch in chunks of
``batch_size`` (at most ``max_batch``), halving a chunk whose body would exceed ``max_body_bytes``. Each
request has a ``timeout``; connection errors, timeouts and 5xx answers are retried up to ``retries``
times with exponential backoff. When the server still cannot be reached it raises
:class:`RemoteRewardError` naming the URL: it never makes up scores.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from typing import Any

from reward_models.base import Reward, validate_scores
from vlm_rl.errors import UserError

__all__ = ["RemoteReward", "RemoteRewardError", "encode_image"]

logger = logging.getLogger(__name__)


class RemoteRewardError(UserError, RuntimeError):
    """The reward server could not be reached, or answered with an error; the message names its URL."""


def encode_image(image: Any) -> str:
    """A PIL image (or an image file path) as a base64-encoded PNG of its RGB version."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as f:
            image = f.convert("RGB")
    elif not isinstance(image, Image.Image):
        raise TypeError(f"images must be PIL images or file paths, got {type(image).__name__}")
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _jsonable_prompts(prompts: Any) -> Any:
    """Prompts as JSON: image objects inside message parts become ``{"type": "image"}``."""

    def convert(obj: Any) -> Any:
        if isinstance(obj, dict):
            if obj.get("type") == "image" or ("image" in obj and not isinstance(obj["image"], (str, type(None)))):
                return {"type": "image"}  # the image itself travels in "images"
            return {str(k): convert(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [convert(v) for v in obj]
        return obj

    return convert(prompts)


def _to_jsonable(value: Any) -> Any:
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple, str)):
        value = value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, tuple):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    return value


class RemoteReward(Reward):
    """A reward computed by a reward server (``vlm-rl serve-reward SPEC --port PORT``).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000`` (requests go to ``url/score``).
        timeout: seconds allowed for each HTTP request.
        retries: how many times a request is retried after a connection error, a timeout or a
            5xx answer (so at most ``retries + 1`` attempts); 4xx answers are not retried.
        batch_size: completions per request (fewer when the server's ``max_batch`` or ``max_body_bytes``
            asks for it).
        backoff: seconds before the first retry; doubled after each (capped at 30 s).
        name: the reward's name for metrics (default: the name the server reports on ``/health``, else
            ``"remote"``).
        send_image_paths: send images given as file paths as ``{"path": ...}`` for the server to
            read (same filesystem only) instead of encoding them here.

    Keyword columns that are lists (also tuples, tensors, arrays) with one entry per sample, e.g.
    ``answer`` or ``completion_ended``, are split into the batches; other JSON-serialisable keyword
    arguments are sent whole with every batch; anything else (e.g. a trainer-state object) is left
    out, with a warning when it is a per-sample column.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        retries: int = 3,
        batch_size: int = 64,
        backoff: float = 0.5,
        name: str | None = None,
        send_image_paths: bool = False,
    ):
        parsed = urllib.parse.urlsplit(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"reward server URL must look like http://host:port, got {url!r}")
        try:
            parsed.port
        except ValueError as e:
            raise ValueError(f"bad port in reward server URL {url!r}: {e}") from e
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.url = url.strip().rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.batch_size = int(batch_size)
        self.backoff = float(backoff)
        self.name = name or "remote"
        self._named = name is not None
        self.required_columns: tuple[str, ...] = ()
        self.send_image_paths = send_image_paths
        self._limits: dict[str, int | None] | None = None  # the server's, read from /health at the first call
        # Loopback requests must not go through an HTTP proxy configured in the environment.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback_host(parsed.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, name={self.name!r})"

    # ---------------------------------------------------------------- HTTP

    def _request(self, method: str, path: str, data: bytes | None = None) -> dict:
        url = f"{self.url}{path}"
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        last_error, answered = "", False
        attempts = self.retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    body = response.read()
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code >= 500:
                    last_error, answered = f"HTTP {e.code}: {message}", True
                    logger.warning("reward server %s answered %s (attempt %d/%d)", url, last_error, attempt + 1, attempts)
                    continue
                raise RemoteRewardError(f"reward server {url} rejected the request: HTTP {e.code}: {message}") from None
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout) as e:
                reason = getattr(e, "reason", e)
                last_error, answered = f"{type(reason).__name__}: {reason}", False
                logger.warning("reward server %s: %s (attempt %d/%d)", url, last_error, attempt + 1, attempts)
                continue
            try:
                answer = json.loads(body)
            except ValueError:
                raise RemoteRewardError(
                    f"{url} did not answer with JSON (is it a reward server?): {body[:200]!r}"
                ) from None
            if not isinstance(answer, dict):
                raise RemoteRewardError(f"{url} answered {type(answer).__name__}, expected a JSON object")
            return answer
        if answered:  # the server is up: its own message says what went wrong
            raise RemoteRewardError(
                f"reward server {self.url} failed {attempts} attempt(s) to {method} {path} (last answer: {last_error})"
            )
        raise RemoteRewardError(
            f"reward server {self.url} is unreachable or failing: {attempts} attempt(s) to {method} {path} "
            f"failed (last error: {last_error}). Start it with `vlm-rl serve-reward SPEC --port PORT` "
            f"and check that the URL, port and timeout ({self.timeout:g} s) are right."
        )

    def health(self) -> dict:
        """``GET /health``: the server's status, reward name and limits (see the module docstring)."""
        return self._request("GET", "/health")

    def connect(self) -> RemoteReward:
        """Ask ``/health`` (a RemoteRewardError naming the URL when the server does not answer) for the reward's
        name (unless one was given), the columns it reads and the server's limits; returns self."""
        health = self.health()
        served = health.get("name", health.get("reward"))
        if not self._named and isinstance(served, str) and served:
            self.name = served
        columns = health.get("required_columns")
        self.required_columns = tuple(str(c) for c in columns) if isinstance(columns, list) else ()
        limits: dict[str, int | None] = {}
        for key in ("max_batch", "max_body_bytes"):
            value = health.get(key)
            limits[key] = value if isinstance(value, int) and value > 0 else None
        self._limits = limits
        return self

    def server_limits(self) -> dict[str, int | None]:
        """The server's ``max_batch`` and ``max_body_bytes`` (None where it does not say), read once."""
        if self._limits is None:
            self.connect()
        return self._limits

    # ---------------------------------------------------------------- scoring

    def _encode_images(self, images: Any, n: int, cache: dict[int, Any]) -> list[list[Any]]:
        if len(images) != n:
            raise ValueError(f"reward {self.name!r}: got {len(images)} image lists for {n} completions")
        out = []
        for sample in images:
            if sample is None:
                sample = []
            elif not isinstance(sample, (list, tuple)):
                sample = [sample]
            encoded = []
            for image in sample:
                if self.send_image_paths and isinstance(image, (str, os.PathLike)):
                    encoded.append({"path": os.path.abspath(os.fspath(image))})
                    continue
                key = id(image)
                if key not in cache:
                    cache[key] = (image, encode_image(image))  # keep the image alive: ids stay unique
                encoded.append(cache[key][1])
            out.append(encoded)
        return out

    def _split_kwargs(self, kwargs: dict, n: int) -> tuple[dict, dict]:
        columns, constants = {}, {}
        for key, value in kwargs.items():
            value = _to_jsonable(value)  # tensors and arrays become lists: columns too
            is_column = isinstance(value, list) and len(value) == n
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                if is_column:
                    warnings.warn(f"reward {self.name!r}: column {key!r} is not JSON-serialisable; not sent to {self.url}")
                continue
            (columns if is_column else constants)[key] = value
        return columns, constants

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        n = len(completions)
        images = kwargs.pop("images", None)
        for reserved in ("prompts", "completions"):
            kwargs.pop(reserved, None)
        columns, constants = self._split_kwargs(kwargs, n)
        prompts = _jsonable_prompts(list(prompts)) if prompts is not None else [None] * n
        if len(prompts) != n:
            raise ValueError(f"reward {self.name!r}: got {len(prompts)} prompts for {n} completions")
        completions = _to_jsonable(list(completions))
        if images is not None and len(images) != n:
            raise ValueError(f"reward {self.name!r}: got {len(images)} image lists for {n} completions")
        cache: dict[int, Any] = {}

        def body(start: int, stop: int) -> bytes:
            payload: dict[str, Any] = {
                "prompts": prompts[start:stop],
                "completions": completions[start:stop],
                "kwargs": {**constants, **{k: v[start:stop] for k, v in columns.items()}},
            }
            if images is not None:
                payload["images"] = self._encode_images(images[start:stop], stop - start, cache)
            return json.dumps(payload, allow_nan=False).encode("utf-8")

        limits = self.server_limits()
        step = min(self.batch_size, limits["max_batch"] or self.batch_size)
        scores: list[float | None] = []
        for start in range(0, n, step):
            scores.extend(self._score_range(start, min(start + step, n), body, limits["max_body_bytes"]))
        return scores

    def _score_range(
        self, start: int, stop: int, body: Callable[[int, int], bytes], max_body_bytes: int | None
    ) -> list[float | None]:
        """Scores of samples ``start:stop`` in one request, or in halves while the body is too large."""
        data = body(start, stop)
        if max_body_bytes is not None and len(data) > max_body_bytes:
            if stop - start == 1:
                raise RemoteRewardError(
                    f"reward {self.name!r}: sample {start} alone is a {len(data)}-byte request, over the "
                    f"{max_body_bytes}-byte limit of reward server {self.url}; send smaller images or restart "
                    "the server with a larger --max-body-bytes"
                )
            middle = (start + stop) // 2
            return self._score_range(start, middle, body, max_body_bytes) + self._score_range(
                middle, stop, body, max_body_bytes
            )
        answer = self._request("POST", "/score", data)
        if "scores" not in answer:
            raise RemoteRewardError(f"reward server {self.url} answered without 'scores': {str(answer)[:200]}")
        try:
            return validate_scores(self.name, answer["scores"], stop - start)
        except ValueError as e:
            raise RemoteRewardError(f"reward server {self.url} sent bad scores: {e}") from e


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read()
    except Exception:  # noqa: BLE001
        return str(error.reason)
    try:
        return str(json.loads(body).get("error", body[:500]))
    except (ValueError, AttributeError):
        return body[:500].decode("utf-8", "replace") or str(error.reason)
