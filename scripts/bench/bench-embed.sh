#!/usr/bin/env bash
# Embedding throughput: `llama embed` beside sentence-transformers on the same texts
# (every sentence of the retrieval corpus fixture), at 1 and 2 threads, one right after
# the other. Needs a release build (cargo build --release --bin llama) and a Python
# with torch and sentence-transformers (PYTHON, default: the oracle venv).
set -euo pipefail
cd "$(dirname "$0")/../.."
llama=${LLAMA:-target/release/llama}
python=${PYTHON:-${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}/oracle-venv/bin/python}
model="$(./scripts/fetch/fetch-minilm.sh)"
texts="$(mktemp)"
trap 'rm -f "$texts"' EXIT
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
echo "texts: $(wc -l < "$texts") sentences; batch 32"
echo "| threads | llama embed (sentences/s) | sentence-transformers (sentences/s) | ratio |"
echo "|---|---|---|---|"
for t in 1 2; do
    best=0
    for _ in 1 2 3; do
        rate=$("$llama" embed -m "$model" --threads "$t" --batch-size 32 --file "$texts" 2>&1 >/dev/null \
            | awk '/embedded/ {print $(NF-1)}')
        best=$(python3 -c "print(max($best, $rate))")
    done
    st=$("$python" scripts/bench/bench_embed_st.py "$model" "$texts" "$t" 2>/dev/null | awk '/sentences_per_second/ {print $2}')
    ratio=$(python3 -c "print(f'{$best / $st:.2f}x')")
    echo "| $t | $best | $st | $ratio |"
done
