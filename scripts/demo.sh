#!/usr/bin/env bash
# The README's first command: factoryd's main job on one machine, nothing from the internet.
#
# Installs what is missing (Debian packages; needs root or sudo), starts on loopback a NATS
# server with JetStream, a Docker Engine (for BuildKit), a local registry, a git HTTP server and
# a web server for tarballs, builds factoryd, starts `factoryd serve`, and submits three jobs:
# a Dockerfile build from a git repository, one from a tar.gz, and an image import from the
# local registry. It shows their progress and results, and a few lines of /metrics.
#
#   scripts/demo.sh         run the demo (everything stays up afterwards, to look around)
#   scripts/demo.sh stop    stop everything the demo started
#
# State lives in $FACTORYD_DEMO_DIR (default /tmp/factoryd-demo).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
demo=${FACTORYD_DEMO_DIR:-/tmp/factoryd-demo}
docker=/usr/bin/docker   # Debian's client matches the engine; another on PATH may lack BuildKit

stop() {
  if [ -f "$demo/pids" ]; then
    while read -r pid name; do
      kill "$pid" 2>/dev/null && echo "stopped $name ($pid)" || true
    done < "$demo/pids"
    sleep 1
    while read -r pid _; do kill -9 "$pid" 2>/dev/null || true; done < "$demo/pids"
    rm -f "$demo/pids"
  fi
}

if [ "${1:-}" = "stop" ]; then
  stop
  exit 0
fi
stop

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
started() { echo "$1 $2" >> "$demo/pids"; }
wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "demo: nothing listens on port $1 ($2); see $demo/*.log" >&2
  exit 1
}

step "installing what is missing"
packages=(nats-server docker.io docker-registry skopeo busybox-static git python3 curl build-essential pkg-config libssl-dev libssh2-1-dev zlib1g-dev cmake)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq >/dev/null
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "demo: cargo is required (rustup)"; exit 1; }

step "building factoryd"
cargo build --locked --quiet
bin="$repo/target/debug/factoryd"
"$bin" version

rm -rf "$demo"
mkdir -p "$demo"/{nats,docker,registry,git,www,work,store,src/app-one}
nats_port=$(free_port); registry_port=$(free_port); git_port=$(free_port)
www_port=$(free_port); metrics_port=$(free_port)
registry="127.0.0.1:$registry_port"

step "starting NATS (JetStream), a Docker Engine, a registry, a git server and a web server"
nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$demo/nats" > "$demo/nats.log" 2>&1 &
started $! nats-server
dockerd --host "unix://$demo/docker.sock" --data-root "$demo/docker/data" \
  --exec-root "$demo/docker/exec" --pidfile "$demo/docker/pid" > "$demo/dockerd.log" 2>&1 &
started $! dockerd
cat > "$demo/registry/config.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $demo/registry/data
http:
  addr: 127.0.0.1:$registry_port
YML
docker-registry serve "$demo/registry/config.yml" > "$demo/registry.log" 2>&1 &
started $! docker-registry
python3 "$repo/tests/integration/support/git_http_backend.py" "$git_port" "$demo/git" demo demo-password "$demo/git.log" > /dev/null 2>&1 &
started $! git-http-backend
python3 -m http.server --bind 127.0.0.1 --directory "$demo/www" "$www_port" > "$demo/www.log" 2>&1 &
started $! http.server
for p in "$nats_port" "$registry_port" "$git_port" "$www_port"; do wait_port "$p" service; done
export DOCKER_HOST="unix://$demo/docker.sock"
for _ in $(seq 1 100); do $docker info >/dev/null 2>&1 && break; sleep 0.2; done

step "making a base image locally (busybox, FROM scratch) and pushing it to $registry"
mkdir -p "$demo/base" && cp /bin/busybox "$demo/base/busybox"
printf 'FROM scratch\nCOPY busybox /bin/busybox\nCMD ["/bin/busybox", "sh"]\n' > "$demo/base/Dockerfile"
DOCKER_BUILDKIT=1 $docker build -q -t "$registry/demo/busybox:1" "$demo/base" >/dev/null
$docker push -q "$registry/demo/busybox:1" >/dev/null
$docker rmi -f "$registry/demo/busybox:1" >/dev/null
echo "pushed $registry/demo/busybox:1"

