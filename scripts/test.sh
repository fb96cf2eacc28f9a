#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every test: unit, backend conformance, and end-to-end tests
# against the real Docker Engine, the local registry and a real nats-server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo nextest run --workspace --no-fail-fast "$@"
