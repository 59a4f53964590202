#!/usr/bin/env bash
# A Python virtual environment with the official `openai` and `anthropic` clients,
# OpenAI's `openai-agents` SDK, Selenium and jsonschema (the validator of the
# structured-output tests), for the server's client and browser tests
# (tests/it/serve_cli.rs runs tests/openai_client.py and tests/webui_test.py with it,
# tests/it/serve_dialects.rs the Responses, Anthropic and agents scripts). Prints the
# interpreter's path.
set -euo pipefail
cache="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}"
venv="$cache/venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
fi
if ! "$venv/bin/python" -c 'import openai, anthropic, agents, selenium, jsonschema' 2>/dev/null; then
    "$venv/bin/pip" install --quiet 'openai==2.*' 'anthropic==0.*' 'openai-agents==0.*' \
        'selenium==4.*' 'jsonschema==4.*' >&2
fi
echo "$venv/bin/python"
