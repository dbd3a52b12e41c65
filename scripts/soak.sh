#!/usr/bin/env bash
# Soak run (issue 10): `factoryd serve` (release build) with store retention on takes IMPORTS
# import jobs (a few dozen small images, varied sources) and BUILDS Dockerfile builds (tar.gz
# sources), all on loopback, while the worker's RSS, open file descriptors, threads, the store's
# bytes and the work root's entries are sampled every SAMPLE_SECS into a CSV, drawn as a PNG
# (gnuplot). Prints RSS and fds at 10% and at 100% of the jobs, the peak store bytes against
# store.max_bytes, the work root at the end, jobs lost and duplicate results. Sampling starts
# before the first job is submitted; jobs run while the rest are being submitted.
# Usage: [SOAK_DIR=DIR] scripts/soak.sh [IMPORTS] [BUILDS] [SAMPLE_SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

imports=${1:-2000}
builds=${2:-200}
every=${3:-5}
max_bytes=$((8 << 20))
soak=${SOAK_DIR:-/var/tmp/factoryd-soak}
docker=/usr/bin/docker   # Debian's client matches the engine; another on PATH may lack BuildKit

for p in nats-server docker.io docker-registry skopeo busybox-static python3 curl gnuplot-nox; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" && continue
  echo "installing $p"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$p" >/dev/null
done

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 1
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "soak: nothing listens on $1" >&2; exit 1
}

echo "== building factoryd (release)"
cargo build --release --locked --quiet --bin factoryd
bin="$repo/target/release/factoryd"

rm -rf "$soak"; mkdir -p "$soak"/{nats,docker,registry,www,work,store,images}
nats_port=$(free_port); registry_port=$(free_port); www_port=$(free_port); metrics_port=$(free_port)
registry="127.0.0.1:$registry_port"

echo "== starting NATS, a Docker Engine, a registry and a web server (state in $soak)"
nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$soak/nats" > "$soak/nats.log" 2>&1 & pids+=($!)
dockerd --host "unix://$soak/docker.sock" --data-root "$soak/docker/data" --exec-root "$soak/docker/exec" \
  --pidfile "$soak/docker/pid" > "$soak/dockerd.log" 2>&1 & pids+=($!)
cat > "$soak/registry/config.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $soak/registry/data
http:
  addr: $registry
YML
docker-registry serve "$soak/registry/config.yml" > "$soak/registry.log" 2>&1 & pids+=($!)
python3 -m http.server --bind 127.0.0.1 --directory "$soak/www" "$www_port" > "$soak/www.log" 2>&1 & pids+=($!)
for p in "$nats_port" "$registry_port" "$www_port"; do wait_port "$p"; done
export DOCKER_HOST="unix://$soak/docker.sock"
for _ in $(seq 1 150); do $docker info >/dev/null 2>&1 && break; sleep 0.2; done

echo "== pushing a base image and 24 small images (each a file of its own on it)"
mkdir -p "$soak/images/base" && cp /bin/busybox "$soak/images/base/busybox"
printf 'FROM scratch\nCOPY busybox /bin/busybox\n' > "$soak/images/base/Dockerfile"
DOCKER_BUILDKIT=1 $docker build -q -t "$registry/soak/base:1" "$soak/images/base" >/dev/null
$docker push -q "$registry/soak/base:1" >/dev/null
for i in $(seq 0 23); do
  d="$soak/images/img$i"; mkdir -p "$d"
  head -c $((16384 * (i + 1))) /dev/urandom > "$d/data"
  printf 'FROM %s/soak/base:1\nCOPY data /data%s\n' "$registry" "$i" > "$d/Dockerfile"
  DOCKER_BUILDKIT=1 $docker build -q -t "$registry/soak/img$i:1" "$d" >/dev/null
  $docker push -q "$registry/soak/img$i:1" >/dev/null
  $docker rmi -f "$registry/soak/img$i:1" >/dev/null
