"""The GGUF's `tokenizer.chat_template`: a Jinja template that lays a conversation out as mistral-common's v13
encoder (Magistral) does, so llama.cpp and llama-cpp-python format chats as magistune trained them:

    <s>[SYSTEM_PROMPT]system[/SYSTEM_PROMPT][AVAILABLE_TOOLS][tools as JSON][/AVAILABLE_TOOLS][INST]user[/INST]
    [THINK]thinking[/THINK]answer</s>[INST]…[/INST][TOOL_CALLS]name[ARGS]{arguments}</s>
    [TOOL_RESULTS]result[/TOOL_RESULTS]…

System messages stay where they are; text and thinking parts ({"type": "thinking", "closed": false} leaves
[THINK] open) render in order, so Magistral's SYSTEM_PROMPT.txt as a text/thinking/text system message gives
its [THINK] control tokens; an assistant's `reasoning_content` comes first as [THINK]…[/THINK]; the tools list
sits before the first user message, each tool as mistral-common writes it ({"type": "function", "function":
{"name", "description", "parameters"}}, separators ", " and ": "). Earlier thinking is kept, as v13 keeps it.

What a template cannot express, and mistral-common does (tests/export/test_export_chat_template.py checks the
rest id for id against encode_chat_completion):
  * images: the [IMG]/[IMG_BREAK]/[IMG_END] grid depends on the image's size; llama.cpp's mtmd inserts it;
  * merging two consecutive messages of the same role with a blank line (mistral-common's normaliser);
  * re-serialising JSON: tool-call `arguments` given as a string are written as given (mistral-common re-dumps
    them with ", " / ": "), and `parameters` go through the engine's `tojson`: llama.cpp's minja keeps key order
    like Python's json.dumps, jinja2 (llama-cpp-python) sorts keys and escapes <, >, & and '.
"""

from __future__ import annotations

CHAT_TEMPLATE = (
    "{%- set ns = namespace(first_user=-1) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' and ns.first_user < 0 -%}{%- set ns.first_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'thinking' -%}{{- '[THINK]' -}}{{- part['thinking'] -}}"
    "{%- if part['closed'] is not defined or part['closed'] -%}{{- '[/THINK]' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if loop.index0 == ns.first_user and tools -%}"
    "{{- '[AVAILABLE_TOOLS][' -}}"
    "{%- for tool in tools -%}"
    "{{- '{\"type\": \"function\", \"function\": {\"name\": ' -}}{{- tool['function']['name'] | tojson -}}"
    "{{- ', \"description\": ' -}}{{- (tool['function']['description'] or '') | tojson -}}"
    "{{- ', \"parameters\": ' -}}{{- tool['function']['parameters'] | tojson -}}{{- '}}' -}}"
    "{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '][/AVAILABLE_TOOLS]' -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '[SYSTEM_PROMPT]' -}}{{- render(message['content']) -}}{{- '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '[INST]' -}}{{- render(message['content']) -}}{{- '[/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['reasoning_content'] is defined and message['reasoning_content'] -%}"
    "{{- '[THINK]' -}}{{- message['reasoning_content'] -}}{{- '[/THINK]' -}}"
    "{%- endif -%}"
    "{{- render(message['content']) -}}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{{- '[TOOL_CALLS]' -}}{{- call['function']['name'] -}}{{- '[ARGS]' -}}"
    "{%- if call['function']['arguments'] is string -%}{{- call['function']['arguments'] -}}"
    "{%- else -%}{{- call['function']['arguments'] | tojson -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- eos_token -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '[TOOL_RESULTS]' -}}{{- render(message['content']) -}}{{- '[/TOOL_RESULTS]' -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
