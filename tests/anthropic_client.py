"""Anthropic's Messages API through the official `anthropic` client against `llama serve`.

Usage: anthropic_client.py BASE_URL MODEL (a model with tool calls, Qwen2.5). Each
check prints `ok <name>`; the last line is `all ok`. The client has no way to ask for
greedy decoding other than `temperature`, sent here through `extra_body` as any
extension would be; greedy, so streamed and plain answers are the same text.
"""
import json
import sys

import anthropic
import jsonschema

base, model = sys.argv[1], sys.argv[2]
client = anthropic.Anthropic(base_url=base, api_key="key-anthropic", max_retries=0, timeout=600)
GREEDY = {"temperature": 0}


def check(name, ok, detail=""):
    if not ok:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}")


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
plain = client.messages.create(
    model=model, max_tokens=24, system="You are a geography teacher.", messages=QUESTION, extra_body=GREEDY
)
check("message", plain.type == "message" and plain.role == "assistant" and plain.id.startswith("msg_"), plain)
check("text block", plain.content[0].type == "text" and len(plain.content[0].text) > 0, plain)
check("stop reason", plain.stop_reason in ("end_turn", "max_tokens"), plain)
check("usage", plain.usage.input_tokens > 0 and 0 < plain.usage.output_tokens <= 24, plain.usage)
text = plain.content[0].text

# Streamed: the same text, and the final message assembled from the events.
with client.messages.stream(
    model=model, max_tokens=24, system="You are a geography teacher.", messages=QUESTION, extra_body=GREEDY
) as stream:
    streamed = "".join(stream.text_stream)
    final = stream.get_final_message()
check("stream text equals plain", streamed == text, (streamed, text))
check("stream final", final.content[0].text == text and final.stop_reason == plain.stop_reason, final)
check("stream usage", final.usage.output_tokens == plain.usage.output_tokens, final.usage)

# The same prompt again: its prefix comes from the cache.
again = client.messages.create(
    model=model, max_tokens=24, system="You are a geography teacher.", messages=QUESTION, extra_body=GREEDY
)
check("cache read", again.usage.cache_read_input_tokens > 0, again.usage)
total = again.usage.input_tokens + again.usage.cache_read_input_tokens

# count_tokens: the prompt's tokens, as generation counts them.
count = client.messages.count_tokens(model=model, system="You are a geography teacher.", messages=QUESTION)
check("count_tokens", count.input_tokens == total, (count, again.usage))

# A stop sequence: the text ends before it, and the response says which.
words = text.split()
if len(words) >= 3:
    stop = words[2]
    cut = client.messages.create(
        model=model, max_tokens=24, system="You are a geography teacher.", messages=QUESTION,
        stop_sequences=["\u2603", stop], extra_body=GREEDY,
    )
    check("stop_sequence", cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop, cut)
    check("stop text", text.startswith(cut.content[0].text) and stop not in cut.content[0].text, cut)

# Tools: tool_use forced by tool_choice any, its input valid, then the tool_result and
# an answer that uses the number the model cannot know.
PARAMS = {
    "type": "object",
    "properties": {
        "item": {"type": "string", "description": "The item's name"},
        "currency": {"type": "string", "enum": ["EUR", "USD"]},
    },
    "required": ["item", "currency"],
    "additionalProperties": False,
}
TOOLS = [{"name": "get_price", "description": "Looks up the current price of an item in the shop.", "input_schema": PARAMS}]
ASK = [{"role": "user", "content": "What is the price of a widget in EUR?"}]
r = client.messages.create(
    model=model, max_tokens=96, tools=TOOLS, tool_choice={"type": "any"}, messages=ASK, extra_body=GREEDY
)
uses = [b for b in r.content if b.type == "tool_use"]
check("tool_use", r.stop_reason == "tool_use" and len(uses) >= 1 and uses[0].name == "get_price", r)
check("tool_use id", uses[0].id.startswith("toolu_"), uses[0])
jsonschema.validate(uses[0].input, PARAMS)
check("tool_use input valid", True)
follow = ASK + [
    {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "4817 EUR"} for u in uses]},
]
answer = client.messages.create(
    model=model, max_tokens=64, tools=TOOLS, tool_choice={"type": "none"}, messages=follow, extra_body=GREEDY
)
answer_text = "".join(b.text for b in answer.content if b.type == "text")
check("answer uses the result", "4817" in answer_text.replace(",", ""), answer)
check("answer has no tool_use", all(b.type == "text" for b in answer.content), answer)

# Streamed tool use: input_json deltas assemble to the same input.
with client.messages.stream(
    model=model, max_tokens=96, tools=TOOLS, tool_choice={"type": "any"}, messages=ASK, extra_body=GREEDY
) as stream:
    kinds = [e.type for e in stream]
    final = stream.get_final_message()
check("stream events", kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_delta" in kinds, kinds)
s_uses = [b for b in final.content if b.type == "tool_use"]
check("stream tool_use", final.stop_reason == "tool_use" and s_uses and s_uses[0].input == uses[0].input, final)

# Refusals in Anthropic's error shape.
try:
    client.messages.create(
        model=model, max_tokens=8,
        messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_nothing", "content": "1"}]}],
        tools=TOOLS,
    )
    raise AssertionError("a tool_result without its tool_use accepted")
except anthropic.BadRequestError as e:
    check("tool_result without tool_use", e.body["type"] == "error" and "toolu_nothing" in e.body["error"]["message"], e.body)
print("all ok")
