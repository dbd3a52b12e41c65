#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs every test tier —
# formatting and lints, unit and pipeline tests, and the integration tests against real
# servers that the test harness starts on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --locked --all-targets --features test-util -- -D warnings

echo "== unit, pipeline and integration tests"
# test-util builds the in-memory fakes and the scripted test worker the integration tests spawn.
cargo test --locked --all-targets --features test-util
