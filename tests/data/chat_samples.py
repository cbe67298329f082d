"""Conversations shared by the chat, tool and reasoning tests (one conversation in both tool layouts, a
reasoning conversation, and a template that strips reasoning from history as Qwen3's does)."""

from __future__ import annotations

import json

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIP = {
    "name": "calculate_tip",
    "description": "Tip for a bill",
    "parameters": {"type": "object", "properties": {"bill": {"type": "number"}}, "required": ["bill"]},
}
# one conversation in the public ShareGPT tool layout: two calls at once, their results, an answer,
# then a second request answered by a call
SHAREGPT = {
    "conversations": [
        {"from": "human", "value": "Weather in Paris and Lyon?"},
        {
            "from": "function_call",
            "value": json.dumps(
                [
                    {"name": "get_weather", "arguments": {"city": "Paris"}},
                    {"name": "get_weather", "arguments": {"city": "Lyon"}},
                ]
            ),
        },
        {"from": "observation", "value": '{"t": 20}'},
        {"from": "observation", "value": '{"t": 22}'},
        {"from": "gpt", "value": "Paris 20, Lyon 22."},
        {"from": "human", "value": "Tip on 80?"},
        {"from": "function_call", "value": '{"name": "calculate_tip", "arguments": "{\\"bill\\": 80}"}'},
    ],
    "system": "Be brief.",
    "tools": json.dumps([WEATHER, TIP]),
}
# the same conversation in the OpenAI messages layout
OPENAI = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Lyon?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}},
            ],
        },
        {"role": "tool", "content": '{"t": 20}'},
        {"role": "tool", "content": '{"t": 22}'},
        {"role": "assistant", "content": "Paris 20, Lyon 22."},
        {"role": "user", "content": "Tip on 80?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "calculate_tip", "arguments": {"bill": 80}}}
            ],
        },
    ],
    "tools": [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIP}],
}
CALLS_1 = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call><|im_end|>'
)
CALL_2 = '<tool_call>\n{"name": "calculate_tip", "arguments": {"bill": 80}}\n</tool_call><|im_end|>'


THINKING = {
    "messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "add again"},
    ]
}
# Like Qwen3's template: a trace is rendered only for assistant turns after the last user turn (history
# is stripped of its reasoning), and enable_thinking=false adds an empty trace to the generation prompt.
STRIPPING_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_user and m.reasoning_content is string %}"
    "{{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
