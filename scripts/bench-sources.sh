#!/usr/bin/env bash
# Benchmark of factoryd's source fetch+seal (to the end of the context tar stream) against the
# tools a person would use, measured in the same run on loopback servers:
#   * git:    a generated 5,000-file / ~50 MB repository served by `git http-backend`
#             (tests/integration/support/git_http_backend.py), branch tip, vs `git clone --depth 1
#             --no-checkout` (git's fetch and index, target <= 1.0x); for reference the full
#             `git clone --depth 1`, and git's own floor for the same output: that fetch plus
#             `git archive` of the commit (the tar stream factoryd's seal produces);
#   * tar.gz: a generated 10,000-file archive served by `python3 -m http.server`,
#             vs `curl | tar xz`.
# Prints wall times, ratios (targets: <= 1.0x and <= 0.3x) and peak RSS of every side; then
# factoryd as the daemon runs it by default, the fetch and seal in a confined child process
# (`sources.isolation = "process"`), against factoryd in-process (target <= 1.05x), and the
# floor of that: the context moved through a pipe between two processes.
# Usage: [BENCH_DIR=DIR] [RUNS=N] scripts/bench-sources.sh [FILES] [TAR_FILES]
set -euo pipefail
cd "$(dirname "$0")/.."

files=${1:-5000}
tar_files=${2:-10000}
for tool in git curl tar python3 /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "bench-sources: $tool is required"; exit 1; }
done

echo "== building the fetch_seal example and factoryd (release)"
cargo build --release --quiet --example fetch_seal --bin factoryd
bench_bin=target/release/examples/fetch_seal
factoryd_bin=$(pwd)/target/release/factoryd

# Everything the runs write (checkouts, extractions, factoryd's workspace) goes to one file
# system, tmpfs by default: on a disk, the cost of creating files swings by several times with
# what was deleted before (ext4 scans recently deleted inodes when it allocates), which moves
# the baselines, not factoryd. BENCH_DIR=/some/disk/dir measures on a disk instead.
bench_root=${BENCH_DIR:-/dev/shm}
work=$(mktemp -d "$bench_root/factoryd-bench.XXXXXX")
mkdir -p "$work/tmp"
export TMPDIR="$work/tmp"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
# Runs a command under GNU time after `sync` (so no run pays for the writeback of the one
# before); prints "<seconds> <peak RSS KiB>".
measure() { sync; /usr/bin/time -f "%e %M" -o "$work/time.out" "$@" >>"$work/stdout.txt" 2>"$work/err.out" || { cat "$work/err.out"; exit 1; }; cat "$work/time.out"; }
# Runs fetch_seal and prints its own figures of the timed job, "<seconds> <peak RSS KiB>" (for
# --warm runs, whose process time includes the warm-up job).
measure_self() { sync; "$@" >"$work/self.out" 2>"$work/err.out" || { cat "$work/err.out"; exit 1; }; awk '{sub(/s$/, "", $2); print $2, $(NF-1)}' "$work/self.out"; }

echo "== generating a $files-file git repository (~10 KiB per file)"
src="$work/src"; mkdir -p "$src"
python3 - "$src" "$files" <<'PY'
import os, sys, random
root, n = sys.argv[1], int(sys.argv[2])
rnd = random.Random(42)
alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n{}();=+-*/"
for i in range(n):
    d = os.path.join(root, f"pkg{i // 50:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"file{i:05d}.txt"), "wb") as f:
        f.write(bytes(rnd.choice(alphabet) for _ in range(10240)))
with open(os.path.join(root, "Dockerfile"), "w") as f:
    f.write("FROM scratch\nCOPY . /\n")
PY
export GIT_AUTHOR_NAME=b GIT_AUTHOR_EMAIL=b@example.com GIT_COMMITTER_NAME=b GIT_COMMITTER_EMAIL=b@example.com
git -C "$src" init -q -b main
git -C "$src" add -A
git -C "$src" commit -q -m bench
mkdir -p "$work/repos"
git clone -q --bare "$src" "$work/repos/bench.git"
# Served repositories are packed (as on any git server); a local clone leaves loose objects,
# which would make the server recompress every object on each fetch, for both sides alike.
git -C "$work/repos/bench.git" repack -a -d -q
echo "   repository: $(du -sh "$src" --exclude=.git | cut -f1) in $(git -C "$src" ls-files | wc -l) files"

echo "== generating a $tar_files-file tar.gz"
tsrc="$work/tsrc"; mkdir -p "$tsrc"
python3 - "$tsrc" "$tar_files" <<'PY'
import os, sys, random
root, n = sys.argv[1], int(sys.argv[2])
rnd = random.Random(7)
for i in range(n):
    d = os.path.join(root, f"dir{i // 100:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05d}.txt"), "wb") as f:
        f.write(os.urandom(256) + b"x" * rnd.randint(0, 4096))
with open(os.path.join(root, "Dockerfile"), "w") as f:
    f.write("FROM scratch\n")
PY
mkdir -p "$work/www"
tar -czf "$work/www/src.tar.gz" -C "$tsrc" .
echo "   archive: $(du -h "$work/www/src.tar.gz" | cut -f1) compressed, $tar_files files"

git_port=$(free_port)
python3 tests/integration/support/git_http_backend.py "$git_port" "$work/repos" bench benchpw "$work/http.log" 2>/dev/null &
pids+=($!)
www_port=$(free_port)
(cd "$work/www" && exec python3 -m http.server "$www_port" --bind 127.0.0.1 >/dev/null 2>&1) &
pids+=($!)
wait_port "$git_port"; wait_port "$www_port"
git_url="http://127.0.0.1:$git_port/bench.git"
tar_url="http://127.0.0.1:$www_port/src.tar.gz"

