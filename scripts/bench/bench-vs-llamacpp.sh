#!/usr/bin/env bash
# Measures llama.rs (`llama bench`) and llama.cpp (`llama-bench`) on the same GGUF with
# the same protocol: a prompt of P tokens, then N decode steps, R repetitions; at 1 and
# 2 threads; the two systems one right after the other. Prints both, the ratios, and
# each one's peak RSS.
#   usage: scripts/bench/bench-vs-llamacpp.sh [--cache-type T] [--parallel 1,2,4,8,16 |
#                                       --depth D | --suite] [MODEL.gguf] [P] [N] [R]
# With --cache-type T (f16, q8_0, q4_0), `llama bench --cache-type T` beside llama-bench
# `-ctk T -ctv T -fa 1` (llama.cpp needs flash attention for a quantized V cache), each
# printed with the cache type it ran; e.g. `--cache-type q8_0 --depth 4096`.
# With --depth D, both measure on top of D tokens already in the cache (llama-bench's
# `-d`). With --suite, the table of the CPU-speed goal in one run: SmolLM2 Q4_1 and
# its Q4_K_M, Q5_K_M, Q6_K and Q8_0 requantizations (scripts/bench/quantize-smollm2.sh),
# Qwen2.5 0.5B Q4_K_M and Gemma 3 270M Q4_K_M where cached, at P/N (64/128); then
# SmolLM2 Q4_1 with a 2048-token prompt and at depth 2048.
# With --parallel, many sequences at once instead: `llama bench --parallel` beside
# llama.cpp's `llama-batched-bench -npp P -ntg N -npl LIST`: aggregate prefill and
# decode tok/s per parallel count, the ratios, and each one's scaling (aggregate decode
# over its own single-sequence decode).
# The llama.cpp tools are built once by scripts/bench/build-llamacpp.sh.
# llama-bench reports means over the repetitions, `llama bench` medians.
set -euo pipefail
cd "$(dirname "$0")/../.."
parallel=""
depth=0
suite=""
cache_type=""
if [ "${1:-}" = "--cache-type" ]; then
    cache_type="$2"; shift 2
fi
case "${1:-}" in
    --parallel) parallel="$2"; shift 2 ;;
    --depth) depth="$2"; shift 2 ;;
    --suite) suite=1; shift ;;
esac
model="${1:-$(./scripts/fetch/fetch-model.sh)}"
p="${2:-64}"; n="${3:-128}"; r="${4:-5}"
bin="$(./scripts/bench/build-llamacpp.sh llama-bench llama-batched-bench llama-quantize)"
bench="$bin/llama-bench"
batched="$bin/llama-batched-bench"
cargo build --release --quiet
if [ -n "$parallel" ]; then
    python3 - "$batched" "$model" "${2:-64}" "${3:-128}" "${4:-3}" "$parallel" <<'PY'
import json, subprocess, sys

batched, model, p, n, r, npl = sys.argv[1:]
counts = [int(x) for x in npl.split(",")]
print(f"model {model}; {p} prompt tokens and {n} decode steps per sequence")
print(f"{'threads':>7} {'parallel':>8} {'system':<10} {'prefill tok/s':>14} {'decode tok/s':>13} {'scaling':>8}")
for t in ["1", "2"]:
    ours_cmd = ["./target/release/llama", "bench", "--model", model, "-p", p, "-n", n,
                "-r", r, "--threads", t, "--json", "--parallel", npl]
    out = subprocess.run(ours_cmd, check=True, capture_output=True, text=True).stdout
    ours = {o["parallel"]: o for o in map(json.loads, out.splitlines())}
    ctx = str(max(counts) * (int(p) + int(n)) + 256)
    theirs_cmd = [batched, "-m", model, "-c", ctx, "-b", "2048", "-ub", "512",
                  "-npp", p, "-ntg", n, "-npl", npl, "-t", t, "-tb", t,
                  "--output-format", "jsonl"]
    out = subprocess.run(theirs_cmd, check=True, capture_output=True, text=True).stdout
    theirs = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            o = json.loads(line)
            theirs[o["pl"]] = {"prefill_tok_s": o["speed_pp"], "decode_tok_s": o["speed_tg"]}
    for k in counts:
        for name, m, one in [("llama.rs", ours[k], ours[counts[0]]),
                             ("llama.cpp", theirs[k], theirs[counts[0]])]:
            scale = m["decode_tok_s"] / one["decode_tok_s"]
            print(f"{t:>7} {k:>8} {name:<10} {m['prefill_tok_s']:>14.1f} {m['decode_tok_s']:>13.1f} {scale:>8.2f}")
        print(f"{t:>7} {k:>8} {'ratio':<10} "
              f"{ours[k]['prefill_tok_s'] / theirs[k]['prefill_tok_s']:>14.2f} "
              f"{ours[k]['decode_tok_s'] / theirs[k]['decode_tok_s']:>13.2f}")
