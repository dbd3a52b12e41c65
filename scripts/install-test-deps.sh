#!/usr/bin/env bash
# Installs, from Debian's packages, what factoryd's tests need and the machine lacks.
# Idempotent and quiet: a package already installed is not touched. Needs root (or sudo).
#
# The list grows with the integration tiers; each package is named with the test that uses it.
set -euo pipefail

packages=(
  # Build: git2 and the TLS stack compile C code; pkg-config finds system libraries.
  build-essential pkg-config
  # Integration: tests spawn the real binary and git fixtures.
  git python3
  # Integration (worker_nats): JetStream servers and a 3-node cluster.
  nats-server
  # import_* tests and scripts/bench-import.sh: real registries (distribution), images pushed
  # and inspected with skopeo, htpasswd files for basic auth (import_auth, import_credentials),
  # keys and token signatures for the token service (import_auth::token_auth_*), and Python
  # for the token service and moto's ECR server (import_credentials::ecr_*).
  docker-registry skopeo apache2-utils openssl python3-venv
  # Build: git2 links the system OpenSSL (https) and libssh2 (ssh, which links the system zlib);
  # libgit2 and flate2 use zlib-ng, which libz-sys builds from its vendored source with cmake.
  libssl-dev libssh2-1-dev zlib1g-dev cmake
  # Integration (sources_git ssh_* tests): sshd and ssh-keygen.
  openssh-server openssh-client
  # Benchmark (scripts/bench-sources.sh): curl | tar xz baseline and GNU time for peak RSS.
  curl time
  # Integration (ops::prometheus_*, ops::promtool_*): a real Prometheus server scraping a
  # worker, and promtool linting the /metrics exposition.
  prometheus
  # Integration (ops::systemd_analyze_*, ops::sysusers_*, ops::tmpfiles_*): systemd-analyze
  # verify/security, systemd-sysusers and systemd-tmpfiles on the files in systemd/.
  systemd
  # builds::* tests, cli::run_* and scripts/bench-build.sh: Debian's Docker Engine (dockerd with
  # its embedded BuildKit, and the matching /usr/bin/docker client for checks and baselines),
  # busybox-static for base images made from scratch, procps (ps) to check that a cancelled
  # RUN step's process is gone, iproute2 for each test engine's private network bridge.
  docker.io busybox-static procps iproute2
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "install-test-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq >/dev/null
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# import_credentials::ecr_token_from_moto_*: moto's AWS API server, from PyPI, in a venv local
# to the checkout (the test harness looks for .factoryd-test/venv/bin/moto_server first).
venv=".factoryd-test/venv"
if [ ! -x "$venv/bin/moto_server" ]; then
  echo "install-test-deps: installing moto[server] into $venv" >&2
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'moto[server]>=5,<6'
fi
