#!/usr/bin/env bash
# The README's first command: runs factoryd's main job as far as it exists today.
# Today: the job contract. It builds factoryd, then validates the example job of every origin
# type, a job with five mistakes, and the shipped configuration. It starts nothing that needs
# stopping. (Builds and imports through NATS join this script as they land.)
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "demo: cargo is required (rustup)"; exit 1; }
echo "== building factoryd"
cargo build --locked --quiet
bin=target/debug/factoryd
"$bin" version

echo
echo "== the shipped configuration"
"$bin" validate --config config/factoryd.toml

for f in tests/fixtures/jobs/docker-hub.json tests/fixtures/jobs/oci-registry-ecr.json \
         tests/fixtures/jobs/docker-file-git-ssh.json; do
  echo
  echo "== a valid job: $f (printed normalised, secrets redacted)"
  "$bin" validate --job "$f"
done

echo
echo "== a job with five mistakes (exit 64, every problem with its path)"
set +e
"$bin" validate --job tests/fixtures/jobs/invalid-five-mistakes.json
code=$?
set -e
echo "exit code: $code"
[ "$code" -eq 64 ]

echo
echo "demo: done. serve/run/submit, builds and imports are not implemented yet (see README, Status)."
