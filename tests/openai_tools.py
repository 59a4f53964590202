"""Tool calling through the official `openai` client against `llama serve` (Qwen2.5).

Usage: openai_tools.py BASE_URL MODEL. Each check prints `ok <name>`; the last line is
`all ok`. The tool's result is a number the model cannot know, so an answer that holds
it used the result. Greedy, so the run is the same every time.
"""
import json
import sys

import jsonschema
import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)

PARAMS = {
    "type": "object",
    "properties": {
        "item": {"type": "string", "description": "The item's name"},
        "currency": {"type": "string", "enum": ["EUR", "USD"]},
    },
    "required": ["item", "currency"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_price",
            "description": "Looks up the current price of an item in the shop.",
            "parameters": PARAMS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_stock",
            "description": "Looks up how many of an item the shop has.",
            "parameters": {
                "type": "object",
                "properties": {"item": {"type": "string"}},
                "required": ["item"],
            },
        },
    },
]
PRICE = "4817"
QUESTION = [{"role": "user", "content": "What is the price of a widget in EUR? Use the tools."}]


def check(name, ok, detail=""):
    if not ok:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}")


def valid_call(name, call):
    check(f"{name} type", call.type == "function", call)
    check(f"{name} id", bool(call.id), call)
    check(f"{name} function", call.function.name == "get_price", call)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMS)
    check(f"{name} arguments", True)
    return args


def result_messages(assistant_calls, content=None):
    """The assistant's calls and each call's result, as a client sends them back."""
    out = [
        {
            "role": "assistant",
            "content": content,
            "tool_calls": [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in assistant_calls
            ],
        }
    ]
    for c in assistant_calls:
        out.append({"role": "tool", "tool_call_id": c["id"], "content": f"{PRICE} EUR"})
    return out


# Non-streaming: the call, then the answer that uses its result.
first = client.chat.completions.create(
    model=model, messages=QUESTION, tools=TOOLS, tool_choice="auto", max_tokens=128, temperature=0
)
choice = first.choices[0]
check("finish tool_calls", choice.finish_reason == "tool_calls", choice)
check("one call", choice.message.tool_calls and len(choice.message.tool_calls) >= 1, choice)
valid_call("call", choice.message.tool_calls[0])
calls = [
    {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
    for c in choice.message.tool_calls
]
followed = QUESTION + result_messages(calls, choice.message.content)
answer = client.chat.completions.create(
    model=model, messages=followed, tools=TOOLS, tool_choice="none", max_tokens=64, temperature=0
)
text = answer.choices[0].message.content or ""
check("answer has no calls", not answer.choices[0].message.tool_calls, answer)
check("answer uses the result", PRICE in text.replace(",", ""), text)

# Streaming: id and name once per call, arguments in pieces that join to JSON.
stream = client.chat.completions.create(
    model=model, messages=QUESTION, tools=TOOLS, tool_choice="auto", max_tokens=128, temperature=0, stream=True
)
streamed = {}
finish = None
for chunk in stream:
    if not chunk.choices:
        continue
    delta = chunk.choices[0].delta
    for tc in delta.tool_calls or []:
        entry = streamed.setdefault(tc.index, {"id": None, "name": None, "arguments": "", "ids": 0})
        if tc.id:
            entry["id"] = tc.id
            entry["ids"] += 1
        if tc.function and tc.function.name:
            entry["name"] = tc.function.name
        if tc.function and tc.function.arguments:
            entry["arguments"] += tc.function.arguments
    finish = chunk.choices[0].finish_reason or finish
check("stream finish tool_calls", finish == "tool_calls", finish)
check("stream calls", 0 in streamed, streamed)
check("stream id once", all(e["ids"] == 1 for e in streamed.values()), streamed)
s_calls = [streamed[i] for i in sorted(streamed)]
check("stream name", s_calls[0]["name"] == "get_price", s_calls)
jsonschema.validate(json.loads(s_calls[0]["arguments"]), PARAMS)
check("stream arguments", True)
stream = client.chat.completions.create(
    model=model,
    messages=QUESTION + result_messages(s_calls),
    tools=TOOLS,
    tool_choice="none",
    max_tokens=64,
    temperature=0,
    stream=True,
)
text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
check("stream answer uses the result", PRICE in text.replace(",", ""), text)

# `required` and a named function force a call; without parallel calls, one.
for choice_value, name in [
    ("required", "required"),
    ({"type": "function", "function": {"name": "get_stock"}}, "named"),
]:
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hello there!"}],
        tools=TOOLS,
        tool_choice=choice_value,
        parallel_tool_calls=False,
        max_tokens=96,
        temperature=0,
    )
    m = r.choices[0].message
    check(f"{name} calls", m.tool_calls is not None and len(m.tool_calls) == 1, m)
    if name == "named":
        check("named function", m.tool_calls[0].function.name == "get_stock", m)
    json.loads(m.tool_calls[0].function.arguments)

# A choice naming a function that is not offered is refused.
try:
    client.chat.completions.create(
        model=model,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "launch_rocket"}},
        max_tokens=8,
    )
    raise AssertionError("an unknown tool accepted")
except openai.BadRequestError as e:
    check("unknown tool", "launch_rocket" in str(e), e)
print("all ok")
