#!/usr/bin/env bash
# Makes the quantization mixes people download of SmolLM2-135M-Instruct (Q4_K_M,
# Q5_K_M, Q6_K, Q8_0 by default) with llama.cpp's `llama-quantize --allow-requantize`
# from the Q4_1 file (`scripts/fetch/fetch-model.sh`), built from the same vendored sources
# as `llama-bench` (`scripts/bench/build-llamacpp.sh`). Each file is made once, next to the
# Q4_1 file in the model cache; prints one path per type. Rows 576 wide are no whole
# number of 256-value super-blocks, so llama-quantize writes those tensors in its
# fallback types (Q5_0, Q5_1, Q8_0): the files mix block types as Qwen2 and Gemma
# files of these mixes do.
#   usage: scripts/bench/quantize-smollm2.sh [TYPE...]
set -euo pipefail
cd "$(dirname "$0")/../.."
src="$(./scripts/fetch/fetch-model.sh)"
bin="$(./scripts/bench/build-llamacpp.sh llama-quantize)"
[ "$#" -gt 0 ] || set -- Q4_K_M Q5_K_M Q6_K Q8_0
for t in "$@"; do
    out="$(dirname "$src")/smollm2-135m-instruct-$(tr 'A-Z' 'a-z' <<<"$t").gguf"
    if [ ! -s "$out" ]; then
        "$bin/llama-quantize" --allow-requantize "$src" "$out.part" "$t" >&2
        mv "$out.part" "$out"
    fi
    echo "$out"
done
