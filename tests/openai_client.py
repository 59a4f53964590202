"""The official `openai` Python client, unmodified, against `llama serve`.

Run by tests/it/serve_cli.rs with the server's base URL and model name:
    python tests/openai_client.py http://127.0.0.1:PORT/v1 MODEL
Each check prints one line; any failure raises (non-zero exit).
"""
import math
import sys

import json
import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}")


# Models.
models = client.models.list()
check("models", [m.id for m in models.data] == [model], models)

# Chat, whole and streamed: the same text.
messages = [{"role": "user", "content": "What is the capital of France?"}]
whole = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
text = whole.choices[0].message.content
check("chat", whole.object == "chat.completion" and len(text) > 0, whole)
check("chat usage", whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens)
pieces, finish, usage = [], None, None
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=20, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        pieces.append(c.delta.content or "")
        finish = c.finish_reason or finish
check("chat stream", "".join(pieces) == text, ("".join(pieces), text))
check("chat stream finish", finish == whole.choices[0].finish_reason, finish)
check("chat stream usage", usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage)

# Completions.
comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
check("completions", comp.object == "text_completion" and len(comp.choices[0].text) > 0, comp)
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=12, temperature=0, stream=True
    )
    if c.choices
)
check("completions stream", streamed == comp.choices[0].text, (streamed, comp.choices[0].text))

# Seeds: the same seed, the same text.
def sampled(seed):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Invent a word."}],
        max_tokens=16, temperature=1.0, seed=seed,
    )
    return r.choices[0].message.content

a, b = sampled(1234), sampled(1234)
check("seed", a == b, (a, b))
others = {sampled(s) for s in (1, 2, 3)}
check("other seeds", len(others | {a}) > 1, others)

# Stop strings.
full = comp.choices[0].text
words = full.split()
if len(words) >= 2:
    stop = words[1]
    cut = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=12, temperature=0, stop=[stop]
    )
    got = cut.choices[0].text
    check("stop", stop not in got and full.startswith(got) and cut.choices[0].finish_reason == "stop", got)

# Log-probabilities.
lp = client.chat.completions.create(
    model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
)
content = lp.choices[0].logprobs.content
check("logprobs", len(content) == lp.usage.completion_tokens, len(content))
for t in content:
    check("logprob", t.logprob <= 0 and t.top_logprobs[0].token == t.token and len(t.top_logprobs) == 2, t)
    check("probability", math.exp(t.logprob) <= 1.0)
clp = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
check("completion logprobs", len(clp.choices[0].logprobs.tokens) == clp.usage.completion_tokens, clp.choices[0].logprobs)

# n = 2.
two = client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=1.0, seed=9, n=2
)
check("n", sorted(c.index for c in two.choices) == [0, 1], two.choices)

# Errors arrive as the client's own exception types, with our messages.
try:
    client.chat.completions.create(model=model, messages=[], max_tokens=4)
    raise AssertionError("empty messages accepted")
except openai.BadRequestError as e:
    check("bad request", e.status_code == 400 and "messages" in str(e), e)
# A schema is a guarantee: the answer parses and has the shape asked for.
schema = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "mood": {"enum": ["happy", "sad"]},
    },
    "required": ["name", "mood"],
    "additionalProperties": False,
}
shaped = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=64,
    temperature=1.0,
    seed=3,
    response_format={"type": "json_schema", "json_schema": {"name": "p", "strict": True, "schema": schema}},
)
value = json.loads(shaped.choices[0].message.content)
check(
    "json_schema",
    set(value) == {"name", "mood"} and value["mood"] in ("happy", "sad") and len(value["name"]) <= 12,
    value,
)
try:
    client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=4,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": {"type": "string", "format": "weird-format"}},
        },
    )
    raise AssertionError("an unenforceable schema accepted")
except openai.BadRequestError as e:
    check(
        "unenforceable schema",
        "weird-format" in str(e) and e.body.get("param") == "response_format.json_schema.schema",
        e.body,
    )
try:
    client.completions.create(model=model, prompt="word " * 5000, max_tokens=4)
    raise AssertionError("a prompt past the context accepted")
except openai.BadRequestError as e:
    check("context", e.code == "context_length_exceeded" and "context" in str(e), e)
try:
    client.models.retrieve("no-such-model")
    raise AssertionError("an unknown model found")
except openai.NotFoundError as e:
    check("not found", e.status_code == 404, e)
print("all ok")
