#!/usr/bin/env bash
# Serving speed: `llama serve` against llama.cpp's `llama-server` (built by
# scripts/bench/build-llamacpp.sh from the same vendored sources, continuous batching on), on the
# same GGUF, one right after the other. At each concurrency C (default 1,4,8,16) both
# servers run with --parallel C / -np C; C clients each send R streaming chat requests
# (max_tokens N, temperature 0, ignore_eos so both generate exactly N tokens).
# Prints time to first token (p50, p99), per-stream decode tok/s (median) and
# aggregate generated tok/s, and the ratio of aggregates.
#   usage: scripts/bench/bench-serve.sh [MODEL.gguf] [CONCURRENCY=1,4,8,16] [N=64] [R=4] [THREADS=2]
set -euo pipefail
cd "$(dirname "$0")/../.."
model="${1:-$(./scripts/fetch/fetch-model.sh)}"
levels="${2:-1,4,8,16}"; n="${3:-64}"; r="${4:-4}"; threads="${5:-2}"
server="$(./scripts/bench/build-llamacpp.sh llama-server)/llama-server"
cargo build --release --quiet --bin llama
python3 - "$server" "$model" "$levels" "$n" "$r" "$threads" <<'PY'
import http.client, json, statistics, subprocess, sys, threading, time, socket

server, model, levels, n, r, threads = sys.argv[1:]
n, r = int(n), int(r)
levels = [int(x) for x in levels.split(",")]
ctx = 1024

sys.path.insert(0, "scripts/bench")
from serverlib import free_port, wait_ready

def one(port, prompt):
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": n,
                       "temperature": 0, "stream": True, "ignore_eos": True,
                       "stream_options": {"include_usage": True}})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = c.getresponse()
    first = last = None; tokens = 0; usage = None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if ev.get("usage"):
            usage = ev["usage"]["completion_tokens"]
        for ch in ev.get("choices", []):
            if ch.get("delta", {}).get("content"):
                now = time.perf_counter()
                first = first or now; last = now; tokens += 1
    gen = usage or tokens
    return {"ttft": (first or time.perf_counter()) - t0, "tokens": gen,
            "decode": (gen - 1) / (last - first) if first and last and last > first else 0.0}

def run(port, conc):
    results = []; lock = threading.Lock()
    def client(k):
        for j in range(r):
            res = one(port, f"Request {k}-{j}: tell me a long story about the sea.")
            with lock:
                results.append(res)
    one(port, "warm up")
    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(k,)) for k in range(conc)]
    for t in ts: t.start()
    for t in ts: t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(x["ttft"] for x in results)
    p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]
    return {"ttft_p50": statistics.median(ttfts) * 1e3, "ttft_p99": p99 * 1e3,
            "stream": statistics.median(x["decode"] for x in results),
            "aggregate": sum(x["tokens"] for x in results) / wall}

print(f"model {model}; {n} tokens per request, {r} requests per client, {threads} threads")
print(f"{'clients':>7} {'system':<10} {'ttft p50 ms':>12} {'ttft p99 ms':>12} {'stream tok/s':>13} {'aggregate tok/s':>16}")
for conc in levels:
    row = {}
    for name in ["llama.rs", "llama.cpp"]:
        port = free_port()
        if name == "llama.rs":
            cmd = ["./target/release/llama", "serve", "--model", model, "--port", str(port),
                   "--parallel", str(conc), "--ctx-size", str(ctx), "--threads", threads]
        else:
            cmd = [server, "-m", model, "--port", str(port), "-np", str(conc),
                   "-c", str(ctx * conc), "-t", threads, "-tb", threads, "-cb"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(port, proc)
            row[name] = run(port, conc)
        finally:
            proc.terminate(); proc.wait()
        m = row[name]
        print(f"{conc:>7} {name:<10} {m['ttft_p50']:>12.0f} {m['ttft_p99']:>12.0f} {m['stream']:>13.1f} {m['aggregate']:>16.1f}", flush=True)
    print(f"{conc:>7} {'ratio':<10} {'':>12} {'':>12} {row['llama.rs']['stream'] / row['llama.cpp']['stream']:>13.2f} "
          f"{row['llama.rs']['aggregate'] / row['llama.cpp']['aggregate']:>16.2f}", flush=True)
PY
