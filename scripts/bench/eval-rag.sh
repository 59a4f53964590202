#!/usr/bin/env bash
# Answers with citations on the committed corpus (tests/fixtures/rag): ingests it into
# a fresh SQLite store with all-MiniLM-L6-v2, asks every question of questions.json
# through `llama rag query --json` with the chat model MODEL, and reports how often
# the right document was retrieved among the sources and how often the answer cites
# it (and the answer contains the expected short answer).
#   scripts/bench/eval-rag.sh [MODEL]   (default: SmolLM2-135M-Instruct, fetched if needed)
set -euo pipefail
cd "$(dirname "$0")/../.."
llama=${LLAMA:-target/release/llama}
model="${1:-$(./scripts/fetch/fetch-model.sh)}"
minilm="$(./scripts/fetch/fetch-minilm.sh)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$llama" rag ingest --store "$work/docs.db" --embed-model "$minilm" tests/fixtures/rag/corpus >&2
python3 - "$llama" "$work/docs.db" "$minilm" "$model" <<'PY'
import json, os, subprocess, sys
llama, db, minilm, model = sys.argv[1:]
questions = json.load(open("tests/fixtures/rag/questions.json"))
retrieved = cited = correct = 0
for q in questions:
    out = subprocess.run(
        [llama, "rag", "query", "--store", db, "--embed-model", minilm, "--model", model,
         "--json", "-n", "96", q["question"]],
        capture_output=True, text=True, check=True).stdout
    a = json.loads(out)
    right = [s["n"] for s in a["sources"] if os.path.basename(s["source"]) == q["document"]]
    retrieved += bool(right)
    ok_cite = any(n in right for n in a["cited"])
    cited += ok_cite
    correct += q["answer"].lower() in a["answer"].lower()
    print(f"{'C' if ok_cite else '-'}{'A' if q['answer'].lower() in a['answer'].lower() else '-'} "
          f"{q['document']}: {a['answer'][:100]!r} cited={a['cited']} right={right}", file=sys.stderr)
n = len(questions)
print(f"model: {os.path.basename(model)}; questions: {n}")
print(f"right document among the sources: {retrieved}/{n} ({retrieved/n:.2f})")
print(f"answer cites the right document:  {cited}/{n} ({cited/n:.2f})")
print(f"answer contains the short answer: {correct}/{n} ({correct/n:.2f})")
PY
