"""Tools: plain Python functions whose name, docstring and type hints become the JSON schema the chat template
shows the model (transformers' `get_json_schema`, as TRL takes `tools=`), and what they return made into the content
parts of a tool message (text, images, or both).

A tool may ask for the sample's images by naming a parameter `images`: the environment passes them (the model never
sees that parameter in the schema). The built-in `zoom` returns a corner of the sample's first image at full
resolution (the zoom task's tool: vlm_rl/data/zoom_task.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from PIL import Image
from transformers.utils import get_json_schema

from vlm_rl.data.zoom_task import CORNERS, corner_box
from vlm_rl.errors import ConfigError
from vlm_rl.user_code import import_attribute

CONTEXT_PARAMETERS = ("images",)  # filled by the environment from the sample, left out of the schema


def zoom(region: str, images: list) -> Image.Image:
    """Zoom into a corner of the image.

    Args:
        region: The corner: "top left", "top right", "bottom left" or "bottom right".
        images: The images of the conversation (passed by the environment).
    """
    if not images:
        raise ValueError("there is no image to zoom into")
    where = str(region).strip().lower()
    if where not in CORNERS:
        raise ValueError(f"unknown region {region!r}; use one of: {', '.join(CORNERS)}")
    image = images[0]
    return image.crop(corner_box(image.width, image.height, where))  # a quarter of the width and height, full resolution


BUILT_IN_TOOLS: dict[str, Callable] = {"zoom": zoom}


def tool_schema(tool: Callable) -> dict:
    """The function's JSON schema (`get_json_schema`: name, docstring, type hints) less its context parameters."""
    try:
        schema = get_json_schema(tool)
    except Exception as e:  # transformers raises its own TypeError subclasses for a missing hint or description
        raise ConfigError(f"tool {getattr(tool, '__name__', tool)!r} has no usable schema: {e}. Give it type hints and a Google-style docstring with Args") from e
    parameters = schema["function"]["parameters"]
    for name in CONTEXT_PARAMETERS:
        parameters.get("properties", {}).pop(name, None)
        if name in parameters.get("required", []):
            parameters["required"] = [r for r in parameters["required"] if r != name]
    schema["function"].pop("return", None)
    return schema


def load_tools(spec: str) -> list[Callable]:
    """`"zoom"` (a built-in) or `"module:function,module:function"`, in order; a ConfigError names what is wrong."""
    tools = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part in BUILT_IN_TOOLS:
            tools.append(BUILT_IN_TOOLS[part])
            continue
        if ":" not in part:
            raise ConfigError(f"tools: unknown tool {part!r}; use a built-in ({', '.join(BUILT_IN_TOOLS)}) or module:function")
        tools.append(load_object(part, "tools"))
    if not tools:
        raise ConfigError("tools: no tool named; use a built-in ({}) or module:function".format(", ".join(BUILT_IN_TOOLS)))
    names = [t.__name__ for t in tools]
    if len(set(names)) < len(names):
        raise ConfigError(f"tools: two tools share a name ({', '.join(names)}); the model calls tools by name")
    for tool in tools:
        if not callable(tool):
            raise ConfigError(f"tools: {tool!r} is not callable")
        tool_schema(tool)  # fails now, not in the first rollout
    return tools


def load_object(spec: str, field: str) -> Any:
    """The object `module:attribute` names (the current directory importable, as for rewards)."""
    module, _, attr = spec.partition(":")
    try:
        return import_attribute(module, attr)
    except ImportError as e:
        raise ConfigError(f"{field}: cannot import module {module!r} of {spec!r}: {e}") from e
    except AttributeError as e:
        raise ConfigError(f"{field}: module {module!r} has no attribute {attr!r}") from e


def call_tool(tool: Callable, arguments: dict, images: list) -> list[dict]:
    """Run `tool` with the model's `arguments` (and the context it asks for) -> the tool message's content parts."""
    accepted = inspect.signature(tool).parameters
    context = {"images": images}
    kwargs = dict(arguments)
    for name in CONTEXT_PARAMETERS:
        if name in kwargs:
            raise ValueError(f"argument {name!r} is not the model's to give")
        if name in accepted:
            kwargs[name] = context[name]
    return content_parts(tool(**kwargs))


def content_parts(result: Any) -> list[dict]:
    """A tool's result as content parts: a string, an image, or a list of those (or of parts already)."""
    items = result if isinstance(result, (list, tuple)) else [result]
    parts = []
    for item in items:
        if isinstance(item, Image.Image):
            parts.append({"type": "image", "image": item})
        elif isinstance(item, dict) and item.get("type") in ("text", "image"):
            parts.append(item)
        else:
            parts.append({"type": "text", "text": str(item)})
    return parts
