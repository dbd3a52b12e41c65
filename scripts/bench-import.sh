#!/usr/bin/env bash
# Import benchmark (issue 6): factoryd's RegistryImporter next to `skopeo copy`, same source,
# same kind of destination, one run each, on local registries (docker-registry on loopback).
#
# Images: "big" = 4 x 256 MiB random layers (1 GiB); "many" = 200 x 256 KiB layers.
# Cases: registry -> OCI layout (fresh), registry -> registry (fresh, one destination registry
# each), and re-import into a layout that already holds the image.
# Prints time, throughput and peak RSS (GNU time's maximum resident set size) of each, and the
# ratios. Disk: about 6 GiB under $BENCH_DIR, removed at the end. Time: a few minutes.
#
# Environment: BENCH_DIR (default /tmp/factoryd-bench), FACTORYD_PARALLEL (blobs at once,
# default 4, the config default), BIG_LAYERS / BIG_SIZE / MANY_LAYERS / MANY_SIZE to shrink it.
set -euo pipefail
cd "$(dirname "$0")/.."

for p in docker-registry skopeo /usr/bin/time; do
  command -v "$p" >/dev/null || { echo "bench-import: $p missing (scripts/install-test-deps.sh)" >&2; exit 1; }
done

BENCH_DIR=${BENCH_DIR:-/tmp/factoryd-bench}
PARALLEL=${FACTORYD_PARALLEL:-4}
BIG_LAYERS=${BIG_LAYERS:-4}; BIG_SIZE=${BIG_SIZE:-268435456}
MANY_LAYERS=${MANY_LAYERS:-200}; MANY_SIZE=${MANY_SIZE:-262144}

cargo build --release --quiet --example import
BIN=target/release/examples/import

rm -rf "$BENCH_DIR"; mkdir -p "$BENCH_DIR"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$BENCH_DIR"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start_registry() { # name -> prints host:port
  local name=$1 port; port=$(free_port)
  mkdir -p "$BENCH_DIR/$name"
  cat >"$BENCH_DIR/$name/config.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $BENCH_DIR/$name/data}}
http: {addr: 127.0.0.1:$port, secret: bench}
YML
  docker-registry serve "$BENCH_DIR/$name/config.yml" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  echo "127.0.0.1:$port"
}
SRC=$(start_registry src)
DST_F=$(start_registry dst-factoryd)
DST_S=$(start_registry dst-skopeo)

echo "== seeding: big = $BIG_LAYERS x $BIG_SIZE B, many = $MANY_LAYERS x $MANY_SIZE B (blobs at once: $PARALLEL)"
$BIN seed "$BENCH_DIR/seed-big" big "$BIG_LAYERS" "$BIG_SIZE"
$BIN seed "$BENCH_DIR/seed-many" many "$MANY_LAYERS" "$MANY_SIZE"
skopeo copy -q --dest-tls-verify=false "oci:$BENCH_DIR/seed-big:big" "docker://$SRC/big:1"
skopeo copy -q --dest-tls-verify=false "oci:$BENCH_DIR/seed-many:many" "docker://$SRC/many:1"
rm -rf "$BENCH_DIR/seed-big" "$BENCH_DIR/seed-many"
sync

# measure NAME COMMAND... -> sets SECS and RSS_KIB
measure() {
  local out="$BENCH_DIR/time.out"
  /usr/bin/time -f "%e %M" -o "$out" "$@" >/dev/null
  read -r SECS RSS_KIB <"$out"
}
bytes_of() { # image -> total bytes
  if [ "$1" = big ]; then echo $((BIG_LAYERS * BIG_SIZE)); else echo $((MANY_LAYERS * MANY_SIZE)); fi
}
row() { # label bytes f_secs f_rss s_secs s_rss
  python3 - "$@" <<'PY'
import sys
label, size, fs, fr, ss, sr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
mib = size / 2**20
fs_, ss_ = max(fs, 0.01), max(ss, 0.01)
print(f"{label:<34} factoryd {fs:7.2f} s {mib/fs_:8.1f} MiB/s {fr/1024:6.1f} MiB RSS | "
      f"skopeo {ss:7.2f} s {mib/ss_:8.1f} MiB/s {sr/1024:6.1f} MiB RSS | speed-up x{ss_/fs_:.2f}")
PY
}

echo "== results (one run each)"
for image in big many; do
  size=$(bytes_of $image)
  measure skopeo copy -q --src-tls-verify=false "docker://$SRC/$image:1" "oci:$BENCH_DIR/layout-skopeo:$image"
  s_secs=$SECS; s_rss=$RSS_KIB
  measure $BIN copy "$SRC/$image:1" "oci:$BENCH_DIR/layout-factoryd:$image" --parallel "$PARALLEL"
  row "$image: registry -> OCI layout" "$size" "$SECS" "$RSS_KIB" "$s_secs" "$s_rss"

  measure skopeo copy -q --src-tls-verify=false --dest-tls-verify=false "docker://$SRC/$image:1" "docker://$DST_S/$image:1"
  s_secs=$SECS; s_rss=$RSS_KIB
  measure $BIN copy "$SRC/$image:1" "docker://$DST_F/$image:1" --parallel "$PARALLEL"
  row "$image: registry -> registry" "$size" "$SECS" "$RSS_KIB" "$s_secs" "$s_rss"

  measure skopeo copy -q --src-tls-verify=false "docker://$SRC/$image:1" "oci:$BENCH_DIR/layout-skopeo:$image-again"
  s_secs=$SECS; s_rss=$RSS_KIB
  measure $BIN copy "$SRC/$image:1" "oci:$BENCH_DIR/layout-factoryd:$image-again" --parallel "$PARALLEL"
  row "$image: re-import into the layout" "$size" "$SECS" "$RSS_KIB" "$s_secs" "$s_rss"
done
echo "targets: layout big >= x2.0, layout many >= x2.5, registry -> registry >= x1.5, RSS <= 64 MiB, re-import >= x1.0"
