#!/usr/bin/env bash
# Embedding throughput: `llama embed` beside sentence-transformers (torch) and ONNX
# Runtime (CPU provider, on an ONNX export of the same model that bench_embed_ort.py
# makes once) on the same texts (every sentence of the retrieval corpus fixture), in
# batches of 32, at 1 and 2 threads, one right after the other. Each side is timed from
# the texts to the normalized vectors (tokenization included), best of three.
# Ours runs at the default precision (f32 weights, gemm on every thread) and at
# --precision q8_0 (the weights in Q8_0 blocks through our block kernels); the script
# also prints the smallest cosine similarity of each against sentence-transformers'
# vectors.
#   usage: scripts/bench/bench-embed.sh
#   LLAMA    our binary (default: target/release/llama, built if missing)
#   PYTHON   a Python with torch, sentence-transformers and onnxruntime (default: the
#            venv of scripts/setup/setup-oracle-venv.sh, made if missing)
set -euo pipefail
cd "$(dirname "$0")/../.."
llama=${LLAMA:-target/release/llama}
if [ -z "${LLAMA:-}" ]; then
    cargo build --release --quiet --bin llama
fi
python=${PYTHON:-$(./scripts/setup/setup-oracle-venv.sh)}
model="$(./scripts/fetch/fetch-minilm.sh)"
onnx="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}/models/$(basename "$model")-onnx/model.onnx"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
texts="$work/texts.txt"
# One sentence per line, from every document of the corpus.
"$python" - "$texts" tests/fixtures/rag/corpus <<'PY'
import pathlib, re, sys
out, corpus = sys.argv[1], pathlib.Path(sys.argv[2])
lines = []
for f in sorted(corpus.iterdir()):
    text = re.sub(r"\s+", " ", f.read_text(encoding="utf-8").replace("#", " "))
    lines += [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 3]
open(out, "w", encoding="utf-8").write("\n".join(lines) + "\n")
PY
# Fidelity: each precision's vectors against sentence-transformers'.
"$llama" embed -m "$model" --file "$texts" --batch-size 32 >"$work/f32.jsonl" 2>/dev/null
"$llama" embed -m "$model" --file "$texts" --batch-size 32 --precision q8_0 >"$work/q8_0.jsonl" 2>/dev/null
"$python" - "$model" "$texts" "$work" <<'PY'
import json, sys
import numpy as np
from sentence_transformers import SentenceTransformer
model, texts, work = sys.argv[1:]
texts = [l for l in open(texts, encoding="utf-8").read().splitlines() if l.strip()]
ref = SentenceTransformer(model, device="cpu").encode(texts, batch_size=32, normalize_embeddings=True)
def load(name):
    v = np.array([json.loads(l)["embedding"] for l in open(f"{work}/{name}.jsonl")], dtype=np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)
for name in ["f32", "q8_0"]:
    print(f"ours {name}: smallest cosine to sentence-transformers over {len(texts)} texts: "
          f"{(load(name) * ref).sum(1).min():.6f}")
PY
echo "texts: $(wc -l < "$texts") sentences; batch 32; sentences/s, best of 3"
echo "| threads | ours f32 (default) | ours q8_0 | sentence-transformers | ONNX Runtime | f32 / ORT | f32 / torch | q8_0 / ORT |"
echo "|---|---|---|---|---|---|---|---|"
ours() {
    local best=0 rate
    for _ in 1 2 3; do
        rate=$("$llama" embed -m "$model" --threads "$1" --batch-size 32 --file "$texts" "${@:2}" 2>&1 >/dev/null \
            | awk '/embedded/ {print $(NF-1)}')
        best=$(python3 -c "print(max($best, $rate))")
    done
    echo "$best"
}
for t in 1 2; do
    f32=$(ours "$t")
    q8=$(ours "$t" --precision q8_0)
    st=$("$python" scripts/bench/bench_embed_st.py "$model" "$texts" "$t" 2>/dev/null | awk '/sentences_per_second/ {print $2}')
    ort_out=$("$python" scripts/bench/bench_embed_ort.py "$model" "$onnx" "$texts" "$t" 2>"$work/ort.err") ||
        { cat "$work/ort.err" >&2; exit 1; }
    ort=$(echo "$ort_out" | awk '/sentences_per_second/ {print $2}')
    ort_cos=$(echo "$ort_out" | awk '/min_cosine_vs_torch/ {print $2}')
    python3 -c "print(f'| $t | $f32 | $q8 | $st | $ort | {$f32 / $ort:.2f}x | {$f32 / $st:.2f}x | {$q8 / $ort:.2f}x |')"
done
echo "ONNX export vs torch: smallest cosine $ort_cos"
