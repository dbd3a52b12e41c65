#!/usr/bin/env bash
# Benchmark of factoryd build jobs on a Docker Engine (Debian's dockerd with its embedded
# BuildKit, started here on a private socket and bridge) and, when a buildkitd binary is at hand
# (FACTORYD_TEST_BUILDKITD_BIN; BuildKit v0.11.6 here), on a standalone buildkitd started here.
#
# 1. Context rows, the same context on every side, without cache (`--no-cache` / `"no_cache":
#    true`), `FROM scratch` + COPY + RUN (busybox-static): a small one (a Dockerfile and a few
#    files) and a ~50 MB one (200 incompressible 256 KiB files).
#      * docker build: `DOCKER_BUILDKIT=1 /usr/bin/docker build --no-cache` (the image left in
#        the engine's store: the client's job ends there);
#      * docker build + OCI layout: the same, then `skopeo copy docker-daemon:… oci:…` (the
#        engine's `docker save`, converted): the product factoryd delivers;
#      * factoryd: `factoryd run JOB --context DIR` — the job's own `timings_ms.total` (job
#        received -> image stored in the OCI layout, the built image removed from the engine)
#        and the process's wall time (adds start-up and config loading).
# 2. Fleet-cache row: a RUN that writes 100 MB of random data and hashes it 8 times (~5 s of
#    CPU), with [builder.cache] on a docker-registry (htpasswd) started here. Cold: the
#    builder's own cache and the shared cache empty (a new source each run). Warm elsewhere:
#    the builder's own cache wiped (`docker builder prune --all`; a buildkitd on a new root), as
#    on another node, and the same source built again from the shared cache. Aim: <= 0.3x.
#
# Prints medians of RUNS runs (FLEET_RUNS for the fleet rows, default 3) and the ratios. Needs
# root (dockerd, buildkitd). Usage: scripts/bench-build.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-5}
fleet_runs=${FLEET_RUNS:-3}
buildkitd_bin=${FACTORYD_TEST_BUILDKITD_BIN:-}
for tool in dockerd /usr/bin/docker ip python3 /bin/busybox skopeo docker-registry htpasswd bc; do
  command -v "$tool" >/dev/null || [ -x "$tool" ] || { echo "bench-build: $tool is required (scripts/install-test-deps.sh)"; exit 1; }
done

echo "== building factoryd (release)"
cargo build --release --quiet --bin factoryd
factoryd=$PWD/target/release/factoryd

work=$(mktemp -d /tmp/factoryd-bench-build.XXXXXX)
bridge="fdkb$((RANDOM % 10000))"
dockerd_pid=""
buildkitd_pid=""
registry_pid=""
stop() { # PID
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 200); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
}
unmount_under() { # DIR
  { grep -o " $1[^ ]*" /proc/self/mounts || true; } | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
}
cleanup() {
  [ -z "$buildkitd_pid" ] || stop "$buildkitd_pid"
  [ -z "$registry_pid" ] || stop "$registry_pid"
  [ -z "$dockerd_pid" ] || stop "$dockerd_pid"
  ip link del "$bridge" 2>/dev/null || true
  unmount_under "$work"
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

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
now_ms() { date +%s%3N; }
ratio() { printf '%.2f' "$(echo "$1 / $2" | bc -l)"; }
job_ms() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["timings_ms"]["total"])' "$1"; }

# `factoryd run` of JOB with CONFIG on the context DIR: the result in $work/result.json, the
# events in $work/run.err, the wall time in ms on stdout.
run_factoryd() { # CONFIG JOB DIR
  local t0 t1
  t0=$(now_ms)
  "$factoryd" run "$2" --config "$1" --context "$3" >"$work/result.json" 2>"$work/run.err" \
    || { cat "$work/run.err" "$work/result.json" >&2; exit 1; }
  t1=$(now_ms)
  echo $((t1 - t0))
}

# A standalone buildkitd on an empty root, at $work/buildkitd.sock.
start_buildkitd() {
  unmount_under "$work/bk-root"
  rm -rf "$work/bk-root" "$work/buildkitd.sock"
  "$buildkitd_bin" --addr "unix://$work/buildkitd.sock" --root "$work/bk-root" \
    --oci-worker=true --containerd-worker=false >>"$work/buildkitd.log" 2>&1 &
  buildkitd_pid=$!
  for _ in $(seq 300); do [ -S "$work/buildkitd.sock" ] && break; sleep 0.1; done
}

# FILE: a config with the [builder] lines BUILDER and the extra sections EXTRA.
write_config() { # FILE BUILDER [EXTRA]
  cat >"$1" <<EOF
[worker]
work_root = "$work/fwork"
[builder]
$2
[destination]
kind = "oci-layout"
path = "$work/store"
${3:-}
EOF
}
engine_lines="docker_host = \"unix://$work/docker.sock\""
standalone_lines="backend = \"buildkitd\"
buildkitd_addr = \"unix://$work/buildkitd.sock\""

backends=(engine)
write_config "$work/engine.toml" "$engine_lines"
if [ -n "$buildkitd_bin" ]; then
  echo "== starting buildkitd ($("$buildkitd_bin" --version | cut -d' ' -f3)) on $work/buildkitd.sock"
  start_buildkitd
  write_config "$work/standalone.toml" "$standalone_lines"
  backends+=(standalone)
else
  echo "== FACTORYD_TEST_BUILDKITD_BIN is not set: no standalone buildkitd rows"
fi

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

