"""A chat template that renders tools for the Qwen VL families whose own template does not (Qwen2-VL's and
Qwen2.5-VL's ship without tools).

It is the Qwen2-VL template (byte-identical output for conversations without tools or tool messages) plus what the
Qwen2.5 text models' template does with tools: their schemas in the system turn, the `<tool_call>` format, and each
run of tool messages as one user turn of `<tool_response>` blocks, which here may hold images (the tool's crops).
The assistant turns carry `{% generation %}` markers, so SFT's assistant-only loss trains on exactly the model's
turns. Families whose template cannot show tools and that have no such fallback are refused with a UserError.
"""

from __future__ import annotations

import logging

from trl.chat_template_utils import supports_tool_calling

from vlm_rl.errors import ConfigError

logger = logging.getLogger(__name__)

_CONTENT = (
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' or 'video' in content %}{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
)

QWEN_VL_TOOLS_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set message = messages[0] %}" + _CONTENT + "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}'
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}{%- if not tools %}{{- '<|im_start|>system\\n' }}" + _CONTENT + "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{%- generation -%}" + _CONTENT +
    "{%- for tool_call in message['tool_calls'] or [] %}{%- if tool_call['function'] is defined %}{%- set tool_call = tool_call['function'] %}{%- endif %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' }}{{- tool_call['name'] }}{{- '\", \"arguments\": ' }}"
    "{%- if tool_call['arguments'] is string %}{{- tool_call['arguments'] }}{%- else %}{{- tool_call['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endgeneration -%}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}" + _CONTENT + "{{- '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' }}" + _CONTENT + "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def use_tool_template(processor, family) -> None:
    """Make `processor` (of a model of `family`, vlm_rl.models.families) render tools: its own chat template when it
    can (TRL's `supports_tool_calling`), else the family's tool template; a ConfigError for a family without one."""
    if supports_tool_calling(processor):
        return
    if family.tool_template is None:
        raise ConfigError(
            f"tools: the chat template of this {family.title} processor cannot show tools or tool responses and vlm-rl "
            "has no tool template for the family; give the model a chat template that renders `tools` and `tool` messages"
        )
    logger.info("the processor's chat template renders no tools: using the %s tool-calling template", family.title)
    processor.chat_template = family.tool_template
    processor.tokenizer.chat_template = family.tool_template
