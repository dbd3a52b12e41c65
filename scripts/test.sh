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
log=$(mktemp)
# A test that needs what this machine lacks (a standalone buildkitd: FACTORYD_TEST_BUILDKITD)
# checks at run time, returns early and writes "name (reason)" here; it is counted as
# skipped, by name, not as passed.
skips=$(mktemp)
export FACTORYD_TEST_SKIPS="$skips"
trap 'rm -f "$log" "$skips"' EXIT
# No backtraces: a failing test's message then stays in the last lines a CI log shows.
export RUST_BACKTRACE=0
set +e
cargo test --locked --all-targets --features test-util 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# One closing line over every test binary (cargo's own last line is a target without tests).
# Skipped: the tests that reported themselves so (above), and any ignored one; each is named.
awk -v skips="$skips" '
     /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;/) p += $i; if ($(i+1) ~ /^failed;/) f += $i; if ($(i+1) ~ /^ignored;/) s += $i } }
     /^test .* \.\.\. ignored/ { why = $0; sub(/^.* \.\.\. ignored(, )?/, "", why); names[++n] = $2 (why == "" ? "" : " (" why ")") }
     END { while ((getline line < skips) > 0) { names[++n] = line; s++; p-- }
           for (i = 1; i <= n; i++) printf "skipped: %s\n", names[i]
           printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
