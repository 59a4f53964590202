"""OpenAI's Responses API through the official `openai` client against `llama serve`.

Usage: responses_client.py BASE_URL MODEL (a model with tool calls, Qwen2.5). Each
check prints `ok <name>`; the last line is `all ok`. Greedy (temperature 0), so the
plain and the streamed answers must be the same text.
"""
import json
import sys

import jsonschema
import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="key-responses", max_retries=0, timeout=600)
other = openai.OpenAI(base_url=base, api_key="key-other", max_retries=0, timeout=600)


def check(name, ok, detail=""):
    if not ok:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}")


def events(stream):
    """The events of a stream: their types in order, text, calls and the final response."""
    out = {"types": [], "text": "", "done_text": None, "args": {}, "args_done": {}, "final": None, "seq": []}
    for e in stream:
        out["types"].append(e.type)
        out["seq"].append(e.sequence_number)
        if e.type == "response.output_text.delta":
            out["text"] += e.delta
        elif e.type == "response.output_text.done":
            out["done_text"] = e.text
        elif e.type == "response.function_call_arguments.delta":
            out["args"][e.item_id] = out["args"].get(e.item_id, "") + e.delta
        elif e.type == "response.function_call_arguments.done":
            out["args_done"][e.item_id] = e.arguments
        elif e.type in ("response.completed", "response.incomplete"):
            out["final"] = e.response
    return out


# Plain, then streamed: the same text.
plain = client.responses.create(model=model, input="Name three colours.", max_output_tokens=16, temperature=0)
check("plain object", plain.object == "response" and plain.id.startswith("resp_"), plain)
check("plain text", len(plain.output_text) > 0, plain)
u = plain.usage
check("plain usage", u.total_tokens == u.input_tokens + u.output_tokens and u.output_tokens <= 16, u)
s = events(client.responses.create(model=model, input="Name three colours.", max_output_tokens=16, temperature=0, stream=True))
check("stream starts", s["types"][:2] == ["response.created", "response.in_progress"], s["types"])
check("stream ends", s["types"][-1] in ("response.completed", "response.incomplete"), s["types"])
check("stream items", "response.output_item.added" in s["types"] and "response.content_part.added" in s["types"], s["types"])
check("stream sequence", s["seq"] == list(range(len(s["seq"]))), s["seq"])
check("stream text equals plain", s["text"] == plain.output_text, (s["text"], plain.output_text))
check("stream done text", s["done_text"] == plain.output_text, s["done_text"])
check("stream final", s["final"].output_text == plain.output_text and s["final"].status == plain.status, s["final"])

# Stored: read back by its key, not by another; deleted.
got = client.responses.retrieve(plain.id)
check("retrieve", got.id == plain.id and got.output_text == plain.output_text, got)
try:
    other.responses.retrieve(plain.id)
    raise AssertionError("another key read a stored response")
except openai.NotFoundError:
    check("another key gets 404", True)
client.responses.delete(plain.id)
try:
    client.responses.retrieve(plain.id)
    raise AssertionError("a deleted response read back")
except openai.NotFoundError:
    check("deleted", True)

# A chain of three turns by previous_response_id: each later turn reuses the
# conversation's cached prefix, and the conversation grows.
INSTRUCTIONS = "You are a helpful assistant. Answer in one short sentence."
turns = ["My name is Ada and I like tea.", "What is my name?", "What do I like to drink?"]
chain, prev = [], None
for i, text in enumerate(turns):
    r = client.responses.create(
        model=model, instructions=INSTRUCTIONS, input=text, previous_response_id=prev,
        max_output_tokens=24, temperature=0,
    )
    chain.append(r)
    prev = r.id
    if i > 0:
        cached = r.usage.input_tokens_details.cached_tokens
        check(f"turn {i + 1} cached tokens", cached > 0, r.usage)
        check(f"turn {i + 1} grows", r.usage.input_tokens > chain[i - 1].usage.input_tokens + chain[i - 1].usage.output_tokens, r.usage)
        check(f"turn {i + 1} previous id", r.previous_response_id == chain[i - 1].id, r)
check("chain remembers", "Ada" in chain[1].output_text, chain[1].output_text)

# A function tool: a call forced by tool_choice required, then its output, then an
# answer that uses the number the model cannot know.
PARAMS = {
    "type": "object",
    "properties": {
        "item": {"type": "string", "description": "The item's name"},
        "currency": {"type": "string", "enum": ["EUR", "USD"]},
    },
    "required": ["item", "currency"],
    "additionalProperties": False,
}
TOOLS = [{
    "type": "function",
    "name": "get_price",
    "description": "Looks up the current price of an item in the shop.",
    "parameters": PARAMS,
    "strict": True,
}]
QUESTION = "What is the price of a widget in EUR?"
r = client.responses.create(
    model=model, input=QUESTION, tools=TOOLS, tool_choice="required", max_output_tokens=96, temperature=0
)
calls = [o for o in r.output if o.type == "function_call"]
check("required call", len(calls) >= 1 and calls[0].name == "get_price", r.output)
jsonschema.validate(json.loads(calls[0].arguments), PARAMS)
check("call arguments valid", True)
check("call ids", calls[0].call_id.startswith("call_") and calls[0].id.startswith("fc_"), calls[0])
answer = client.responses.create(
    model=model,
    previous_response_id=r.id,
    input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "4817 EUR"}],
    tools=TOOLS,
    tool_choice="none",
    max_output_tokens=64,
    temperature=0,
)
check("answer uses the output", "4817" in answer.output_text.replace(",", ""), answer.output_text)
check("answer cached", answer.usage.input_tokens_details.cached_tokens > 0, answer.usage)

# The same round trip without stored state: the whole conversation as items.
items = [{"role": "user", "content": QUESTION}] + [c.model_dump() for c in calls] + [
    {"type": "function_call_output", "call_id": calls[0].call_id, "output": "4817 EUR"}
]
stateless = client.responses.create(
    model=model, input=items, tools=TOOLS, tool_choice="none", store=False, max_output_tokens=64, temperature=0
)
check("stateless round trip", "4817" in stateless.output_text.replace(",", ""), stateless.output_text)
try:
    client.responses.retrieve(stateless.id)
    raise AssertionError("store false was stored")
except openai.NotFoundError:
    check("store false", True)

# Streamed call: argument deltas join to the arguments of the done event and item.
s = events(client.responses.create(
    model=model, input=QUESTION, tools=TOOLS, tool_choice="required", max_output_tokens=96, temperature=0, stream=True
))
check("stream call events", "response.function_call_arguments.delta" in s["types"], s["types"])
item = [o for o in s["final"].output if o.type == "function_call"][0]
check("stream call arguments", s["args"][item.id] == s["args_done"][item.id] == item.arguments == calls[0].arguments, s)

# text.format json_schema: the answer parses and validates.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
r = client.responses.create(
    model=model,
    input="Invent a person: a name and an age.",
    text={"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}},
    max_output_tokens=48,
    temperature=0,
)
jsonschema.validate(json.loads(r.output_text), SCHEMA)
check("json_schema valid", True)
check("format echoed", r.text.format.type == "json_schema", r.text)

# Refusals name the field.
for kwargs, field in [
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
]:
    try:
        client.responses.create(model=model, input="hi", max_output_tokens=4, **kwargs)
        raise AssertionError(f"{field} accepted")
    except openai.BadRequestError as e:
        check(f"refused {field}", e.body.get("param") == field, e.body)
print("all ok")
