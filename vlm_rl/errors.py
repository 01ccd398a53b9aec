"""The one exception type for mistakes in what the user gave us (data, flags, paths, services).

`vlm-rl` prints a `UserError` as one message and exits with status 2, without a traceback (unless
`--debug` or `VLM_RL_DEBUG=1`). Everything else is a bug in vlm-rl and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A user error: the message names the file/line/field (or flag, path, URL) and says what to do."""
