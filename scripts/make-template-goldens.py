#!/usr/bin/env python3
"""Render the chat-template goldens that daemon/tests/engine/template.rs compares against.

Uses Python's jinja2 configured as Hugging Face transformers' apply_chat_template
configures it (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
loopcontrols, raise_exception and strftime_now globals) on the real
tokenizer_config.json of each family, as fetched by scripts/fetch-tokenizers.sh.

    scripts/fetch-tokenizers.sh qwen3 llama3 gemma3
    python3 -m pip install jinja2
    python3 scripts/make-template-goldens.py > daemon/tests/engine/goldens/chat_templates.json
"""
import json
import os
import sys
from datetime import datetime

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

FAMILIES = ["qwen3", "llama3", "gemma3"]

CASES = [
    {
        "name": "one user turn",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    },
    {
        "name": "system and user",
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name three primes."},
        ],
    },
    {
        "name": "multi-turn",
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
        ],
    },
    {
        "name": "multi-turn without generation prompt",
        "add_generation_prompt": False,
        "messages": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ],
    },
    {
        "name": "thinking disabled",
        "enable_thinking": False,
        "messages": [{"role": "user", "content": "2 + 2?"}],
    },
    {
        "name": "thinking enabled",
        "enable_thinking": True,
        "messages": [{"role": "user", "content": "2 + 2?"}],
    },
    {
        "name": "reasoning in history",
        "messages": [
            {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "<think>\nSimple sum.\n</think>\n\n4"},
            {"role": "user", "content": "Times 3?"},
        ],
    },
    {
        "name": "whitespace and unicode",
        "messages": [{"role": "user", "content": "  Grüße, 世界! 😀 \n\n"}],
    },
]


# Tool use, for the families whose templates take tools (Qwen3): the tools
# offered, an assistant turn that calls one, the tool's answer.
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
]
TOOL_CASES = [
    {
        "name": "tools offered",
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
    },
    {
        "name": "a call and its answer",
        "messages": [
            {"role": "system", "content": "Use tools when they help."},
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather",
                                                  "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "content": "{\"temp_c\": -3}"},
        ],
    },
]
TOOL_FAMILIES = ["qwen3"]


def raise_exception(message):
    raise TemplateError(message)


def strftime_now(fmt):
    return datetime.now().strftime(fmt)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers replaces jinja2's HTML-safe, key-sorting tojson with this.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def token_text(v):
    if isinstance(v, dict):
        return v.get("content")
    return v


def main():
    cache = os.environ.get("PARAPHYM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "paraphym"
    )
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.filters["tojson"] = tojson
    out = {"cases": [], "families": {}, "tools": TOOLS, "tool_cases": TOOL_CASES}
    for c in CASES:
        out["cases"].append(
            {
                "name": c["name"],
                "messages": c["messages"],
                "add_generation_prompt": c.get("add_generation_prompt", True),
                "enable_thinking": c.get("enable_thinking"),
            }
        )
    for fam in FAMILIES:
        with open(os.path.join(cache, "tokenizers", fam, "tokenizer_config.json")) as f:
            config = json.load(f)
        template = env.from_string(config["chat_template"])
        bos, eos = token_text(config.get("bos_token")), token_text(config.get("eos_token"))
        renders = []
        for c in out["cases"]:
            kwargs = {
                "messages": c["messages"],
                "add_generation_prompt": c["add_generation_prompt"],
                "bos_token": bos,
                "eos_token": eos,
            }
            if c["enable_thinking"] is not None:
                kwargs["enable_thinking"] = c["enable_thinking"]
            renders.append(template.render(**kwargs))
        out["families"][fam] = {"bos_token": bos or "", "eos_token": eos or "", "renders": renders}
        if fam in TOOL_FAMILIES:
            out["families"][fam]["tool_renders"] = [
                template.render(messages=c["messages"], tools=TOOLS, add_generation_prompt=True,
                                bos_token=bos, eos_token=eos)
                for c in TOOL_CASES
            ]
    json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
