"""The user's own code named `module:attribute` on the command line (rewards, tools, environments)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def import_attribute(module: str, attr: str) -> Any:
    """`attr` (dotted) of `module`, with the current directory importable as it is for `python -c` (a console
    script's sys.path lacks it). An ImportError of the module propagates; a missing attribute is an AttributeError."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
