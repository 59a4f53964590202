#!/usr/bin/env bash
# GPU speed on this machine: checks the wgpu adapters, then runs `llama bench --backend
# wgpu` on each cached model (GGUF block weights on the device): prefill, decode, decode
# at depth 2048, and 8 sequences decoding in parallel. Prints tok/s and, for decode,
# the fraction of the card's memory-bandwidth roofline: the bytes one decode step must
# read (the weights' tensor bytes, plus the f16 KV cache at that depth) times tok/s,
# over the card's bandwidth, and the kernels one decode token launches.
#
#   usage: scripts/bench/device-bench.sh [--bin PATH] [--bandwidth GBPS] [--quick] [--device I]
#                                  [MODEL.gguf...]
#
# --bin PATH        the llama binary (default target/release/llama, built if missing)
# --bandwidth GBPS  the card's memory bandwidth in GB/s (default: looked up from the
#                   adapter's name; unknown cards print no roofline fraction)
# --quick           p64/n32, one repetition, no depth run: a smoke of the whole script
# --device I        the adapter's index in `llama devices` (default: the best)
# Models default to every .gguf in ~/.cache/llama-rs/models (scripts/fetch/fetch-*.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=target/release/llama
bandwidth=""
quick=""
device=()
models=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) bin="$2"; shift 2 ;;
        --bandwidth) bandwidth="$2"; shift 2 ;;
        --quick) quick=1; shift ;;
        --device) device=(--device "$2"); shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; exit 2 ;;
        *) models+=("$1"); shift ;;
    esac
done
if [ ! -x "$bin" ]; then
    cargo build --release --quiet --bin llama
fi
if [ ${#models[@]} -eq 0 ]; then
    cache="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}/models"
    for m in "$cache"/*.gguf; do [ -f "$m" ] && models+=("$m"); done
fi
[ ${#models[@]} -gt 0 ] || { echo "error: no models: run scripts/fetch/fetch-model.sh" >&2; exit 1; }

echo "## adapters"
if ! "$bin" devices; then
    echo "error: no wgpu adapter on this machine" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
adapter="$("$bin" devices | sed -n "$(( ${device[1]:-0} + 1 ))p")"
if [ -z "$bandwidth" ]; then
    # Published peak memory bandwidth, GB/s.
    case "$adapter" in
        *H200*) bandwidth=4800 ;;
        *H100*SXM*|*H100\ 80GB\ HBM3*) bandwidth=3350 ;;
        *H100*) bandwidth=2000 ;;
        *A100*80GB*) bandwidth=2039 ;;
        *A100*) bandwidth=1555 ;;
        *L40S*|*L40*) bandwidth=864 ;;
        *A10G*) bandwidth=600 ;;
        *"RTX 4090"*) bandwidth=1008 ;;
        *"RTX 3090"*) bandwidth=936 ;;
        *"RTX 4080"*) bandwidth=717 ;;
        *T4*) bandwidth=320 ;;
        *"Apple M1 Max"*|*"Apple M2 Max"*|*"Apple M3 Max"*) bandwidth=400 ;;
        *"Apple M1 Pro"*|*"Apple M2 Pro"*) bandwidth=200 ;;
        *) bandwidth="" ;;
    esac
fi
echo "adapter: $adapter"
echo "memory bandwidth: ${bandwidth:-unknown} GB/s"

if [ -n "$quick" ]; then
    p=64; n=32; r=1; depths=(0)
else
    p=512; n=128; r=3; depths=(0 2048)
fi
echo
echo "| model | test | tok/s | GB/s read | of roofline | launches/token |"
echo "|---|---|---:|---:|---:|---:|"
for m in "${models[@]}"; do
    info="$("$bin" inspect --model "$m")"
    name="$(basename "$m")"
    # Tensor bytes (MiB/GiB as inspect prints them) and the KV cache's shape.
    tensor_bytes="$(echo "$info" | python3 -c '
import re, sys
t = sys.stdin.read()
v, unit = re.search(r"tensor bytes: ([0-9.]+) (KiB|MiB|GiB)", t).groups()
print(int(float(v) * {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]))')"
    kv_row="$(echo "$info" | python3 -c '
import re, sys
t = sys.stdin.read()
layers = int(re.search(r"layers: (\d+)", t).group(1))
kv = int(re.search(r"\(kv (\d+)\)", t).group(1))
hd = int(re.search(r"head_dim: (\d+)", t).group(1))
print(2 * layers * kv * hd * 2)')"
    for d in "${depths[@]}"; do
        out="$("$bin" bench --backend wgpu "${device[@]}" -m "$m" -p "$p" -n "$n" -r "$r" -d "$d" --json)"
        python3 - "$out" "$name" "$d" "$tensor_bytes" "$kv_row" "${bandwidth:-0}" <<'PY'
import json, sys
out, name, depth, tensor_bytes, kv_row, bw = sys.argv[1:]
r = json.loads(out)
depth, tensor_bytes, kv_row, bw = int(depth), int(tensor_bytes), int(kv_row), float(bw)
at = f" @ d{depth}" if depth else ""
print(f"| {name} | pp{r['n_prompt']}{at} | {r['prefill_tok_s']:.1f} | - | - | - |")
# Each decode step reads every weight and the cache up to its position (the middle
# of the decoded tokens, on average).
per_token = tensor_bytes + kv_row * (depth + r["n_prompt"] + r["n_gen"] // 2)
tps = r["decode_tok_s"]
gbs = tps * per_token / 1e9
frac = f"{gbs / bw:.1%}" if bw else "-"
launches = r.get("launches_per_token") or "-"
print(f"| {name} | tg{r['n_gen']}{at} | {tps:.1f} | {gbs:.1f} | {frac} | {launches} |")
PY
    done
    out="$("$bin" bench --backend wgpu "${device[@]}" -m "$m" -p "$p" -n "$n" -r 1 --parallel 8 --json)"
    python3 - "$out" "$name" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
name, n = sys.argv[2], r["parallel"]
print(f"| {name} | {n} sequences, pp{r['n_prompt']} | {r['prefill_tok_s']:.1f} | - | - | - |")
print(f"| {name} | {n} sequences, tg{r['n_gen']} | {r['decode_tok_s']:.1f} | - | - | - |")
PY
done
