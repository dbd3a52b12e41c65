#!/usr/bin/env bash
# Import benchmark (issue 6): factoryd's RegistryImporter next to `skopeo copy`, same source,
# same kind of destination, one run each, on local registries (docker-registry on loopback).
#
# Images: "big" = 4 x 256 MiB random layers (1 GiB); "many" = 200 x 256 KiB layers.
# Cases: registry -> OCI layout (fresh), registry -> registry (fresh: a new destination registry
# for each tool and round, so neither finds a blob it could skip or mount), and re-import into a
# layout that already holds the image.
# Each case runs RUNS rounds (default 3), skopeo and factoryd alternating, each measurement
# starting after `sync` so neither pays for the other's writeback; the median round of each
# side is reported, with time, throughput, peak RSS (GNU time's maximum resident set size) and
# the ratio. Disk: up to about 4 GiB under $BENCH_DIR at a time, removed at the end.
#
# Environment: BENCH_DIR (default /tmp/factoryd-bench), FACTORYD_PARALLEL (blobs at once,
# default 4, the config default), RUNS, BIG_LAYERS / BIG_SIZE / MANY_LAYERS / MANY_SIZE.
set -euo pipefail
cd "$(dirname "$0")/.."

for p in docker-registry skopeo /usr/bin/time; do
  command -v "$p" >/dev/null || { echo "bench-import: $p missing (scripts/install-test-deps.sh)" >&2; exit 1; }
done

BENCH_DIR=${BENCH_DIR:-/tmp/factoryd-bench}
PARALLEL=${FACTORYD_PARALLEL:-4}
BIG_LAYERS=${BIG_LAYERS:-4}; BIG_SIZE=${BIG_SIZE:-268435456}
MANY_LAYERS=${MANY_LAYERS:-200}; MANY_SIZE=${MANY_SIZE:-262144}
RUNS=${RUNS:-3}

cargo build --release --quiet --example import
BIN=target/release/examples/import

rm -rf "$BENCH_DIR"; mkdir -p "$BENCH_DIR"
cleanup() { for f in "$BENCH_DIR"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done; wait 2>/dev/null || true; rm -rf "$BENCH_DIR"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start_registry() { # name -> prints host:port (its pid goes to $BENCH_DIR/NAME.pid)
  local name=$1 port; port=$(free_port)
  rm -rf "${BENCH_DIR:?}/$name"; mkdir -p "$BENCH_DIR/$name"
  cat >"$BENCH_DIR/$name/config.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $BENCH_DIR/$name/data}}
http: {addr: 127.0.0.1:$port, secret: bench}
YML
  docker-registry serve "$BENCH_DIR/$name/config.yml" >/dev/null 2>&1 &
  echo $! >"$BENCH_DIR/$name.pid"
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  echo "127.0.0.1:$port"
}
SRC=$(start_registry src)

echo "== seeding: big = $BIG_LAYERS x $BIG_SIZE B, many = $MANY_LAYERS x $MANY_SIZE B (blobs at once: $PARALLEL, $RUNS rounds)"
$BIN seed "$BENCH_DIR/seed-big" big "$BIG_LAYERS" "$BIG_SIZE"
$BIN seed "$BENCH_DIR/seed-many" many "$MANY_LAYERS" "$MANY_SIZE"
skopeo copy -q --dest-tls-verify=false "oci:$BENCH_DIR/seed-big:big" "docker://$SRC/big:1"
skopeo copy -q --dest-tls-verify=false "oci:$BENCH_DIR/seed-many:many" "docker://$SRC/many:1"
rm -rf "$BENCH_DIR/seed-big" "$BENCH_DIR/seed-many"

# measure FILE COMMAND... -> appends "<seconds> <peak RSS KiB>" to FILE, after writeback settles
measure() {
  local file=$1; shift
  sync
  /usr/bin/time -f "%e %M" -o "$BENCH_DIR/time.out" "$@" >/dev/null
  cat "$BENCH_DIR/time.out" >>"$file"
}
stop_registry() { kill "$(cat "$BENCH_DIR/$1.pid")" 2>/dev/null || true; wait "$(cat "$BENCH_DIR/$1.pid")" 2>/dev/null || true; rm -rf "${BENCH_DIR:?}/$1" "$BENCH_DIR/$1.pid"; }
bytes_of() { # image -> total bytes
  if [ "$1" = big ]; then echo $((BIG_LAYERS * BIG_SIZE)); else echo $((MANY_LAYERS * MANY_SIZE)); fi
}
row() { # label bytes factoryd-file skopeo-file
  python3 - "$@" <<'PY'
import statistics, sys
label, size, ffile, sfile = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def runs(path):
    rows = [line.split() for line in open(path) if line.strip()]
    return [float(r[0]) for r in rows], max(int(r[1]) for r in rows)
(fr, frss), (sr, srss) = runs(ffile), runs(sfile)
fs, ss = max(statistics.median(fr), 0.01), max(statistics.median(sr), 0.01)
mib = size / 2**20
print(f"{label:<34} factoryd {fs:6.2f} s {mib/fs:7.1f} MiB/s {frss/1024:5.1f} MiB RSS | "
      f"skopeo {ss:6.2f} s {mib/ss:7.1f} MiB/s {srss/1024:5.1f} MiB RSS | speed-up x{ss/fs:.2f}")
print(f"{'':<34} rounds: factoryd {' '.join(f'{x:.2f}' for x in fr)}  skopeo {' '.join(f'{x:.2f}' for x in sr)}")
PY
}

echo "== results (median of $RUNS rounds; RSS is the largest of the rounds)"
for image in big many; do
  size=$(bytes_of $image)
  m="$BENCH_DIR/m-$image"; rm -f "$m".*
  for r in $(seq "$RUNS"); do
    measure "$m.layout-s" skopeo copy -q --src-tls-verify=false "docker://$SRC/$image:1" "oci:$BENCH_DIR/layout-skopeo:$image"
    measure "$m.layout-f" $BIN copy "$SRC/$image:1" "oci:$BENCH_DIR/layout-factoryd:$image" --parallel "$PARALLEL"
    # Re-import: the layout now holds the image.
    measure "$m.again-s" skopeo copy -q --src-tls-verify=false "docker://$SRC/$image:1" "oci:$BENCH_DIR/layout-skopeo:$image-again"
    measure "$m.again-f" $BIN copy "$SRC/$image:1" "oci:$BENCH_DIR/layout-factoryd:$image-again" --parallel "$PARALLEL"
    rm -rf "$BENCH_DIR/layout-skopeo" "$BENCH_DIR/layout-factoryd"

    dst=$(start_registry dst-s)
    measure "$m.reg-s" skopeo copy -q --src-tls-verify=false --dest-tls-verify=false "docker://$SRC/$image:1" "docker://$dst/$image:1"
    stop_registry dst-s
    dst=$(start_registry dst-f)
    measure "$m.reg-f" $BIN copy "$SRC/$image:1" "docker://$dst/$image:1" --parallel "$PARALLEL"
    stop_registry dst-f
  done
  row "$image: registry -> OCI layout" "$size" "$m.layout-f" "$m.layout-s"
  row "$image: registry -> registry" "$size" "$m.reg-f" "$m.reg-s"
  row "$image: re-import into the layout" "$size" "$m.again-f" "$m.again-s"
done
echo "targets: layout big >= x2.0, layout many >= x2.5, registry -> registry >= x1.5, RSS <= 64 MiB, re-import >= x1.0"
