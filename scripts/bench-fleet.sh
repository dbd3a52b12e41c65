#!/usr/bin/env bash
# Fleet benchmark (issue 12): how import throughput scales with worker nodes on one machine,
# and how long a fleet takes to get its throughput back after a node is cut off for 10 s.
#
# Hosts are network namespaces made here (as in the fleet tests, tests/integration/support/
# netns.rs): a switch namespace with a bridge, three nodes each running a nats-server (one
# cluster, R3 assets) and — when the round uses the node — a `factoryd serve` (release build)
# talking to its own node's server, and an infra host with the source and destination
# registries (docker-registry). Addresses 10.213.0.0/24 exist inside the namespaces only;
# nothing is routed off the machine. Everything is stopped by PID and the namespaces deleted on
# exit, whatever happens; namespaces a killed run left behind (fdb-<pid>-…, pid gone) are
# removed first.
#
# Rounds:
#   1, 2, 3 nodes: the same JOBS import jobs (new ids each round) of one small image whose
#     layers the destination already holds (so each job is a manifest GET, blob HEADs and a
#     manifest PUT: I/O and coordination), published before the workers start; throughput =
#     JOBS / (last job finished − first job started), from the workers' logs.
#   partition: 3 nodes, PARTITION_JOBS jobs; once a quarter are done, node-2 is cut off (its
#     switch port down) for CUT_SECS, then healed; prints the completions per second, the
#     throughput before and during the cut, and the time from the heal until a 2 s window runs
#     at 90 % of the rate before the cut again.
# For each round: CPU seconds used by the workers, the NATS servers and the registries (from
# /proc/PID/stat), and how busy the machine's cores were (from /proc/stat), including what
# other processes on the machine used meanwhile.
#
# Environment: JOBS (300), PARTITION_JOBS (3000), SLOTS (import slots per worker, 4),
# CUT_SECS (10), KEEP (set: keep the logs). Needs root, iproute2, nats-server, docker-registry, skopeo, python3.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "bench-fleet: needs root (network namespaces)" >&2; exit 1; }
for p in ip nats-server docker-registry skopeo python3; do
  command -v "$p" >/dev/null || { echo "bench-fleet: $p missing (scripts/install-test-deps.sh)" >&2; exit 1; }
done

JOBS=${JOBS:-300}
PARTITION_JOBS=${PARTITION_JOBS:-3000}
SLOTS=${SLOTS:-4}
CUT_SECS=${CUT_SECS:-10}

cargo build --release --locked --quiet --bin factoryd --example fleet_jobs --example import
BIN=$PWD/target/release/factoryd
PUBLISH=$PWD/target/release/examples/fleet_jobs
SEED=$PWD/target/release/examples/import

P=fdb-$$
DIR=$(mktemp -d /tmp/factoryd-bench-fleet.XXXXXX)
INFRA=10.213.0.2
SRC=$INFRA:5000
DST=$INFRA:5001
node_ip() { echo "10.213.0.1$1"; }

