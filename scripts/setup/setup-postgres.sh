#!/usr/bin/env bash
# PostgreSQL 16 with the pgvector extension for the llama-rag tests, from the PyPI
# wheel `pgserver` (which ships the server binaries), in a virtual environment
# outside the repository. Idempotent. Prints the folder holding initdb, pg_ctl and
# postgres; the tests find it there by themselves (or in LLAMA_RS_PG_BIN).
#   LLAMA_RS_CACHE  cache root (default: ~/.cache/llama-rs)
set -euo pipefail
cache="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}"
venv="$cache/pg-venv"
version=0.1.4

find_bin() {
    local bin
    for bin in "$venv"/lib/python3*/site-packages/pgserver/pginstall/bin; do
        if [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ] && [ -x "$bin/postgres" ]; then
            echo "$bin"
            return 0
        fi
    done
    return 1
}

if ! bin="$(find_bin)"; then
    mkdir -p "$cache"
    if [ ! -x "$venv/bin/pip" ]; then
        if ! python3 -m venv "$venv" >&2; then
            echo "error: python3 -m venv failed (on Debian: apt-get install python3-venv)" >&2
            exit 1
        fi
    fi
    echo "installing pgserver==$version (PostgreSQL 16 + pgvector) into $venv ..." >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "pgserver==$version" >&2
    if ! bin="$(find_bin)"; then
        echo "error: pgserver installed, but no pginstall/bin with initdb, pg_ctl and postgres under $venv" >&2
        exit 1
    fi
fi

root="$(dirname "$bin")"
if [ ! -f "$root/share/postgresql/extension/vector.control" ] || [ ! -f "$root/lib/postgresql/vector.so" ]; then
    echo "error: the pgvector extension (vector.control, vector.so) is missing under $root" >&2
    exit 1
fi
if ! "$bin/postgres" --version >/dev/null; then
    echo "error: $bin/postgres does not run on this machine" >&2
    exit 1
fi
echo "$bin"
