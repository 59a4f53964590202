#!/usr/bin/env bash
# `llama agent` on 20 arithmetic word problems through the calculator tool: prints each
# task, the answer, the calls made, and the success rate (the answer holds the exact
# result, thousands separators ignored). MODEL defaults to Qwen2.5-Coder 0.5B Q4_K_M
# (scripts/fetch/fetch-qwen2.5.sh); LLAMA defaults to the debug binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
cache="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}"
model="${MODEL:-$cache/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}"
llama="${LLAMA:-./target/debug/llama}"
[ -f "$model" ] || { echo "error: no model at $model: run scripts/fetch/fetch-qwen2.5.sh" >&2; exit 1; }
tasks=(
    "What is 1234 * 5678?|7006652"
    "What is 98765 + 43210?|141975"
    "Compute 1000000 - 999999 * 3.|-1999997"
    "What is 2 to the power of 20?|1048576"
    "A box holds 24 eggs. How many eggs are in 137 boxes?|3288"
    "What is (17 + 25) * (13 - 4)?|378"
    "Divide 144 by 12, then add 7. What is the result?|19"
    "What is 7 percent of 2500?|175"
    "What is 123456789 modulo 97?|39"
    "A train travels 87 km per hour for 13 hours. How far does it go in km?|1131"
    "What is 3.5 * 4.2?|14.7"
    "What is 55555 / 5?|11111"
    "What is 999 * 999?|998001"
    "Add 18, 27, 36 and 45.|126"
    "What is 15 squared minus 8 cubed?|-287"
    "A shop sells pens at 3 dollars each. How much do 412 pens cost in dollars?|1236"
    "What is 65536 divided by 256?|256"
    "What is 31 * 37 * 41?|47027"
    "What is 100000 minus 1?|99999"
    "What is (250 - 17) * 4 + 9?|941"
)
ok=0
for t in "${tasks[@]}"; do
    task="${t%|*}"
    want="${t##*|}"
    out=$("$llama" agent --model "$model" --tools calc --json "$task" 2>/dev/null || true)
    verdict=$(python3 - "$want" "$out" <<'PY'
import json, re, sys
want, out = sys.argv[1], sys.argv[2]
try:
    run = json.loads(out)
except ValueError:
    print("FAIL (no report)"); sys.exit()
answer = (run.get("answer") or "").replace(",", "")
calls = [s["arguments"] for s in run["steps"] if s["kind"] == "tool"]
found = re.search(r"(?<![\d.])" + re.escape(want) + r"(?![\d])", answer)
print(("ok  " if found else "FAIL") + f" | {answer[:80]!r} | calls {calls} | {run['stop']}")
PY
)
    [[ "$verdict" == ok* ]] && ok=$((ok + 1))
    echo "$task = $want: $verdict"
done
echo "solved $ok of ${#tasks[@]}"
