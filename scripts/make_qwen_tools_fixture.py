#!/usr/bin/env python3
"""Writes tests/fixtures/qwen2.5/chat_tools.json: Qwen2.5-Coder-0.5B-Instruct's chat template
rendered with tools by HF transformers, as the oracle for our own template rendering.

The tokenizer and its chat template are loaded by transformers straight from the GGUF
(AutoTokenizer.from_pretrained(dir, gguf_file=name)); if that fails, the template string is
read from the GGUF metadata (tokenizer.chat_template) with the `gguf` package and rendered by
transformers' own apply_chat_template machinery on a stand-in tokenizer. Either way the
template string used is checked against the GGUF metadata and stored in the fixture.

Each case is rendered with apply_chat_template(messages, tools=tools, tokenize=False,
add_generation_prompt=True); messages and tools are stored exactly as passed. Cases:
  (a) system + user, with two tools (get_weather, calculator; OpenAI tools format)
  (b) user, assistant with tool_calls (a get_weather call, arguments as a JSON object, as
      transformers' chat templates expect), tool result, with the same tools

Note: transformers' `tojson` filter is json.dumps(ensure_ascii=False) with the default
separators (", " and ": ") and keys in insertion order, which the rendered text reflects.

The GGUF comes from scripts/fetch-qwen2.5.sh. Run (python with transformers + gguf):

    HF_HUB_OFFLINE=1 ~/.cache/llama-rs/oracle-venv/bin/python scripts/make_qwen_tools_fixture.py \\
        [~/.cache/llama-rs/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf]
"""
import copy
import importlib.metadata
import json
import os
import sys

import gguf
import transformers as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GGUF = os.path.expanduser("~/.cache/llama-rs/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
OUT = os.path.join(ROOT, "tests/fixtures/qwen2.5/chat_tools.json")

TOOLS = [
    {"type": "function",
     "function": {
         "name": "get_weather",
         "description": "Get the current weather in a city.",
         "parameters": {
             "type": "object",
             "properties": {
                 "city": {"type": "string", "description": "The city name, e.g. Paris"},
                 "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                          "description": "The temperature unit"},
             },
             "required": ["city"],
         }}},
    {"type": "function",
     "function": {
         "name": "calculator",
         "description": "Evaluate an arithmetic expression.",
         "parameters": {
             "type": "object",
             "properties": {
                 "expression": {"type": "string", "description": "The expression, e.g. 2 * (3 + 4)"},
             },
             "required": ["expression"],
         }}},
]

CASES = [
    [{"role": "system", "content": "You are a helpful assistant with access to tools."},
     {"role": "user", "content": "What's the weather like in Paris today?"}],
    [{"role": "user", "content": "What's the weather like in Paris today, in celsius?"},
     {"role": "assistant", "content": "",
      "tool_calls": [{"id": "call_1", "type": "function",
                      "function": {"name": "get_weather",
                                   "arguments": {"city": "Paris", "unit": "celsius"}}}]},
     {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
      "content": "{\"temperature\": 18, \"condition\": \"partly cloudy\"}"}],
]


def gguf_template(path):
    r = gguf.GGUFReader(path)
    f = r.fields["tokenizer.chat_template"]
    return bytes(f.parts[f.data[0]]).decode("utf-8")


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_GGUF
    meta_template = gguf_template(path)
    try:
        tok = T.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        how = ("tokenizer and chat template loaded by transformers from the GGUF "
               "(AutoTokenizer.from_pretrained(dir, gguf_file=name))")
        assert tok.chat_template == meta_template, "transformers' template differs from the GGUF metadata"
    except Exception as e:  # fall back: the metadata template on a stand-in tokenizer
        print(f"AutoTokenizer from GGUF failed ({e!r}); using the metadata template", file=sys.stderr)
        from tokenizers import Tokenizer, models
        tok = T.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")))
        tok.chat_template = meta_template
        how = ("chat template read from the GGUF metadata (tokenizer.chat_template) with the gguf "
               "package, rendered by transformers' apply_chat_template on a stand-in tokenizer")

    cases = []
    for messages in CASES:
        msgs, tools = copy.deepcopy(messages), copy.deepcopy(TOOLS)
        rendered = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
        assert msgs == messages and tools == TOOLS, "apply_chat_template changed its inputs"
        cases.append({"messages": messages, "tools": TOOLS, "add_generation_prompt": True,
                      "rendered": rendered})
        print(rendered)
        print("-" * 60)

    notes = (f"Made by scripts/make_qwen_tools_fixture.py from {os.path.basename(path)} "
             f"(Qwen2.5-Coder-0.5B-Instruct Q4_K_M): {how}; rendered with "
             f"apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True). "
             f"transformers {T.__version__}, gguf {importlib.metadata.version('gguf')}"
             f"; tojson is json.dumps(ensure_ascii=False) with default separators, keys in insertion "
             f"order. Tool-call arguments are a JSON object (an OpenAI-style JSON string would be "
             f"encoded again by the template's tojson).")
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"notes": notes, "chat_template": meta_template, "cases": cases}, f,
                  indent=1, ensure_ascii=False)
        f.write("\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
