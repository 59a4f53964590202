#!/usr/bin/env bash
# The full structured-output campaign: 200 sampled answers (temperature 1.0, fresh
# seeds) per schema of tests/fixtures/schemas on SmolLM2 and on Qwen2.5 0.5B, each
# validated by Python's jsonschema; CI runs 64 on SmolLM2 and 16 on Qwen2.5.
# Then one report per model with the mask's cost beside the decode step's.
set -euo pipefail
cd "$(dirname "$0")/../.."
cache="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}"
LLAMA_STRUCTURED_SAMPLES=200 LLAMA_STRUCTURED_QWEN_SAMPLES=200 \
    cargo test --workspace -j2 --test it -- structured::smollm2 structured::qwen25 --test-threads 1
for model in smollm2-135m-instruct-q4_1.gguf qwen2.5-coder-0.5b-instruct-q4_k_m.gguf; do
    for schema in tests/fixtures/schemas/*.json; do
        ./target/debug/llama generate -m "$cache/models/$model" --chat \
            -p "Answer as JSON." --json-schema "$schema" --temperature 1.0 --json |
            python3 -c '
import json, sys
t = json.load(sys.stdin)["timings"]
mask, step = t["mask_ms_per_token"], t["step_ms_per_token"]
print(f"{sys.argv[1]} {sys.argv[2]}: mask {mask:.3f} ms/token, step {step:.2f} ms/token ({100 * mask / step:.1f}%)")
' "$model" "$(basename "$schema")"
    done
done