runs=${RUNS:-5}
best() { sort -n | head -1; }
echo "== git: $runs runs each, best wall time"
: > "$work/git_clone.txt"; : > "$work/git_factoryd.txt"; : > "$work/git_nocheckout.txt"; : > "$work/git_archive.txt"; : > "$work/git_child.txt"; : > "$work/git_warm.txt"
for r in $(seq $runs); do
  rm -rf "$work/clone"
  measure git -c credential.helper= clone -q --depth 1 --no-tags "http://bench:benchpw@127.0.0.1:$git_port/bench.git" "$work/clone" >> "$work/git_clone.txt"
  # For reference: git's own fetch and index, without the checkout.
  rm -rf "$work/clone"
  measure git -c credential.helper= clone -q --depth 1 --no-tags --no-checkout "http://bench:benchpw@127.0.0.1:$git_port/bench.git" "$work/clone" >> "$work/git_nocheckout.txt"
  # What git itself takes to turn those objects into the tar stream factoryd's seal sends.
  measure bash -c "git -C '$work/clone' archive --format=tar HEAD | wc -c >/dev/null" >> "$work/git_archive.txt"
  measure "$bench_bin" --git "$git_url" --user bench --password benchpw >> "$work/git_factoryd.txt"
  measure_self "$bench_bin" --git "$git_url" --user bench --password benchpw --warm >> "$work/git_warm.txt"
  measure_self "$bench_bin" --git "$git_url" --user bench --password benchpw --warm --child "$factoryd_bin" >> "$work/git_child.txt"
done
echo "== tar.gz: $runs runs each, best wall time"
: > "$work/tar_curl.txt"; : > "$work/tar_factoryd.txt"; : > "$work/tar_child.txt"; : > "$work/tar_warm.txt"
for r in $(seq $runs); do
  rm -rf "$work/x"; mkdir -p "$work/x"
  measure bash -c "curl -s '$tar_url' | tar xz -C '$work/x'" >> "$work/tar_curl.txt"
  measure "$bench_bin" --targz "$tar_url" >> "$work/tar_factoryd.txt"
  measure_self "$bench_bin" --targz "$tar_url" --warm >> "$work/tar_warm.txt"
  measure_self "$bench_bin" --targz "$tar_url" --warm --child "$factoryd_bin" >> "$work/tar_child.txt"
done

report() { # label baseline-file factoryd-file target
  local base ours ratio
  base=$(cut -d' ' -f1 "$2" | best); ours=$(cut -d' ' -f1 "$3" | best)
  ratio=$(python3 -c "print(f'{$ours/$base:.2f}')")
  printf '%-8s baseline %6.2fs (peak RSS %s KiB)  factoryd %6.2fs (peak RSS %s KiB)  ratio %sx (target <= %sx)\n' \
    "$1" "$base" "$(cut -d' ' -f2 "$2" | sort -n | tail -1)" "$ours" "$(cut -d' ' -f2 "$3" | sort -n | tail -1)" "$ratio" "$4"
}
echo
echo "== results (best of $runs; RSS is the worst run)"
report "git" "$work/git_nocheckout.txt" "$work/git_factoryd.txt" 1.0
report "tar.gz" "$work/tar_curl.txt" "$work/tar_factoryd.txt" 0.3
nocheckout=$(cut -d' ' -f1 "$work/git_nocheckout.txt" | best)
archive=$(cut -d' ' -f1 "$work/git_archive.txt" | best)
ours=$(cut -d' ' -f1 "$work/git_factoryd.txt" | best)
echo "reference: git clone --depth 1 (with checkout) $(cut -d' ' -f1 "$work/git_clone.txt" | best)s"
python3 -c "f=$nocheckout+$archive; print(f'floor:     git clone --depth 1 --no-checkout {$nocheckout:.2f}s + git archive {$archive:.2f}s = {f:.2f}s (git producing the same stream); factoryd {$ours/f:.2f}x of it')"
echo
echo "== the confined child (the default) against factoryd in-process, both after one warm-up job"
echo "   (wall time of the second job; RSS: the parent process only)"
report "git" "$work/git_warm.txt" "$work/git_child.txt" 1.05
report "tar.gz" "$work/tar_warm.txt" "$work/tar_child.txt" 1.05
# The floor of the child's extra work: its context crosses a pipe into the worker. Timed here
# for the tar.gz context's size: one process writing it into a pipe (1 MiB, as the worker
# asks) in 256 KiB writes, another reading it (best of 5).
tar_bytes=$(grep '^fetch+seal' "$work/stdout.txt" | tail -1 | sed -E 's/.*context stream ([0-9]+) B.*/\1/')
python3 - "$tar_bytes" "$(cut -d' ' -f1 "$work/tar_warm.txt" | best)" "$(cut -d' ' -f1 "$work/tar_child.txt" | best)" <<'PY'
import os, sys, time
n, warm, child = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
chunk = b"\0" * (256 << 10)
best = None
for _ in range(5):
    r, w = os.pipe()
    try:
        import fcntl
        fcntl.fcntl(r, 1031, 1 << 20)  # F_SETPIPE_SZ
    except OSError:
        pass
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        left = n
        while left > 0:
            left -= os.write(w, chunk[: min(left, len(chunk))])
        os._exit(0)
    os.close(w)
    while os.read(r, 1 << 20):
        pass
    os.waitpid(pid, 0)
    took = time.perf_counter() - start
    os.close(r)
    best = took if best is None else min(best, took)
print(f"floor:  the tar.gz context ({n / 2**20:.1f} MiB) through a pipe between two processes {best:.3f}s; "
      f"in-process + that = {warm + best:.2f}s; the child {child / (warm + best):.2f}x of it")
PY
echo
echo "== factoryd's own figures, every run (git first)"
grep '^fetch+seal' "$work/stdout.txt"