done
echo "== a tar.gz build source"
mkdir -p "$soak/src"
printf 'FROM %s/soak/base:1\nARG N=0\nRUN ["/bin/busybox", "sh", "-c", "echo $N > /n"]\n' "$registry" > "$soak/src/Dockerfile"
tar -C "$soak/src" -czf "$soak/www/app.tar.gz" .

cat > "$soak/factoryd.toml" <<TOML
[nats]
servers = ["nats://127.0.0.1:$nats_port"]
[worker]
name = "soak"
work_root = "$soak/work"
build_slots = 1
import_slots = 4
[builder]
docker_host = "unix://$soak/docker.sock"
[destination]
path = "$soak/store"
[registries]
insecure = ["$registry"]
[egress]
allow_loopback = true
[store]
keep_per_source = 3
max_bytes = $max_bytes
min_age_secs = 0
gc_interval_secs = 60
[metrics]
listen = "127.0.0.1:$metrics_port"
[log]
format = "json"
level = "warn"
TOML
"$bin" validate --config "$soak/factoryd.toml"
"$bin" serve --config "$soak/factoryd.toml" > "$soak/serve.log" 2>&1 & serve=$!; pids+=($serve)
wait_port "$metrics_port"

total=$((imports + builds))
completed() {
  curl -s "http://127.0.0.1:$metrics_port/metrics" \
    | awk '/^factoryd_jobs_completed_total\{/ && !/outcome="retried"/ && !/outcome="handed_back"/ { s += $2 } END { print s + 0 }'
}
csv="$soak/samples.csv"
echo "seconds,done,rss_kib,fds,threads,store_bytes,work_entries" > "$csv"
echo "== sampling every $every s into $csv until $total jobs are done"
start=$(date +%s)
sample_until_done() {
while :; do
  now=$(( $(date +%s) - start ))
  done_jobs=$(completed)
  rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$serve/status")
  threads=$(awk '/^Threads/ { print $2 }' "/proc/$serve/status")
  fds=$(ls "/proc/$serve/fd" | wc -l)
  store=$(du -sb "$soak/store" 2>/dev/null | cut -f1)
  work=$(ls -A "$soak/work" | wc -l)
  echo "$now,$done_jobs,$rss,$fds,$threads,${store:-0},$work" >> "$csv"
  [ "$done_jobs" -ge "$total" ] && break
  [ "$now" -gt 7200 ] && { echo "soak: gave up after 2 h at $done_jobs of $total"; break; }
  sleep "$every"
done
}
sample_until_done & sampler=$!
echo "== submitting $imports imports (40 sources) and $builds builds (20 sources)"
mkdir -p "$soak/jobs"
for i in $(seq 1 "$imports"); do
  printf '{"v":1,"id":"imp-%d","source_id":"img-src-%d","origin":{"type":"docker-registry","details":{"url":"http://%s","target":"soak/img%d:1"}}}\n' \
    "$i" $((i % 40)) "$registry" $((i % 24)) > "$soak/jobs/imp-$i.json"
done
for i in $(seq 1 "$builds"); do
  printf '{"v":1,"id":"bld-%d","source_id":"bld-src-%d","origin":{"type":"docker-file","details":{"targz_url":"http://127.0.0.1:%d/app.tar.gz"}},"build":{"args":{"N":"%d"}}}\n' \
    "$i" $((i % 20)) "$www_port" "$i" > "$soak/jobs/bld-$i.json"
done
# Interleaved: a build every imports/builds imports.
step=$(( imports / (builds > 0 ? builds : 1) ))
b=1
for i in $(seq 1 "$imports"); do
  "$bin" submit --config "$soak/factoryd.toml" "$soak/jobs/imp-$i.json" >/dev/null 2>&1
  if [ "$builds" -gt 0 ] && [ $((i % step)) -eq 0 ] && [ "$b" -le "$builds" ]; then
    "$bin" submit --config "$soak/factoryd.toml" "$soak/jobs/bld-$b.json" >/dev/null 2>&1; b=$((b + 1))
  fi
