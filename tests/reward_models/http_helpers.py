"""Raw HTTP calls to a reward server, for the tests that check its answers status by status."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def post(url: str, body: bytes) -> tuple[int, dict]:
    """POST ``body`` as JSON to ``url`` (no proxy): ``(status, decoded answer)``, errors included."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
