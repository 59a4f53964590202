#!/usr/bin/env bash
# The KV cache types side by side, ours beside llama.cpp's, one run, same files:
#   - perplexity of the test passage in windows of CTX (second halves scored) with the
#     cache in f16, q8_0 and q4_0: `llama perplexity --cache-type T` beside
#     `llama-perplexity -ctk T -ctv T -fa on`, each as its gap to its own f16;
#   - decode tok/s at depth DEPTH and peak RSS: `llama bench -d DEPTH --cache-type T`
#     beside `llama-bench -d DEPTH -ctk T -ctv T -fa 1`.
#   usage: scripts/bench/bench-kv.sh [DEPTH=4096] [N=64] [THREADS=2] [MODEL.gguf...]   (decode: medians of 3)
#   LLAMA_BIN   our binary (default: target/release/llama, built if missing)
set -euo pipefail
cd "$(dirname "$0")/../.."
depth="${1:-4096}"; n="${2:-64}"; threads="${3:-2}"
shift $(( $# < 3 ? $# : 3 ))
models=("$@")
if [ "${#models[@]}" -eq 0 ]; then
    models=("$(./scripts/fetch/fetch-model.sh)" "$(./scripts/fetch/fetch-qwen2.5.sh)" "$(./scripts/fetch/fetch-gemma3.sh)")
fi
bin="$(./scripts/bench/build-llamacpp.sh llama-bench llama-perplexity)"
ours="${LLAMA_BIN:-target/release/llama}"
if [ -z "${LLAMA_BIN:-}" ]; then
    cargo build --release --quiet --bin llama
fi
ctx=256
plain="$(mktemp)"
trap 'rm -f "$plain"' EXIT
# llama-perplexity drops one trailing newline; give both the same bytes.
python3 -c 'import sys; t=open(sys.argv[1]).read(); open(sys.argv[2],"w").write(t[:-1] if t.endswith("\n") else t)' \
    tests/fixtures/smollm2/passage.txt "$plain"
python3 - "$ours" "$bin" "$plain" "$ctx" "$depth" "$n" "$threads" "${models[@]}" <<'PY'
import json, os, re, subprocess, sys

ours, bin, text, ctx, depth, n, t, *models = sys.argv[1:]

def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return p.stdout + p.stderr

print(f"passage perplexity in windows of {ctx}; decode of {n} tokens at depth {depth}, {t} threads")
print("| model | cache | ours ppl | vs f16 | theirs ppl | vs f16 | ours decode tok/s | x f16 | ours peak RSS MiB (KV) "
      "| theirs decode tok/s | x f16 | ours / theirs |")
print("|---" * 12 + "|")
for model in models:
    rows = {}
    for ty in ["f16", "q8_0", "q4_0"]:
        o = run([ours, "perplexity", "-m", model, "-f", text, "-c", ctx, "--threads", t, "--cache-type", ty])
        oppl = float(re.findall(r"^perplexity: ([0-9.]+)", o, re.M)[-1])
        th = run([f"{bin}/llama-perplexity", "-m", model, "-f", text, "-c", ctx, "-b", ctx, "-t", t,
                  "-ctk", ty, "-ctv", ty, "-fa", "on"])
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", th)
        tppl = float(m.group(1)) if m else float("nan")
        out = run([ours, "bench", "-m", model, "-p", "1", "-n", n, "-d", depth, "-r", "3",
                   "--threads", t, "--cache-type", ty, "--json"])
        # The report is the one JSON line; notes about the cache go to stderr.
        b = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
        lb = run([f"{bin}/llama-bench", "-m", model, "-p", "0", "-n", n, "-d", depth, "-t", t, "-r", "3",
                  "-ctk", ty, "-ctv", ty, "-fa", "1", "-o", "json"])
        theirs = json.loads(lb[lb.index("["):])[-1]["avg_ts"]
        rows[ty] = (oppl, tppl, b, theirs)
        f = rows["f16"]
        dec, fdec = b["decode_tok_s"], f[2]["decode_tok_s"]
        rss, kv = (b.get("peak_rss_bytes") or 0) / 2**20, (b.get("kv_bytes") or 0) / 2**20
        print(f"| {os.path.basename(model)} | {ty} | {oppl:.4f} | {100 * (oppl / f[0] - 1):+.2f}% | {tppl:.4f} "
              f"| {100 * (tppl / f[1] - 1):+.2f}% | {dec:.1f} | {dec / fdec:.2f} | {rss:.0f} ({kv:.0f} KV) | {theirs:.1f} "
              f"| {theirs / f[3]:.2f} | {dec / theirs:.2f} |", flush=True)
PY
