"""Serve any reward over HTTP (the protocol is described in :mod:`reward_models.remote`).

    python -m reward_models.server exact_match --port 8000
    python -m reward_models.server runs/reward-model --port 8000        # a trained reward model
    python -m reward_models.server exact_match:0.5 format:0.5 --port 8000   # their weighted sum

``/score`` decodes the images (base64 PNG/JPEG strings, optionally as ``data:`` URLs, or
``{"path": ...}`` files) to RGB PIL images and calls the reward with
``reward(prompts, completions, images=..., **kwargs)``; ``/health`` returns the reward's name and the
server's limits. Malformed requests get status 400 with ``{"error": ...}`` naming the offending field; a
reward that raises gives 500.

Under load: each connection is served by its own thread, but reward calls are serialised by a lock (a
GPU reward model is not thread-safe) while ``/health`` stays responsive. A request body over
``max_body_bytes`` is answered 413 without being read, a batch over ``max_batch`` completions 400. A
request whose reward call has not finished ``timeout`` seconds after it was parsed is answered 504 (the
call runs on, holding the lock, and its result is dropped); one that waited the whole ``timeout`` for
the lock is answered 503.

Loopback only by default: the server has no authentication, decodes whatever images it is sent,
and (for ``{"path": ...}`` images) opens files on the server's disk for the client, so anyone who
can reach the port can use the server's compute and probe its files. Binding any other address
needs ``allow_remote=True`` (``--allow-remote``), which also turns off path images unless
``allow_image_paths=True`` is given; put such a server behind a trusted network or an
authenticating proxy.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import ipaddress
import json
import logging
import math
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from reward_models.base import Reward, as_reward, validate_scores
from reward_models.registry import load_reward, load_rewards

__all__ = [
    "BadRequest",
    "RewardServer",
    "RewardTimeout",
    "decode_image",
    "is_loopback",
    "main",
    "make_server",
    "running_server",
    "serve",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_BATCH = 1024
DEFAULT_TIMEOUT = 50.0  # below RemoteReward's default 60 s, so that its client hears why


class BadRequest(ValueError):
    """A /score request that does not follow the protocol (answered with status 400)."""


class RewardTimeout(Exception):
    """The reward did not answer a request in time; ``status`` is 504 (too slow) or 503 (busy)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) refers only to loopback addresses."""
    if not host:
        return False  # "" binds every interface
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def decode_image(value: Any, field: str, allow_paths: bool = True):
    """One image of a request as an RGB PIL image; BadRequest naming ``field`` when it is invalid."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict) and "path" in value:
        if not allow_paths:
            raise BadRequest(f"{field}: path images are disabled on this server; send the image as base64 PNG")
        path = value["path"]
        if not isinstance(path, str):
            raise BadRequest(f"{field}: 'path' must be a string")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise BadRequest(f"{field}: cannot open image file {path!r}: {e}") from e
    if isinstance(value, dict) and "base64" in value:
        value = value["base64"]
    if not isinstance(value, str):
        raise BadRequest(f"{field}: an image must be a base64 string or {{\"path\": ...}}, got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"{field}: invalid base64: {e}") from e
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise BadRequest(f"{field}: not a decodable image: {e}") from e


def parse_score_request(
    body: bytes, allow_paths: bool = True, max_batch: int = DEFAULT_MAX_BATCH
) -> tuple[list, list, dict]:
    """A /score body as ``(prompts, completions, kwargs)``, kwargs including decoded ``images``."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from e
    if not isinstance(request, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(request).__name__}")
    if "completions" not in request:
        raise BadRequest("missing field 'completions' (a list of strings or message lists)")
    completions = request["completions"]
    if not isinstance(completions, list):
        raise BadRequest(f"field 'completions' must be a list, got {type(completions).__name__}")
    n = len(completions)
    if n > max_batch:
        raise BadRequest(
            f"field 'completions' has {n} entries, over this server's limit of {max_batch} per request "
            "(--max-batch): send smaller batches"
        )
    for i, completion in enumerate(completions):
        if not isinstance(completion, (str, list, dict)):
            raise BadRequest(f"completions[{i}] must be a string or a list of messages, got {type(completion).__name__}")
    prompts = request.get("prompts")
    if prompts is None:
        prompts = [None] * n
    if not isinstance(prompts, list) or len(prompts) != n:
        raise BadRequest(f"field 'prompts' must be a list with one entry per completion ({n})")
    kwargs = request.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise BadRequest(f"field 'kwargs' must be an object of columns, got {type(kwargs).__name__}")
    for reserved in ("prompts", "completions", "images"):
        if reserved in kwargs:
            raise BadRequest(f"field 'kwargs' must not contain {reserved!r} (send it at the top level)")
    kwargs = dict(kwargs)
    images = request.get("images")
    if images is not None:
        if not isinstance(images, list) or len(images) != n:
            raise BadRequest(f"field 'images' must be a list with one list of images per completion ({n})")
        decoded = []
        for i, sample in enumerate(images):
            if sample is None:
                sample = []
            elif not isinstance(sample, list):
                sample = [sample]
            decoded.append([decode_image(img, f"images[{i}][{j}]", allow_paths) for j, img in enumerate(sample)])
        kwargs["images"] = decoded
    return prompts, completions, kwargs


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    server_version = "vlm-rl-reward-server/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("client went away before the answer was sent")

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/") == "/health":
            reward = self.server.reward
            columns = list(getattr(reward, "required_columns", ()))
            self._send(200, {"status": "ok", "name": reward.name, "reward": reward.name, "required_columns": columns, **self.server.limits})
        else:
            self._send(404, {"error": f"no such endpoint {self.path!r}; use GET /health or POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._send(404, {"error": f"no such endpoint {self.path!r}; use GET /health or POST /score"})
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._send(400, {"error": "missing or invalid Content-Length header"})
            return
        if int(length) > self.server.max_body_bytes:
            self.close_connection = True  # the unread body must not be parsed as the next request
            self._send(413, {
                "error": f"request body of {length} bytes exceeds this server's limit of "
                f"{self.server.max_body_bytes} bytes (--max-body-bytes): send smaller batches"
            })
            return
        body = self.rfile.read(int(length))
        try:
            prompts, completions, kwargs = parse_score_request(body, self.server.allow_image_paths, self.server.max_batch)
        except BadRequest as e:
            self._send(400, {"error": str(e)})
            return
        reward = self.server.reward
        try:
            raw = self.server.call_reward(prompts, completions, kwargs)
            scores = validate_scores(reward.name, raw, len(completions))
        except RewardTimeout as e:
            logger.warning("%s", e)
            self._send(e.status, {"error": str(e)})
            return
        except Exception as e:  # noqa: BLE001  (report any reward failure to the client)
            logger.error("reward %r failed:\n%s", reward.name, traceback.format_exc())
            self._send(500, {"error": f"reward {reward.name!r} failed: {type(e).__name__}: {e}"})
            return
        self._send(200, {"scores": scores})


class RewardServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer serving one reward; ``url`` is its base URL."""

    daemon_threads = True
    request_queue_size = 128  # connections waiting to be accepted: many clients connect at once

    def __init__(
        self,
        reward: Reward,
        host: str,
        port: int,
        allow_image_paths: bool = True,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_batch: int = DEFAULT_MAX_BATCH,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        for name, value in (("max_body_bytes", max_body_bytes), ("max_batch", max_batch), ("timeout", timeout)):
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        self.reward = reward
        self.allow_image_paths = allow_image_paths
        self.max_body_bytes = int(max_body_bytes)
        self.max_batch = int(max_batch)
        self.reward_timeout = float(timeout)  # not `timeout`: socketserver uses that name for handle_request
        self.lock = threading.Lock()
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host.strip("[]"), port), _Handler)

    @property
    def limits(self) -> dict:
        """The limits a client must respect (sent by ``/health``): ``max_batch``, ``max_body_bytes``, ``timeout``."""
        return {"max_batch": self.max_batch, "max_body_bytes": self.max_body_bytes, "timeout": self.reward_timeout}

    def call_reward(self, prompts: list, completions: list, kwargs: dict) -> Any:
        """The reward's raw answer for one request, one call at a time, within ``timeout`` seconds.

        The call runs in a thread of its own, holding the lock, so that a slow reward can be abandoned:
        after ``timeout`` seconds its request gets :class:`RewardTimeout` (504) while the call runs on and
        its result is dropped. A request that waits the whole ``timeout`` for the lock gets 503.
        """
        deadline = time.monotonic() + self.reward_timeout
        name = self.reward.name
        if not self.lock.acquire(timeout=self.reward_timeout):
            raise RewardTimeout(
                503,
                f"reward {name!r} is busy: an earlier request still held it after {self.reward_timeout:g} s "
                "(server --timeout); retry later",
            )
        answer: Future = Future()

        def run() -> None:
            try:
                answer.set_result(self.reward(prompts, completions, **kwargs))
            except Exception as e:  # noqa: BLE001  (handed to the request's thread)
                answer.set_exception(e)
            finally:
                self.lock.release()

        threading.Thread(target=run, name=f"reward-{name}", daemon=True).start()
        try:
            return answer.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise RewardTimeout(
                504,
                f"reward {name!r} did not finish within {self.reward_timeout:g} s (server --timeout); "
                "the call was abandoned",
            ) from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"


