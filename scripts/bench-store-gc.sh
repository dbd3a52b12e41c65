#!/usr/bin/env bash
# Benchmark of one collection of the oci-layout store (issue 10): a synthetic store of 1,000
# tags and about 10,000 blobs (100 sources, 10 layers an image, one layer shared by all),
# collected with factoryd's own `store::collect` (release build), next to `find` listing the
# same store in the same run. Aim: a collection under 2 s.
# Usage: [BENCH_DIR=DIR] scripts/bench-store-gc.sh [TAGS] [SOURCES] [LAYERS]
set -euo pipefail
cd "$(dirname "$0")/.."

tags=${1:-1000}
sources=${2:-100}
layers=${3:-9}
echo "== building the store_gc example (release)"
cargo build --release --quiet --features test-util --example store_gc
bench_root=${BENCH_DIR:-/var/tmp}
work=$(mktemp -d "$bench_root/factoryd-store-gc.XXXXXX")
trap 'rm -rf "$work"' EXIT

bin=target/release/examples/store_gc
"$bin" setup "$work/store" "$tags" "$sources" "$layers"
# find, as an operator would list the store, warm as the collections below run: once to warm
# the page cache, then timed.
find "$work/store" -type f >/dev/null
start=$(date +%s.%N)
files=$(find "$work/store" -type f | wc -l)
end=$(date +%s.%N)
find_s=$(echo "$end - $start" | bc -l)
sleep 0.3 # every file older than a collection's clock slack
out=$("$bin" collect "$work/store" "$tags" "$sources" "$layers")
echo "$out"
keep_all=$(echo "$out" | awk '/^keep_all_run=2/ { for (i = 1; i <= NF; i++) if ($i ~ /^seconds=/) { sub("seconds=", "", $i); print $i } }')
printf 'find: %d files in %.3f s\n' "$files" "$find_s"
printf 'collection (keep all, warm): %.3f s = %.1fx find\n' "$keep_all" "$(echo "$keep_all / $find_s" | bc -l)"
