#!/usr/bin/env bash
# A Python virtual environment with torch (CPU), transformers, sentence-transformers,
# ONNX Runtime and the ONNX exporter's packages: the anchors of the benchmarks and the
# oracles of the fixture generators (scripts/bench/bench-embed.sh,
# scripts/fixtures/*.py). Not part of the test suite's set-up: a few GB, only for
# measurements. Prints the interpreter's path.
set -euo pipefail
cache="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}"
venv="$cache/oracle-venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
fi
if ! "$venv/bin/python" -c 'import torch, transformers, sentence_transformers, onnxruntime, onnx' 2>/dev/null; then
    "$venv/bin/pip" install --quiet torch transformers sentence-transformers onnxruntime onnx onnxscript >&2
fi
echo "$venv/bin/python"