PY
    exit 0
fi
# Cases: model, prompt, decode, depth.
cases=()
if [ -n "$suite" ]; then
    cache="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}/models"
    q41="$(./scripts/fetch/fetch-model.sh)"
    for f in "$q41" $(./scripts/bench/quantize-smollm2.sh) \
        "$cache/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" "$cache/gemma-3-270m-q4_k_m.gguf"; do
        [ -f "$f" ] && cases+=("$f $p $n 0")
    done
    cases+=("$q41 2048 0 0" "$q41 $p $n 2048")
else
    cases+=("$model $p $n $depth")
fi
python3 - "$bench" "$r" "$cache_type" "${cases[@]}" <<'PY'
import json, os, subprocess, sys

bench, r, cache_type = sys.argv[1:4]
cases = [c.split() for c in sys.argv[4:]]
ours_cache = ["--cache-type", cache_type] if cache_type else []
theirs_cache = ["-ctk", cache_type, "-ctv", cache_type, "-fa", "1"] if cache_type else []
if cache_type:
    print(f"KV cache {cache_type}: llama bench --cache-type {cache_type}; "
          f"llama-bench -ctk {cache_type} -ctv {cache_type} -fa 1")

def peak_rss(cmd):
    # A fresh child per measurement: RUSAGE_CHILDREN is the largest child so far, so
    # measure each system in its own python process.
    code = ("import resource,subprocess,sys;subprocess.run(sys.argv[1:],check=True,"
            "capture_output=True);print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024)")
    return int(subprocess.run([sys.executable, "-c", code, *cmd], check=True,
                              capture_output=True, text=True).stdout)

print(f"{r} repetitions; llama-bench reports means, llama bench medians")
print(f"{'model':<40} {'test':<18} {'threads':>7} {'system':<10} {'prefill tok/s':>14} "
      f"{'decode tok/s':>13} {'peak RSS MiB':>13}")
ratios = []
for model, p, n, d in cases:
    test = f"p{p}" + (f"/n{n}" if n != "0" else "") + (f" @ d{d}" if d != "0" else "")
    name = os.path.basename(model)[:40]
    for t in ["1", "2"]:
        ours_cmd = ["./target/release/llama", "bench", "--model", model, "-p", p, "-n", n,
                    "-d", d, "-r", r, "--threads", t, "--json", *ours_cache]
        ours = json.loads(subprocess.run(ours_cmd, check=True, capture_output=True,
                                         text=True).stdout)
        theirs_cmd = [bench, "-m", model, "-p", p, "-n", n, "-d", d, "-r", r, "-t", t,
                      "-o", "json", *theirs_cache]
        rows = json.loads(subprocess.run(theirs_cmd, check=True, capture_output=True,
                                         text=True).stdout)
        pp = next(x for x in rows if x["n_gen"] == 0)
        tg = next((x for x in rows if x["n_prompt"] == 0), None)
        theirs = {"prefill_tok_s": pp["avg_ts"], "decode_tok_s": tg["avg_ts"] if tg else 0.0,
                  "peak_rss_bytes": peak_rss(theirs_cmd)}
        for system, m in [("llama.rs", ours), ("llama.cpp", theirs)]:
            print(f"{name:<40} {test:<18} {t:>7} {system:<10} {m['prefill_tok_s']:>14.1f} "
                  f"{m['decode_tok_s']:>13.1f} {m['peak_rss_bytes'] / 2**20:>13.1f}")
        pr = ours["prefill_tok_s"] / theirs["prefill_tok_s"]
        dr = ours["decode_tok_s"] / theirs["decode_tok_s"] if tg else float("nan")
        ratios += [pr] + ([dr] if tg else [])
        print(f"{name:<40} {test:<18} {t:>7} {'ratio':<10} {pr:>14.2f} {dr:>13.2f} "
              f"{ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:>13.2f}")
print(f"lowest ratio {min(ratios):.2f}; {sum(x < 1.0 for x in ratios)} of {len(ratios)} below 1.0")
PY
