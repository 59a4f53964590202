#!/usr/bin/env bash
# Speculative decoding beside llama.cpp's, one run, same machine, same files and
# prompts: for each prompt of scripts/bench/prompts/ (a code edit, a RAG answer over its
# sources, a JSON extraction, free prose), greedy decode of N tokens
#   - ours: `llama bench --lookup` and `llama bench --draft-model` (plain and
#     speculative decode tok/s of the same binary, acceptance);
#   - theirs: `llama-lookup` and `llama-speculative-simple` (decode tok/s,
#     acceptance), and `llama-bench` at the prompt's depth for their plain decode.
# The draft model is the target requantized to Q4_0 by `llama-quantize` (cached).
#   usage: scripts/bench/bench-speculative.sh [TARGET.gguf] [N] [R] [THREADS]
#   LLAMA_BIN   our binary (default: target/release/llama, built if missing)
set -euo pipefail
cd "$(dirname "$0")/../.."
model="${1:-$(./scripts/fetch/fetch-qwen2.5.sh)}"
n="${2:-128}"; r="${3:-3}"; threads="${4:-2}"
bin="$(./scripts/bench/build-llamacpp.sh llama-bench llama-lookup llama-speculative-simple llama-quantize)"
ours="${LLAMA_BIN:-target/release/llama}"
if [ -z "${LLAMA_BIN:-}" ]; then
    cargo build --release --quiet
fi
cache="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}/models"
draft="$cache/$(basename "${model%.gguf}")-draft-q4_0.gguf"
if [ ! -f "$draft" ]; then
    "$bin/llama-quantize" --allow-requantize "$model" "$draft" Q4_0 >/dev/null 2>&1
fi
python3 - "$ours" "$bin" "$model" "$draft" "$n" "$r" "$threads" <<'PY'
import json, re, subprocess, sys, pathlib

ours, bin, model, draft, n, r, t = sys.argv[1:]
prompts = sorted(pathlib.Path("scripts/bench/prompts").glob("*.txt"))

def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return p.stdout + p.stderr

def llamacpp(tool, prompt, extra):
    out = run([f"{bin}/{tool}", "-m", model, "-f", str(prompt), "-n", n, "-t", t, "-tb", t,
               "--temp", "0", "-c", "4096", "--spec-draft-n-max", "8"] + extra)
    speed = re.findall(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", out)
    drafted = re.findall(r"n_drafted\s*=\s*(\d+)", out)
    accepted = re.findall(r"n_accept\s*=\s*(\d+)", out)
    return {
        "decode_tok_s": float(speed[-1][2]) if speed else float("nan"),
        "drafted": int(drafted[-1]) if drafted else 0,
        "accepted": int(accepted[-1]) if accepted else 0,
    }

def ours_bench(prompt, extra):
    out = run([ours, "bench", "--model", model, "--prompt-file", str(prompt), "-n", n, "-r", r,
               "--threads", t, "--json"] + extra)
    return json.loads(out.strip().splitlines()[-1])

def pct(a, d):
    return f"{100 * a / d:.0f}%" if d else "-"

print(f"target {model}; draft {draft}; {n} tokens greedy, {t} threads; ours: median of {r}")
print("| prompt | ours plain | ours lookup | x | acc | ours draft | x | acc "
      "| theirs plain | theirs lookup | x | acc | theirs draft | x | acc |")
print("|---" * 15 + "|")
for prompt in prompts:
    n_prompt = len(run([ours, "tokenize", "--model", model, "--text", prompt.read_text()]).strip().strip("[]").split(","))
    lk = ours_bench(prompt, ["--lookup"])
    dm = ours_bench(prompt, ["--draft-model", draft])
    plain = run([f"{bin}/llama-bench", "-m", model, "-p", "0", "-n", n, "-d", str(n_prompt),
                 "-t", t, "-r", "2", "-o", "json"])
    theirs_plain = json.loads(plain[plain.index("["):])[-1]["avg_ts"]
    tl = llamacpp("llama-lookup", prompt, [])
    ts = llamacpp("llama-speculative-simple", prompt, ["-md", draft, "--spec-type", "draft-simple"])
    print(f"| {prompt.stem} | {lk['plain_decode_tok_s']:.1f} | {lk['decode_tok_s']:.1f} | {lk['speedup']:.2f} "
          f"| {pct(lk['accepted'], lk['drafted'])} | {dm['decode_tok_s']:.1f} | {dm['decode_tok_s'] / lk['plain_decode_tok_s']:.2f} "
          f"| {pct(dm['accepted'], dm['drafted'])} | {theirs_plain:.1f} | {tl['decode_tok_s']:.1f} "
          f"| {tl['decode_tok_s'] / theirs_plain:.2f} | {pct(tl['accepted'], tl['drafted'])} "
          f"| {ts['decode_tok_s']:.1f} | {ts['decode_tok_s'] / theirs_plain:.2f} | {pct(ts['accepted'], ts['drafted'])} |")
    sys.stdout.flush()
PY
