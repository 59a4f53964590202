#!/usr/bin/env bash
# A Python virtual environment with the official `openai` client, Selenium and
# jsonschema (the validator of the structured-output tests), for the server's client
# and browser tests (tests/it/serve_cli.rs runs tests/openai_client.py
# and tests/webui_test.py with it). Prints the interpreter's path.
set -euo pipefail
cache="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}"
venv="$cache/venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
fi
if ! "$venv/bin/python" -c 'import openai, selenium, jsonschema' 2>/dev/null; then
    "$venv/bin/pip" install --quiet 'openai==2.*' 'selenium==4.*' 'jsonschema==4.*' >&2
fi
echo "$venv/bin/python"
