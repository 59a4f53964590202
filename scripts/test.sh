#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests and snapshots of every crate,
# including the real-model tests. Sets up everything it needs first, on a fresh Debian
# or Ubuntu machine too: the system packages (lavapipe, nginx, Chromium and its driver,
# Python; apt-get only for what is missing), the Python venv of the client tests,
# PostgreSQL with pgvector, and the models (fetched into the cache if missing).
# `scripts/setup/check-fresh.sh` reports which of these a machine lacks.
#   ./scripts/test.sh [ARGS]     ARGS go to `cargo test` (e.g. `--test it tokenizer::`)
#   CARGO_BUILD_JOBS             parallel build jobs (default: 2)
#   LLAMA_FUZZ_SMOKE_SECS        seconds of blind mutation per fuzz target (default: 10)
set -euo pipefail
cd "$(dirname "$0")/.."
# No incremental build state: a clean run does not reuse it, and it costs disk.
export CARGO_TERM_COLOR=never INSTA_UPDATE=no CARGO_INCREMENTAL=0
./scripts/setup/system-packages.sh
./scripts/setup/setup-python-client.sh >/dev/null
./scripts/setup/setup-postgres.sh >/dev/null
./scripts/fetch/fetch-model.sh >/dev/null
./scripts/fetch/fetch-minilm.sh >/dev/null
./scripts/fetch/fetch-gemma3.sh >/dev/null
./scripts/fetch/fetch-qwen2.5.sh >/dev/null
jobs="${CARGO_BUILD_JOBS:-2}"
cargo test --workspace --locked -j "$jobs" --no-fail-fast "$@" 2>&1