step "making the sources: a git repository and a tar.gz with /app-one/Dockerfile"
cat > "$demo/src/app-one/Dockerfile" <<DOCKERFILE
FROM $registry/demo/busybox:1
COPY app-one/hello.txt /hello.txt
RUN ["/bin/busybox", "sh", "-c", "echo built by factoryd > /built.txt"]
DOCKERFILE
echo "hello from the demo" > "$demo/src/app-one/hello.txt"
echo "a file .dockerignore keeps out of the context" > "$demo/src/secret.env"
echo "secret.env" > "$demo/src/.dockerignore"
git -C "$demo/src" init -q -b main
git -C "$demo/src" add -A
git -C "$demo/src" -c user.name=demo -c user.email=demo@localhost commit -q -m "demo app"
git clone -q --bare "$demo/src" "$demo/git/app.git"
tar -C "$demo/src" --exclude=.git -czf "$demo/www/app.tar.gz" .

cat > "$demo/factoryd.toml" <<TOML
[nats]
servers = ["nats://127.0.0.1:$nats_port"]
[worker]
name = "demo"
work_root = "$demo/work"
build_slots = 1
import_slots = 2
[builder]
docker_host = "unix://$demo/docker.sock"
[destination]
path = "$demo/store"
[registries]
insecure = ["$registry"]
[git]
insecure_hosts = ["127.0.0.1"]
[egress]
allow_loopback = true
[metrics]
listen = "127.0.0.1:$metrics_port"
[log]
format = "text"
TOML

step "starting factoryd serve (log: $demo/serve.log)"
"$bin" validate --config "$demo/factoryd.toml"
"$bin" serve --config "$demo/factoryd.toml" > "$demo/serve.log" 2>&1 &
started $! "factoryd serve"
wait_port "$metrics_port" "factoryd metrics"

cat > "$demo/build-git.json" <<JSON
{"v": 1, "id": "demo-build-git", "source_id": "app-one",
 "origin": {"type": "docker-file", "details": {
   "repo": {"url": "http://127.0.0.1:$git_port/app.git", "branch": "main",
            "auth": {"type": "http", "credentials": {"username": "demo", "password": "demo-password"}}},
   "context_dir": "/", "build_file": "/app-one/Dockerfile"}}}
JSON
cat > "$demo/build-targz.json" <<JSON
{"v": 1, "id": "demo-build-targz", "source_id": "app-one-tgz",
 "origin": {"type": "docker-file", "details": {
   "targz_url": "http://127.0.0.1:$www_port/app.tar.gz",
   "context_dir": "/", "build_file": "/app-one/Dockerfile"}}}
JSON
cat > "$demo/import.json" <<JSON
{"v": 1, "id": "demo-import", "source_id": "busybox",
 "origin": {"type": "docker-registry", "details": {"url": "http://$registry", "target": "demo/busybox:1"}}}
JSON

status=0
for job in build-git build-targz import; do
  step "submitting $job (progress on stderr, result on stdout)"
  "$bin" submit --config "$demo/factoryd.toml" --follow --wait-timeout-secs 300 "$demo/$job.json" \
    | tee "$demo/$job.result.json" || status=1
done

step "what the OCI layout store holds (skopeo inspect)"
for ref in app-one:demo-build-git app-one-tgz:demo-build-targz busybox:demo-import; do
  if skopeo inspect --format '{{.Digest}}  {{.Architecture}}  {{len .Layers}} layer(s)' "oci:$demo/store:$ref" 2>/dev/null; then
    echo "  ^ oci:$demo/store:$ref"
  fi
done

step "a few lines of /metrics (http://127.0.0.1:$metrics_port/metrics)"
curl -s "http://127.0.0.1:$metrics_port/metrics" \
  | grep -E '^factoryd_(jobs_completed_total|fetched_bytes_total|build_info|nats_connected)' \
  | grep -v ' 0$' || true

echo
echo "Everything is still running: NATS on $nats_port, the registry on $registry, factoryd's"
echo "metrics on $metrics_port. Submit more with:"
echo "  $bin submit --config $demo/factoryd.toml --follow JOB.json"
echo "Stop everything the demo started with:  scripts/demo.sh stop"
exit $status