def make_server(
    reward: str | Callable[..., Any],
    host: str = "127.0.0.1",
    port: int = 0,
    allow_remote: bool = False,
    allow_image_paths: bool | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_batch: int = DEFAULT_MAX_BATCH,
    timeout: float = DEFAULT_TIMEOUT,
) -> RewardServer:
    """A bound (not yet serving) :class:`RewardServer` for ``reward`` (a spec or a callable).

    ``port=0`` picks a free port (read it from ``server.url``). Hosts other than loopback are
    refused unless ``allow_remote=True`` (see the module docstring for why). ``allow_image_paths``
    defaults to ``not allow_remote``. ``max_body_bytes``, ``max_batch`` and ``timeout`` (seconds)
    bound each request (see the module docstring). Call ``serve_forever()`` (or use
    :func:`running_server`).
    """
    if not allow_remote and not is_loopback(host):
        raise ValueError(
            f"refusing to serve a reward on {host!r}: the reward server has no authentication and reads "
            "image files for its clients, so it binds loopback (127.0.0.1, ::1, localhost) only. "
            "Pass allow_remote=True (--allow-remote) to expose it, on a trusted network only."
        )
    reward = load_reward(reward) if isinstance(reward, str) else as_reward(reward)
    if allow_image_paths is None:
        allow_image_paths = not allow_remote
    return RewardServer(
        reward,
        host,
        port,
        allow_image_paths=allow_image_paths,
        max_body_bytes=max_body_bytes,
        max_batch=max_batch,
        timeout=timeout,
    )


