#!/usr/bin/env bash
# Benchmark of a factoryd build job against `docker build` on the same Docker Engine (Debian's
# dockerd with its embedded BuildKit, started here on a private socket and bridge), for the same
# context: a small one (a Dockerfile and a few files) and a ~50 MB one (200 incompressible
# 256 KiB files). Both sides build without cache (`--no-cache` / `"no_cache": true`) from
# `FROM scratch` + COPY + RUN (busybox-static), so the engine does the same work.
#
#   * docker build: `DOCKER_BUILDKIT=1 /usr/bin/docker build --no-cache` (image left in the
#     engine's store: the client's job ends there);
#   * factoryd: `factoryd run JOB --context DIR` — the job's own `timings_ms.total` (job received
#     → image stored in the OCI layout, built image removed from the engine) and the process's
#     wall time (adds start-up and config loading).
#
# Prints the median of RUNS runs of each and the ratios (aim: <= 1.10x). Needs root (dockerd).
# Usage: scripts/bench-build.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-5}
for tool in dockerd /usr/bin/docker ip python3 /bin/busybox; do
  command -v "$tool" >/dev/null || [ -x "$tool" ] || { echo "bench-build: $tool is required (scripts/install-test-deps.sh)"; exit 1; }
done

echo "== building factoryd (release)"
cargo build --release --quiet --bin factoryd
factoryd=$PWD/target/release/factoryd

work=$(mktemp -d /tmp/factoryd-bench-build.XXXXXX)
bridge="fdkb$((RANDOM % 10000))"
dockerd_pid=""
cleanup() {
  if [ -n "$dockerd_pid" ]; then
    kill -TERM "$dockerd_pid" 2>/dev/null || true
    for _ in $(seq 200); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.1; done
  fi
  ip link del "$bridge" 2>/dev/null || true
  umount -R -l "$work/data" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== starting dockerd on $work/docker.sock (bridge $bridge)"
ip link add "$bridge" type bridge
ip addr add "10.254.$((RANDOM % 250)).1/24" dev "$bridge"
ip link set "$bridge" up
dockerd --host "unix://$work/docker.sock" --data-root "$work/data" --exec-root "$work/exec" \
  --pidfile "$work/dockerd.pid" --bridge "$bridge" --iptables=false --ip-masq=false \
  --ip-forward=false >"$work/dockerd.log" 2>&1 &
dockerd_pid=$!
export DOCKER_HOST="unix://$work/docker.sock" DOCKER_BUILDKIT=1 DOCKER_CONFIG="$work/client"
for _ in $(seq 300); do /usr/bin/docker version >/dev/null 2>&1 && break; sleep 0.1; done

cat >"$work/factoryd.toml" <<EOF
[worker]
work_root = "$work/fwork"
[builder]
docker_host = "unix://$work/docker.sock"
[destination]
kind = "oci-layout"
path = "$work/store"
EOF

make_context() { # DIR FILES
  mkdir -p "$1"
  cp /bin/busybox "$1/busybox"
  python3 - "$1" "$2" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    with open(os.path.join(root, f"data{i:04d}.bin"), "wb") as f:
        f.write(os.urandom(256 * 1024))
with open(os.path.join(root, "Dockerfile"), "w") as f:
    f.write('FROM scratch\nCOPY . /ctx\nRUN ["/ctx/busybox", "sh", "-c", "/ctx/busybox ls /ctx | /ctx/busybox wc -l > /count"]\n')
PY
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
now_ms() { date +%s%3N; }

bench() { # NAME FILES
  local name=$1 files=$2 dir="$work/ctx-$1"
  make_context "$dir" "$files"
  echo "== $name context: $(du -sh "$dir" | cut -f1) in $(ls "$dir" | wc -l) files"
  cat >"$work/job-$name.json" <<EOF
{"v": 1, "id": "bench-$name", "source_id": "bench", "build": {"no_cache": true},
 "origin": {"type": "docker-file", "details": {"targz_url": "https://example.invalid/unused.tar.gz"}}}
EOF
  # One warm-up of each (engine caches of the scratch base and the frontend).
  /usr/bin/docker build -q --no-cache -t "bench/$name:warm" "$dir" >/dev/null
  "$factoryd" run "$work/job-$name.json" --config "$work/factoryd.toml" --context "$dir" >/dev/null 2>&1
  : >"$work/docker.ms"; : >"$work/job.ms"; : >"$work/proc.ms"
  for i in $(seq "$runs"); do
    local t0 t1
    t0=$(now_ms)
    /usr/bin/docker build -q --no-cache -t "bench/$name:$i" "$dir" >/dev/null
    t1=$(now_ms)
    echo $((t1 - t0)) >>"$work/docker.ms"
    t0=$(now_ms)
    "$factoryd" run "$work/job-$name.json" --config "$work/factoryd.toml" --context "$dir" \
      >"$work/result.json" 2>"$work/run.err" || { cat "$work/run.err" "$work/result.json"; exit 1; }
    t1=$(now_ms)
    echo $((t1 - t0)) >>"$work/proc.ms"
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["timings_ms"]["total"])' \
      "$work/result.json" >>"$work/job.ms"
  done
  local d j p
  d=$(median <"$work/docker.ms"); j=$(median <"$work/job.ms"); p=$(median <"$work/proc.ms")
  printf '   docker build          %6d ms (median of %d)\n' "$d" "$runs"
  printf '   factoryd job          %6d ms   ratio %.2fx   (job received -> image stored)\n' "$j" "$(echo "$j / $d" | bc -l)"
  printf '   factoryd run process  %6d ms   ratio %.2fx   (with process start-up)\n' "$p" "$(echo "$p / $d" | bc -l)"
}

bench small 1
bench 50mb 200
