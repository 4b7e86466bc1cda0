#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: install what is needed,
# check formatting and lints, then run unit and privileged tests (root; in CI a
# missing privilege fails the run instead of skipping).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "==> cargo test"
# Privileged tests start real containers, podman and containerd; two at a
# time keeps them inside a 2-core machine's means.
cargo test --locked --workspace -- --test-threads 2
