#!/usr/bin/env bash
# Queue-path benchmark: no-op jobs through a real nats-server, next to a raw pull+ack loop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo bench --locked --features test-util --bench queue
