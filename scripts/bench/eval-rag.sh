#!/usr/bin/env bash
# Answers with citations on the committed corpus (tests/fixtures/rag): ingests it into
# a fresh SQLite store with all-MiniLM-L6-v2, asks every question of questions.json
# through `llama rag query --json` with the chat model MODEL, and reports how often
# the right document was retrieved among the sources, how often the answer cites it,
# how often it contains the expected short answer, and how often both.
#   scripts/bench/eval-rag.sh [MODEL [STYLE...]]   (default: SmolLM2-135M-Instruct, fetched
#   if needed; styles of `--answer-style`, default all three: short quote free)
#   EVAL_EVERY=N  ask every N-th question only (a quick subset while iterating)
set -euo pipefail
cd "$(dirname "$0")/../.."
llama=${LLAMA:-target/release/llama}
model="${1:-$(./scripts/fetch/fetch-model.sh)}"
shift || true
styles="${*:-short quote free}"
minilm="$(./scripts/fetch/fetch-minilm.sh)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$llama" rag ingest --store "$work/docs.db" --embed-model "$minilm" tests/fixtures/rag/corpus >&2
for style in $styles; do
python3 - "$llama" "$work/docs.db" "$minilm" "$model" "$style" "${EVAL_EVERY:-1}" <<'PY'
import json, os, subprocess, sys
llama, db, minilm, model, style, every = sys.argv[1:]
questions = json.load(open("tests/fixtures/rag/questions.json"))[::int(every)]
retrieved = cited = correct = both = 0
for q in questions:
    out = subprocess.run(
        [llama, "rag", "query", "--store", db, "--embed-model", minilm, "--model", model,
         "--json", "-n", "96", "--answer-style", style, q["question"]],
        capture_output=True, text=True, check=True).stdout
    a = json.loads(out)
    right = [s["n"] for s in a["sources"] if os.path.basename(s["source"]) == q["document"]]
    retrieved += bool(right)
    ok_cite = any(n in right for n in a["cited"])
    ok_fact = q["answer"].lower() in a["answer"].lower()
    cited += ok_cite
    correct += ok_fact
    both += ok_cite and ok_fact
    print(f"{'C' if ok_cite else '-'}{'A' if ok_fact else '-'} "
          f"{q['document']}: {a['answer'][:160]!r} cited={a['cited']} right={right}", file=sys.stderr)
n = len(questions)
print(f"model: {os.path.basename(model)}; style: {style}; questions: {n}")
print(f"right document among the sources: {retrieved}/{n} ({retrieved/n:.2f})")
print(f"answer cites the right document:  {cited}/{n} ({cited/n:.2f})")
print(f"answer contains the short answer: {correct}/{n} ({correct/n:.2f})")
print(f"both (the fact, cited rightly):   {both}/{n} ({both/n:.2f})")
PY
done
