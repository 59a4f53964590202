#!/usr/bin/env bash
# Aggregate throughput of `llama serve --lookup` against the same server without it, one
# right after the other on the same binary and file. At each concurrency C (default
# 1,4,16) the server runs with --parallel C; C clients each send R greedy chat requests
# of a prompt of scripts/bench/prompts/ (default: the code edit, then prose) for N tokens
# at most. Prints aggregate generated tok/s, the median per-stream decode tok/s, the
# drafts accepted (from usage) and the ratio lookup / plain.
#   usage: scripts/bench/bench-serve-lookup.sh [MODEL.gguf] [CONCURRENCY=1,4,16] [N=128] [R=3] [THREADS=2] [PROMPTS=code-edit,prose]
#   LLAMA_BIN   our binary (default: target/release/llama, built if missing)
set -euo pipefail
cd "$(dirname "$0")/../.."
model="${1:-$(./scripts/fetch/fetch-qwen2.5.sh)}"
levels="${2:-1,4,16}"; n="${3:-128}"; r="${4:-3}"; threads="${5:-2}"; prompts="${6:-code-edit,prose}"
ours="${LLAMA_BIN:-target/release/llama}"
if [ -z "${LLAMA_BIN:-}" ]; then
    cargo build --release --quiet --bin llama
fi
python3 - "$ours" "$model" "$levels" "$n" "$r" "$threads" "$prompts" <<'PY'
import http.client, json, socket, statistics, subprocess, sys, threading, time

ours, model, levels, n, r, threads, prompts = sys.argv[1:]
n, r = int(n), int(r)
levels = [int(x) for x in levels.split(",")]

sys.path.insert(0, "scripts/bench")
from serverlib import free_port, wait_ready

def one(port, prompt):
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": n,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = c.getresponse()
    first = last = None; usage = {}; text = []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev.get("choices", []):
            if ch.get("delta", {}).get("content"):
                now = time.perf_counter()
                first = first or now; last = now; text.append(ch["delta"]["content"])
    gen = usage.get("completion_tokens", 0)
    details = usage.get("completion_tokens_details") or {}
    return {"tokens": gen, "text": "".join(text),
            "accepted": details.get("accepted_prediction_tokens", 0),
            "rejected": details.get("rejected_prediction_tokens", 0),
            "decode": (gen - 1) / (last - first) if first and last and last > first else 0.0}

def run(port, conc, prompt):
    results = []; lock = threading.Lock()
    def client(k):
        for _ in range(r):
            res = one(port, prompt)
            with lock:
                results.append(res)
    one(port, prompt)  # warm: the prompt's prefix is cached for every later request
    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(k,)) for k in range(conc)]
    for t in ts: t.start()
    for t in ts: t.join()
    wall = time.perf_counter() - t0
    return {"aggregate": sum(x["tokens"] for x in results) / wall,
            "stream": statistics.median(x["decode"] for x in results),
            "accepted": sum(x["accepted"] for x in results),
            "drafted": sum(x["accepted"] + x["rejected"] for x in results),
            "texts": {x["text"] for x in results}}

print(f"model {model}; at most {n} tokens per request, {r} requests per client, {threads} threads")
print("| prompt | clients | plain aggregate tok/s | lookup aggregate tok/s | x | plain stream tok/s | lookup stream tok/s | accepted/drafted |")
print("|---|---|---|---|---|---|---|---|")
for name in prompts.split(","):
    prompt = open(f"scripts/bench/prompts/{name}.txt", encoding="utf-8").read()
    for conc in levels:
        row = {}
        for mode in ["plain", "lookup"]:
            port = free_port()
            cmd = [ours, "serve", "--model", model, "--port", str(port), "--parallel", str(conc),
                   "--threads", threads, "--no-webui"] + (["--lookup"] if mode == "lookup" else [])
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_ready(port, proc)
                row[mode] = run(port, conc, prompt)
            finally:
                proc.terminate(); proc.wait()
        p, l = row["plain"], row["lookup"]
        same = "" if p["texts"] == l["texts"] else " (texts differ!)"
        acc = f"{l['accepted']}/{l['drafted']}"
        print(f"| {name} | {conc} | {p['aggregate']:.1f} | {l['aggregate']:.1f} | {l['aggregate'] / p['aggregate']:.2f} "
              f"| {p['stream']:.1f} | {l['stream']:.1f} | {acc}{same} |", flush=True)
PY
