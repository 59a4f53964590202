"""OpenAI's `openai-agents` SDK (Responses API, its default) against `llama serve`.

Usage: agents_sdk.py BASE_URL MODEL (a model with tool calls, Qwen2.5). An Agent with
one Python function tool answers a question whose answer only the tool knows; the
last line is `all ok`.
"""
import sys

from agents import (
    Agent,
    AgentHooks,
    ModelSettings,
    Runner,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

base, model = sys.argv[1], sys.argv[2]
set_default_openai_client(AsyncOpenAI(base_url=base, api_key="key-agents", max_retries=0, timeout=600), use_for_tracing=False)
set_default_openai_api("responses")
set_tracing_disabled(True)

asked = []


@function_tool
def get_price(item: str) -> str:
    """Looks up the current price of an item in the shop, in EUR.

    Args:
        item: The item's name.
    """
    asked.append(item)
    return "4817 EUR"


class AnswerAfterTools(AgentHooks):
    """Once the tool has run, the next turn answers: a 0.5B model left free to call
    again calls the tool on its own result. Agent authors steer small models this
    way; the SDK's hooks are the place for it."""

    async def on_tool_end(self, context, agent, tool, result):
        agent.model_settings.tool_choice = "none"


agent = Agent(
    name="shop",
    instructions="You answer questions about prices in the shop. Use the get_price tool.",
    model=model,
    tools=[get_price],
    model_settings=ModelSettings(temperature=0, max_tokens=96, tool_choice="required"),
    reset_tool_choice=False,
    hooks=AnswerAfterTools(),
)
result = Runner.run_sync(agent, "What is the price of a widget?", max_turns=4)
print("final output:", result.final_output)
if not asked:
    raise AssertionError(f"the tool was not called: {result.final_output}")
print("ok tool called with", asked)
if "4817" not in str(result.final_output).replace(",", ""):
    raise AssertionError(f"the answer does not use the tool's result: {result.final_output}")
print("ok answer uses the result")
print("all ok")