@contextmanager
def running_server(reward: str | Callable[..., Any], **kwargs: Any) -> Iterator[RewardServer]:
    """Context manager: a server for ``reward`` serving in a background thread; shut down on exit."""
    server = make_server(reward, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def serve(
    spec: str | list[str] | Callable[..., Any],
    host: str = "127.0.0.1",
    port: int = 8000,
    allow_remote: bool = False,
    allow_image_paths: bool | None = None,
    **limits: Any,
) -> None:
    """Serve the reward that ``spec`` names (several specs: their weighted sum) until interrupted.

    ``limits``: ``max_body_bytes``, ``max_batch`` and ``timeout``, as for :func:`make_server`.
    """
    if isinstance(spec, (list, tuple)):
        reward = load_rewards(list(spec)) if len(spec) > 1 else spec[0]
    else:
        reward = spec
    server = make_server(reward, host, port, allow_remote=allow_remote, allow_image_paths=allow_image_paths, **limits)
    print(
        f"serving reward {server.reward.name!r} on {server.url} (POST /score, GET /health); "
        f"limits per request: {server.max_batch} completions, {server.max_body_bytes} bytes, "
        f"{server.reward_timeout:g} s",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: ``kind`` (int or float) > 0."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="vlm-rl serve-reward", description="Serve a reward over HTTP (POST /score, GET /health)."
    )
    parser.add_argument("spec", nargs="+", help="reward spec(s), as for load_reward; several are summed with their :WEIGHT")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless --allow-remote)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback address (no auth!)")
    parser.add_argument(
        "--allow-image-paths", action="store_true", help="with --allow-remote: still let clients send {'path': ...} images"
    )
    parser.add_argument(
        "--max-body-bytes",
        type=_positive(int),
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body accepted; larger ones get 413 (default: 64 MiB)",
    )
    parser.add_argument(
        "--max-batch",
        type=_positive(int),
        default=DEFAULT_MAX_BATCH,
        help=f"most completions per request; more get 400 (default: {DEFAULT_MAX_BATCH})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=DEFAULT_TIMEOUT,
        help=f"seconds a request may take, waiting for the reward included; then 504/503 (default: {DEFAULT_TIMEOUT:g})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(
            args.spec,
            args.host,
            args.port,
            allow_remote=args.allow_remote,
            allow_image_paths=True if args.allow_image_paths else None,
            max_body_bytes=args.max_body_bytes,
            max_batch=args.max_batch,
            timeout=args.timeout,
        )
    except (ValueError, ImportError, OSError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
