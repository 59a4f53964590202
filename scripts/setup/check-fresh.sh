#!/usr/bin/env bash
# For a fresh-machine demonstration of the README's test command: reports whether each
# prerequisite that ./scripts/test.sh sets up is absent: lavapipe, nginx, Chromium and
# its driver, the client venv, PostgreSQL, the models. Python, a C compiler and curl
# (which it also installs when missing) are reported but may be present: a machine
# that builds Rust has a C compiler. It only checks and prints; it installs and
# removes nothing. Exit 0 when every one that must be absent is (a fresh machine), 1
# otherwise.
#   scripts/setup/check-fresh.sh && ./scripts/test.sh
#   LLAMA_RS_CACHE  cache root (default: ~/.cache/llama-rs)
set -euo pipefail
. "$(dirname "$0")/prereqs.sh"

present=0
report() { # NAME CHECK [ARG]
    local name="$1"
    shift
    if "$@"; then
        printf '%-56s present\n' "$name"
        present=$((present + 1))
    else
        printf '%-56s absent\n' "$name"
    fi
}
for entry in "${apt_prereqs[@]}"; do
    read -r check packages <<<"$entry"
    case "$check" in
    have_python | have_cc | have_curl)
        if "$check"; then state=present; else state=absent; fi
        printf '%-56s %s (either is fine)\n' "apt: $packages" "$state"
        ;;
    *) report "apt: $packages" "$check" ;;
    esac
done
report "client venv ($cache_root/venv)" have_client_venv
report "PostgreSQL + pgvector ($cache_root/pg-venv)" have_postgres
for m in "${models[@]}"; do
    report "model: $m" have_model "$m"
done
if [ "$present" -eq 0 ]; then
    echo "fresh: every prerequisite is absent"
else
    echo "not fresh: $present prerequisite(s) present"
    exit 1
fi
