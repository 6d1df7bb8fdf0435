#!/usr/bin/env bash
# Runs every check and test of the project. This is the README's test command and what CI runs.
# Usage: scripts/test.sh            (from anywhere inside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Services the test suite talks to: the store and cluster tests need PostgreSQL (Redis is
# for the policy and cache suites). scripts/services.sh starts, and if needed installs, them.
if [ -x scripts/services.sh ]; then
  step "services"
  scripts/services.sh
fi

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  # nextest runs each test in its own process: one hung test cannot stall the others, and
  # its slow-test timeout turns a hang into a failure with a name.
  cargo nextest run --workspace --locked --no-fail-fast
  # nextest does not run doctests.
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked --no-fail-fast
fi

step "Admin API fuzzing (schemathesis against the OpenAPI document)"
ST_EXAMPLES=${ST_EXAMPLES:-15} scripts/schemathesis.sh
