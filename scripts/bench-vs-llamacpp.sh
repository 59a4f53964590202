#!/usr/bin/env bash
# Measures llama.rs (`llama bench`) and llama.cpp (through llama-cpp-python, which
# compiles llama.cpp from source) on the same GGUF with the same protocol: a prompt of
# P tokens, then N greedy decode steps, R repetitions, medians; at 1 and 2 threads; one
# system after the other. Prints both and the ratios.
#   usage: scripts/bench-vs-llamacpp.sh [MODEL.gguf] [P] [N] [R]
# The first run builds llama.cpp into ~/.cache/llama-rs/llamacpp-venv (about 25 minutes
# on two cores).
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-$(./scripts/fetch-model.sh)}"
p="${2:-64}"; n="${3:-128}"; r="${4:-5}"
venv="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}/llamacpp-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    python3 -m venv "$venv"
    CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install --quiet llama-cpp-python==0.3.36
fi
cargo build --release --quiet
for t in 1 2; do
    ours="$(./target/release/llama bench --model "$model" -p "$p" -n "$n" -r "$r" --threads "$t" --json)"
    theirs="$("$venv/bin/python" - "$model" "$p" "$n" "$r" "$t" <<'PY'
import json, resource, statistics, sys, time
import llama_cpp
model, p, n, r, t = sys.argv[1], *map(int, sys.argv[2:])
llm = llama_cpp.Llama(model_path=model, n_ctx=p + n + 8, n_threads=t, n_threads_batch=t, n_batch=p, verbose=False)
vocab = llm.n_vocab()
prompt = [(i * 2654435761 + 12345) % vocab for i in range(p)]
pp, tg, ttft = [], [], []
for rep in range(r + 1):
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    tok = int(llm.scores[llm.n_tokens - 1].argmax())
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        llm.eval([tok])
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
    gen = time.perf_counter() - start
    if rep:
        pp.append(p / first); tg.append(n / gen); ttft.append(first * 1e3)
print(json.dumps({"prefill_tok_s": statistics.median(pp), "decode_tok_s": statistics.median(tg),
                  "ttft_ms": statistics.median(ttft),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
PY
)"
    python3 - "$t" "$ours" "$theirs" <<'PY'
import json, sys
t, ours, theirs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"threads {t}")
print(f"  {'system':<10} {'prefill tok/s':>14} {'decode tok/s':>13} {'ttft ms':>9} {'peak RSS MiB':>13}")
for name, m in [("llama.rs", ours), ("llama.cpp", theirs)]:
    print(f"  {name:<10} {m['prefill_tok_s']:>14.1f} {m['decode_tok_s']:>13.1f} {m['ttft_ms']:>9.1f} {m['peak_rss_bytes'] / 2**20:>13.1f}")
print(f"  ratio      {ours['prefill_tok_s'] / theirs['prefill_tok_s']:>14.2f} {ours['decode_tok_s'] / theirs['decode_tok_s']:>13.2f}")
PY
done