done
while [ "$b" -le "$builds" ]; do
  "$bin" submit --config "$soak/factoryd.toml" "$soak/jobs/bld-$b.json" >/dev/null 2>&1; b=$((b + 1))
done

wait "$sampler"
sleep 70 # one more collection after the last job, then a last sample
now=$(( $(date +%s) - start ))
echo "$now,$(completed),$(awk '/^VmRSS/ { print $2 }' "/proc/$serve/status"),$(ls "/proc/$serve/fd" | wc -l),$(awk '/^Threads/ { print $2 }' "/proc/$serve/status"),$(du -sb "$soak/store" | cut -f1),$(ls -A "$soak/work" | wc -l)" >> "$csv"

# Results: one per job, none twice (the results stream, read over NATS' own protocol).
read -r results subjects < <(python3 - "$nats_port" <<'PY'
import json, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
f = s.makefile("rb")
f.readline()
s.sendall(b'CONNECT {"verbose":false}\r\nSUB _soak.reply 1\r\nPUB $JS.API.STREAM.INFO.FACTORY_RESULTS _soak.reply 2\r\n{}\r\nPING\r\n')
while True:
    line = f.readline().decode()
    if line.startswith("MSG"):
        body = json.loads(f.read(int(line.split()[-1])))
        print(body["state"]["messages"], body["state"].get("num_subjects", 0))
        break
PY
)
m() { curl -s "http://127.0.0.1:$metrics_port/metrics" | awk -v k="$1" 'index($0, k) == 1 { s += $2 } END { print s + 0 }'; }
failed=$(m 'factoryd_jobs_completed_total{kind="import",outcome="failed"}')
failed=$((failed + $(m 'factoryd_jobs_completed_total{kind="build",outcome="failed"}')))

gnuplot <<GP
set datafile separator ","
set terminal png size 1200,800
set output "$soak/soak.png"
set multiplot layout 2,2 title "factoryd soak: $imports imports, $builds builds"
set xlabel "seconds"
plot "$csv" using 1:(\$3/1024) skip 1 with lines title "RSS MiB"
plot "$csv" using 1:4 skip 1 with lines title "open fds", "$csv" using 1:5 skip 1 with lines title "threads"
plot "$csv" using 1:(\$6/1048576) skip 1 with lines title "store MiB", $max_bytes/1048576 with lines title "max_bytes"
plot "$csv" using 1:2 skip 1 with lines title "jobs done", "$csv" using 1:7 skip 1 with lines title "work root entries"
unset multiplot
GP

python3 - "$csv" "$total" "$max_bytes" "$results" "$subjects" "$failed" "$soak/soak.png" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
total, max_bytes = int(sys.argv[2]), int(sys.argv[3])
results, subjects, failed, png = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
at = lambda frac: next(r for r in rows if int(r["done"]) >= frac * total)
early, end = at(0.10), rows[-1]
peak_rss = max(int(r["rss_kib"]) for r in rows)
peak = max(int(r["store_bytes"]) for r in rows)
for key, label in (("rss_kib", "RSS KiB"), ("fds", "open fds"), ("threads", "threads")):
    a, b = int(early[key]), int(end[key])
    print(f"{label}: {a} at 10% of the jobs, {b} at 100% ({(b - a) / a * 100:+.1f}%)")
print(f"RSS peak while jobs ran: {peak_rss} KiB ({(peak_rss - int(early['rss_kib'])) / int(early['rss_kib']) * 100:+.1f}% of the 10% figure); the 100% figure is after the last collection, idle")
print(f"store: peak {peak} bytes, store.max_bytes {max_bytes} ({peak / max_bytes:.2f}x)")
print(f"work root entries at the end: {end['work_entries']}")
print(f"jobs: {total} submitted, {results} results for {subjects} jobs: lost {total - subjects}, duplicate results {results - subjects}, failed {failed}")
print(f"samples: {sys.argv[1]}  plot: {png}")
PY