# --- namespaces -------------------------------------------------------------------------------
ns() { echo "$P-$1"; }
kill_pidfile() { # FILE: SIGTERM, then wait (a child of this shell)
  local pid; pid=$(cat "$1" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$1"
}
remove_ns() { # NAME: kill what runs in it by PID, delete it
  local pid
  for pid in $(ip netns pids "$1" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  ip netns del "$1" 2>/dev/null || true
}
cleanup() {
  local f n
  for f in "$DIR"/*.pid; do [ -e "$f" ] && kill_pidfile "$f"; done
  for n in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do remove_ns "$n"; done
  if [ -n "${KEEP:-}" ]; then echo "logs kept in $DIR"; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
for n in $(ip netns list | awk '{print $1}' | grep '^fdb-' || true); do
  pid=${n#fdb-}; pid=${pid%%-*}
  [ -d "/proc/$pid" ] || { echo "removing namespace $n left by run $pid"; remove_ns "$n"; }
done

ip netns add "$(ns switch)"
ip -n "$(ns switch)" link add br0 type bridge
ip -n "$(ns switch)" link set br0 up
add_host() { # NAME IP
  ip netns add "$(ns "$1")"
  ip -n "$(ns "$1")" link set lo up
  ip -n "$(ns switch)" link add "$1" type veth peer name eth0 netns "$(ns "$1")"
  ip -n "$(ns switch)" link set "$1" master br0 up
  ip -n "$(ns "$1")" addr add "$2/24" dev eth0
  ip -n "$(ns "$1")" link set eth0 up
}
add_host infra "$INFRA"
for i in 1 2 3; do add_host "node-$i" "$(node_ip "$i")"; done
cut_off() { ip -n "$(ns switch)" link set "$1" down; }
heal() { ip -n "$(ns switch)" link set "$1" up; }

start() { # NAME HOST COMMAND... (in HOST's namespace, in the background; log NAME.log)
  local name=$1 host=$2; shift 2
  ip netns exec "$(ns "$host")" "$@" >>"$DIR/$name.log" 2>&1 &
  echo $! >"$DIR/$name.pid"
}
wait_port() { # IP PORT
  for _ in $(seq 200); do
    ip netns exec "$(ns infra)" bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "bench-fleet: nothing listens on $1:$2" >&2; exit 1
}

# --- registries and the image -----------------------------------------------------------------
for r in src:5000 dst:5001; do
  name=${r%%:*} port=${r##*:}
  mkdir -p "$DIR/$name"
  cat >"$DIR/$name/config.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $DIR/$name/data}}
http: {addr: $INFRA:$port, secret: bench}
YML
  start "registry-$name" infra docker-registry serve "$DIR/$name/config.yml"
  wait_port "$INFRA" "$port"
done
"$SEED" seed "$DIR/seed" small 2 65536 >/dev/null
ip netns exec "$(ns infra)" skopeo copy -q --dest-tls-verify=false "oci:$DIR/seed:small" "docker://$SRC/app/small:1"
# The destination already holds the layers: each job pushes a manifest only.
ip netns exec "$(ns infra)" skopeo copy -q --src-tls-verify=false --dest-tls-verify=false \
  "docker://$SRC/app/small:1" "docker://$DST/bench:shared"

# --- NATS cluster -----------------------------------------------------------------------------
# Pings every 2 s and a 2 s write deadline, so that a silent partition is noticed in seconds
# (the README's advice to operators; see tests/integration/support/fleet.rs).
printf 'ping_interval: "2s"\nping_max: 2\nwrite_deadline: "2s"\n' >"$DIR/nats.conf"
routes=$(for i in 1 2 3; do printf 'nats://%s:6222,' "$(node_ip "$i")"; done)
for i in 1 2 3; do
  ip=$(node_ip "$i")
  start "nats-$i" "node-$i" nats-server -js -a "$ip" -p 4222 -sd "$DIR/nats-$i" -n "n$i" \
    --cluster_name bench --cluster "nats://$ip:6222" --routes "${routes%,}" -c "$DIR/nats.conf"
done
for i in 1 2 3; do wait_port "$(node_ip "$i")" 4222; done
for _ in $(seq 300); do
  [ "$(grep -l 'metadata leader' "$DIR"/nats-*.log 2>/dev/null | wc -l)" = 3 ] && break
  sleep 0.1
done
servers=$(for i in 1 2 3; do printf '"nats://%s:4222", ' "$(node_ip "$i")"; done)
printf '[nats]\nservers = [%s]\nreplicas = 3\n' "${servers%, }" >"$DIR/client.toml"

worker_config() { # I -> config path
  local ip; ip=$(node_ip "$1")
  cat >"$DIR/node-$1.toml" <<TOML
[nats]
servers = ["nats://$ip:4222"]
replicas = 3
[worker]
name = "node-$1"
work_root = "$DIR/work-$1"
build_slots = 0
import_slots = $SLOTS
min_free_mib = 16
[destination]
kind = "registry"
registry = "http://$DST"
repository = "{source_id}"
tag = "{job_id}"
[registries]
insecure = ["$SRC"]
[egress]
allow_private = true
[metrics]
listen = "$ip:9464"
[log]
format = "text"
level = "info,async_nats=warn"
TOML
  echo "$DIR/node-$1.toml"
}

publish() { # PREFIX COUNT
  for _ in $(seq 30); do
    ip netns exec "$(ns infra)" "$PUBLISH" "$DIR/client.toml" "$1" "$2" "$SRC" app/small:1 >/dev/null 2>"$DIR/publish.err" && return 0
    sleep 1 # the cluster may still be electing its leaders
  done
  cat "$DIR/publish.err" >&2; exit 1
}

finished() { # ROUND -> jobs finished so far in that round's worker logs
  cat "$DIR"/round-"$1"-node-*.log 2>/dev/null | grep -c 'Job finished. outcome="succeeded"' || true
}

cpu_ticks() { # PID -> utime + stime (clock ticks)
  awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}
group_ticks() { # PIDFILE... -> summed ticks
  local sum=0 f
  for f in "$@"; do [ -e "$f" ] && sum=$((sum + $(cpu_ticks "$(cat "$f")"))); done
  echo "$sum"
}
machine() { # -> "busy total" ticks over all cores
  awk '/^cpu / {idle = $5 + $6; total = 0; for (i = 2; i <= NF; i++) total += $i; print total - idle, total}' /proc/stat
}

run_round() { # NAME NODES COUNT [partition]
  local name=$1 nodes=$2 count=$3 partition=${4:-} i
  publish "$name" "$count"
  local nats0 reg0 m0
  nats0=$(group_ticks "$DIR"/nats-*.pid); reg0=$(group_ticks "$DIR"/registry-*.pid); m0=$(machine)
  local give_up=$((SECONDS + 600))
  for i in $(seq "$nodes"); do
    start "round-$name-node-$i" "node-$i" "$BIN" serve --config "$(worker_config "$i")"
  done
  local cut_at="" heal_at=""
  while [ "$(finished "$name")" -lt "$count" ]; do
    if [ -n "$partition" ] && [ -z "$cut_at" ] && [ "$(finished "$name")" -ge $((count / 4)) ]; then
      cut_off node-2; cut_at=$(date +%s.%N)
      sleep "$CUT_SECS"
      heal node-2; heal_at=$(date +%s.%N)
    fi
    if [ "$SECONDS" -gt "$give_up" ]; then
      echo "bench-fleet: round $name did not finish in 10 min ($(finished "$name")/$count)" >&2; exit 1
    fi
    sleep 0.2
  done
  local nats1 reg1 m1 workers=0
  nats1=$(group_ticks "$DIR"/nats-*.pid); reg1=$(group_ticks "$DIR"/registry-*.pid); m1=$(machine)
  for i in $(seq "$nodes"); do workers=$((workers + $(cpu_ticks "$(cat "$DIR/round-$name-node-$i.pid")"))); done
  for i in $(seq "$nodes"); do kill_pidfile "$DIR/round-$name-node-$i.pid"; done
  echo "$name $nodes $count $workers $((nats1 - nats0)) $((reg1 - reg0)) $m0 $m1 ${cut_at:-0} ${heal_at:-0}" >>"$DIR/rounds"
}

echo "== bench-fleet: $JOBS jobs per round, $SLOTS import slots per worker, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
run_round n1 1 "$JOBS"
run_round n2 2 "$JOBS"
run_round n3 3 "$JOBS"
run_round part 3 "$PARTITION_JOBS" partition

python3 - "$DIR" "$(getconf CLK_TCK)" "$(nproc)" <<'PY'
import datetime, glob, re, sys
d, hz, cores = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stamp = re.compile(r'^(\S+Z) .*(Job started\.|Job finished\. outcome="succeeded")')
def times(name):
    started, finished = [], []
    for path in glob.glob(f"{d}/round-{name}-node-*.log"):
        for line in open(path):
            m = stamp.match(line)
            if not m:
                continue
            t = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
            (started if m.group(2).startswith("Job started") else finished).append(t)
    return min(started), sorted(finished)
rates = {}
for row in open(f"{d}/rounds"):
    name, nodes, count, wk, nt, rg, mb0, mt0, mb1, mt1, cut, heal = row.split()
    nodes, count = int(nodes), int(count)
    first, done = times(name)
    secs = done[-1] - first
    rate = count / secs
    busy = (int(mb1) - int(mb0)) / hz
    wall = (int(mt1) - int(mt0)) / hz / cores
    ours = (int(wk) + int(nt) + int(rg)) / hz
    print(f"\n-- {name}: {nodes} node(s), {count} jobs in {secs:.1f} s: {rate:.1f} jobs/s")
    print(f"   CPU: workers {int(wk)/hz:.1f} s ({1000*int(wk)/hz/count:.1f} ms/job), nats-servers "
          f"{int(nt)/hz:.1f} s ({1000*int(nt)/hz/count:.1f} ms/job), registries {int(rg)/hz:.1f} s "
          f"({1000*int(rg)/hz/count:.1f} ms/job)")
    print(f"   machine: {busy/wall:.2f} of {cores} cores busy over {wall:.1f} s; "
          f"other processes {max(busy - ours, 0)/wall:.2f} cores")
    if name.startswith("n"):
        rates[nodes] = rate
    if float(cut) > 0:
        cut, heal = float(cut), float(heal)
        before = [t for t in done if cut - 5 <= t < cut]
        pre = len(before) / 5
        during = len([t for t in done if cut <= t < heal]) / (heal - cut)
        print(f"   before the cut (last 5 s): {pre:.1f} jobs/s; during the {heal-cut:.0f} s cut: {during:.1f} jobs/s")
        resumed = next((t - cut for t in [cut + i / 4 for i in range(int((heal - cut) * 4))]
                        if len([x for x in done if t <= x < t + 2]) / 2 >= 0.5 * pre and t + 2 <= heal), None)
        print("   the other nodes " + (f"were back at half the rate {resumed:.1f} s into the cut"
                                       if resumed is not None else "did not get back to half the rate during the cut"))
        recovered = None
        t = heal
        while t + 2 <= done[-1]:
            if len([x for x in done if t <= x < t + 2]) / 2 >= 0.9 * pre:
                recovered = t - heal
                break
            t += 0.25
        if recovered is None:
            print("   full throughput not back before the run ended")
        else:
            print(f"   full throughput (90 % of before) back {recovered:.1f} s after the heal")
        print("   completions per second from 5 s before the cut:")
        start = int(cut - 5)
        per = {}
        for x in done:
            if x >= start:
                per[int(x) - start] = per.get(int(x) - start, 0) + 1
        marks = {int(cut) - start: "cut", int(heal) - start: "heal"}
        line = " ".join(f"{per.get(s, 0)}{'|' + marks[s] if s in marks else ''}" for s in range(0, int(done[-1]) - start + 1))
        print("   " + line)
if 1 in rates:
    print("\n-- scaling: " + ", ".join(f"{n} node(s) x{rates[n]/rates[1]:.2f}" for n in sorted(rates)))
PY
