#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests and snapshots of every crate,
# including the real-model tests (the model is fetched into the cache if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never INSTA_UPDATE=no
./scripts/fetch-model.sh >/dev/null
./scripts/fetch-minilm.sh >/dev/null
./scripts/setup-postgres.sh >/dev/null
jobs="${CARGO_BUILD_JOBS:-2}"
cargo test --workspace --locked -j "$jobs" --no-fail-fast 2>&1
