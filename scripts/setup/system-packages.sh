#!/usr/bin/env bash
# Installs the system packages the test suite needs (see prereqs.sh), each only when
# it is missing, with apt-get on Debian or Ubuntu: `apt-get update` once, then one
# install. As root, or through sudo without a password. Where there is no apt-get
# (or no root), a one-line message names what is missing and the exit code is 1.
# Prints nothing when everything is already there.
set -euo pipefail
. "$(dirname "$0")/prereqs.sh"

if ! have_cargo; then
    echo "error: cargo is missing: install Rust (1.85 or newer) from https://rustup.rs" >&2
    exit 1
fi

missing=()
for entry in "${apt_prereqs[@]}"; do
    read -r check packages <<<"$entry"
    if ! "$check"; then
        read -r -a list <<<"$packages"
        missing+=("${list[@]}")
    fi
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing test prerequisites and no apt-get to install them; install the equivalents of: ${missing[*]}" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo)
    else
        echo "error: missing test prerequisites and no root to install them; run: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi
echo "installing ${missing[*]} with apt-get ..." >&2
"${sudo[@]}" apt-get update -qq >&2
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# nginx's package starts its own server; the test runs nginx itself.
if [[ " ${missing[*]} " == *" nginx-light "* ]]; then
    ("${sudo[@]}" service nginx stop) >/dev/null 2>&1 || true
    "${sudo[@]}" pkill -x nginx 2>/dev/null || true
fi
for entry in "${apt_prereqs[@]}"; do
    read -r check packages <<<"$entry"
    if ! "$check"; then
        echo "error: installed $packages, but the check $check still fails" >&2
        exit 1
    fi
done
