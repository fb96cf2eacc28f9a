#!/usr/bin/env bash
# Sets up a fresh machine and runs a hoist agent on the embedded backend with the example container
# (examples/containers.d/web.yaml: the test image serving "v1" on 127.0.0.1:8080). Ctrl-C stops the
# agent; the container keeps running and is adopted by the next start.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p hoist
echo
echo "Agent starting. In another shell try:"
echo "  target/release/hoist -c examples/hoist.yaml status"
echo "  curl 127.0.0.1:8080"
echo "  target/release/hoist -c examples/hoist.yaml kv put HOIST container/web/tag v2"
echo "  target/release/hoist -c examples/hoist.yaml watch"
echo
exec target/release/hoist agent --config examples/hoist.yaml
