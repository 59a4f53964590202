#!/usr/bin/env bash
# The whole test suite: every crate's unit tests, the integration tests and snapshots.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never INSTA_UPDATE=no
jobs="${CARGO_BUILD_JOBS:-2}"
cargo test --workspace --locked -j "$jobs" 2>&1
