#!/usr/bin/env bash
# Perplexity of each quantized SmolLM2 file (Q4_1 as fetched, and the Q4_K_M, Q5_K_M,
# Q6_K and Q8_0 requantizations of scripts/bench/quantize-smollm2.sh) on the test passage,
# ours (`llama perplexity`, the block-weight path) beside llama.cpp's
# `llama-perplexity` on the same file and text, in the same 128-token windows (second
# halves scored, as llama-perplexity scores them). Prints both and their relative gap.
#   usage: scripts/bench/quant-fidelity.sh [TEXT] [CTX]
set -euo pipefail
cd "$(dirname "$0")/../.."
text="${1:-tests/fixtures/smollm2/passage.txt}"
ctx="${2:-128}"
bin="$(./scripts/bench/build-llamacpp.sh llama-perplexity)"
cargo build --release --quiet
# llama-perplexity drops one trailing newline; give both the same bytes.
plain="$(mktemp)"
trap 'rm -f "$plain"' EXIT
python3 -c 'import sys; t=open(sys.argv[1]).read(); open(sys.argv[2],"w").write(t[:-1] if t.endswith("\n") else t)' "$text" "$plain"
printf '%-40s %12s %12s %8s\n' model llama.rs llama.cpp gap
for f in "$(./scripts/fetch/fetch-model.sh)" $(./scripts/bench/quantize-smollm2.sh); do
    ours="$(./target/release/llama perplexity -m "$f" -f "$plain" -c "$ctx" 2>/dev/null | tail -1 | awk '{print $2}')"
    theirs="$("$bin/llama-perplexity" -m "$f" -f "$plain" -c "$ctx" -b "$ctx" 2>&1 |
        sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p')"
    python3 -c 'import sys,os; o,t=map(float,sys.argv[2:]); print(f"{os.path.basename(sys.argv[1]):<40} {o:>12.4f} {t:>12.4f} {100*(o-t)/t:>+7.2f}%")' "$f" "$ours" "$theirs"
done