bench() { # NAME FILES
  local name=$1 files=$2 dir="$work/ctx-$1"
  make_context "$dir" "$files"
  echo "== $name context: $(du -sh "$dir" | cut -f1) in $(ls "$dir" | wc -l) files"
  cat >"$work/job-$name.json" <<EOF
{"v": 1, "id": "bench-$name", "source_id": "bench", "build": {"no_cache": true},
 "origin": {"type": "docker-file", "details": {"targz_url": "https://example.invalid/unused.tar.gz"}}}
EOF
  # One warm-up of each (caches of the scratch base and the frontend).
  /usr/bin/docker build -q --no-cache -t "bench/$name:warm" "$dir" >/dev/null
  local backend
  for backend in "${backends[@]}"; do
    run_factoryd "$work/$backend.toml" "$work/job-$name.json" "$dir" >/dev/null
    : >"$work/job-$backend.ms"; : >"$work/proc-$backend.ms"
  done
  : >"$work/docker.ms"; : >"$work/layout.ms"
  for i in $(seq "$runs"); do
    local t0 t1 t2
    t0=$(now_ms)
    /usr/bin/docker build -q --no-cache -t "bench/$name:$i" "$dir" >/dev/null
    t1=$(now_ms)
    skopeo copy --quiet --src-daemon-host "unix://$work/docker.sock" \
      "docker-daemon:bench/$name:$i" "oci:$work/baseline:$name-$i"
    t2=$(now_ms)
    echo $((t1 - t0)) >>"$work/docker.ms"
    echo $((t2 - t0)) >>"$work/layout.ms"
    /usr/bin/docker rmi -f "bench/$name:$i" >/dev/null
    for backend in "${backends[@]}"; do
      run_factoryd "$work/$backend.toml" "$work/job-$name.json" "$dir" >>"$work/proc-$backend.ms"
      job_ms "$work/result.json" >>"$work/job-$backend.ms"
    done
  done
  local d l j p
  d=$(median <"$work/docker.ms"); l=$(median <"$work/layout.ms")
  printf '   docker build                        %6d ms (median of %d)\n' "$d" "$runs"
  printf '   docker build + OCI layout (skopeo)  %6d ms\n' "$l"
  for backend in "${backends[@]}"; do
    j=$(median <"$work/job-$backend.ms"); p=$(median <"$work/proc-$backend.ms")
    printf '   factoryd job, %-10s            %6d ms   %sx docker build   %sx build + layout\n' \
      "$backend" "$j" "$(ratio "$j" "$d")" "$(ratio "$j" "$l")"
    printf '   factoryd run process, %-10s    %6d ms   %sx docker build   %sx build + layout\n' \
      "$backend" "$p" "$(ratio "$p" "$d")" "$(ratio "$p" "$l")"
  done
}

# The shared cache's registry: docker-registry with htpasswd auth on a free loopback port.
start_cache_registry() {
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  htpasswd -cbB "$work/cache.htpasswd" cacher cache-bench-pass 2>/dev/null
  printf 'cache-bench-pass\n' >"$work/cache.pass"
  cat >"$work/registry.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/cache-registry
http:
  addr: 127.0.0.1:$port
  secret: factoryd-bench
auth:
  htpasswd:
    realm: bench
    path: $work/cache.htpasswd
EOF
  docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
  registry_pid=$!
  for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  cache_registry="127.0.0.1:$port"
}

# The builder's own cache gone, as on another node.
wipe() { # BACKEND
  if [ "$1" = engine ]; then
    /usr/bin/docker builder prune --all --force >/dev/null
  else
    stop "$buildkitd_pid"
    start_buildkitd
  fi
}

fleet() {
  local dir="$work/ctx-fleet"
  mkdir -p "$dir"
  cp /bin/busybox "$dir/busybox"
  cat >"$dir/Dockerfile" <<'EOF'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox head -c 100000000 /dev/urandom > /data && for i in 1 2 3 4 5 6 7 8; do /bin/busybox sha256sum /data; done > /sums"]
EOF
  start_cache_registry
  echo "== fleet cache: a RUN writing 100 MB and hashing it 8 times; cache registry $cache_registry"
  local backend lines
  for backend in "${backends[@]}"; do
    lines=$engine_lines
    [ "$backend" = engine ] || lines=$standalone_lines
    write_config "$work/fleet-$backend.toml" "$lines" "[builder.cache]
registry = \"$cache_registry\"
repository = \"buildcache/{source_id}\"
username = \"cacher\"
password_file = \"$work/cache.pass\""
    : >"$work/cold.ms"; : >"$work/warm.ms"
    for i in $(seq "$fleet_runs"); do
      # A source of its own per run: the shared cache starts empty for it.
      local source="fleet-$backend-$i" phase
      for phase in cold warm; do
        cat >"$work/job-fleet.json" <<EOF
{"v": 1, "id": "$source-$phase", "source_id": "$source",
 "origin": {"type": "docker-file", "details": {"targz_url": "https://example.invalid/unused.tar.gz"}}}
EOF
        wipe "$backend"
        run_factoryd "$work/fleet-$backend.toml" "$work/job-fleet.json" "$dir" >/dev/null
        job_ms "$work/result.json" >>"$work/$phase.ms"
        if grep -q 'warning (build_cache)' "$work/run.err"; then
          echo "fleet-cache: the shared cache was not used:" >&2; cat "$work/run.err" >&2; exit 1
        fi
        if [ "$phase" = warm ] && ! grep -q ' CACHED' "$work/run.err"; then
          echo "fleet-cache: the warm build ran its steps again:" >&2; cat "$work/run.err" >&2; exit 1
        fi
      done
    done
    local c w
    c=$(median <"$work/cold.ms"); w=$(median <"$work/warm.ms")
    printf '   %-10s cold %6d ms   warm elsewhere %6d ms   ratio %sx   (job totals, median of %d)\n' \
      "$backend" "$c" "$w" "$(ratio "$w" "$c")" "$fleet_runs"
  done
}

bench small 1
bench 50mb 200
fleet
