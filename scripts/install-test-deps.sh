#!/usr/bin/env bash
# Installs, from Debian's packages, what factoryd's tests need and the machine lacks.
# Idempotent and quiet: a package already installed is not touched. Needs root (or sudo).
#
# The list grows with the integration tiers; each package is named with the test that uses it.
set -euo pipefail

packages=(
  # Build: git2 and the TLS stack compile C code; pkg-config finds system libraries.
  build-essential pkg-config
  # Integration: tests spawn the real binary and git fixtures; git http-backend serves the
  # sources_git tests (through tests/integration/support/git_http_backend.py, run by python3).
  git python3
  # Build: git2 links the system OpenSSL (https) and libssh2 (ssh); zlib for libgit2 and flate2.
  libssl-dev libssh2-1-dev zlib1g-dev
  # Integration (sources_git ssh_* tests): sshd and ssh-keygen.
  openssh-server openssh-client
  # Benchmark (scripts/bench-sources.sh): curl | tar xz baseline and GNU time for peak RSS.
  curl time
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-test-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
