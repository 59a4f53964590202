#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests and snapshots of every crate,
# including the real-model tests (the model is fetched into the cache if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
# No incremental build state: a clean run does not reuse it, and it costs disk.
export CARGO_TERM_COLOR=never INSTA_UPDATE=no CARGO_INCREMENTAL=0
./scripts/fetch-model.sh >/dev/null
./scripts/fetch-minilm.sh >/dev/null
./scripts/fetch-gemma3.sh >/dev/null
./scripts/fetch-qwen2.5.sh >/dev/null
./scripts/setup-postgres.sh >/dev/null
jobs="${CARGO_BUILD_JOBS:-2}"
cargo test --workspace --locked -j "$jobs" --no-fail-fast 2>&1
