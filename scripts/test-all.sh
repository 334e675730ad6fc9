#!/usr/bin/env bash
# Runs every check and test of Local Diffusers, installing what they need first: formatting,
# lints, the Rust tests, the UI's type check and unit tests, a browser test against the real
# server, and a desktop smoke test under Xvfb. This is what CI runs (.ci/run).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup-deps.sh"
cd "$ROOT"
start=$(date +%s)
step() { echo; echo "==> [$(($(date +%s) - start))s] $*"; }

install_system_packages

step "UI: install, type check, unit tests, build"
npm ci --prefix ui --no-audit --no-fund --loglevel=error
npm run --prefix ui check
npm run --prefix ui test
npm run --prefix ui build
npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error

step "Rust: formatting"
cargo fmt --all --check

step "Rust: clippy (all crates, all targets)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "Rust: tests"
# A few tests turn a process-wide switch (the CPU's bf16 products) on and off again; nextest
# runs every test in a process of its own, and without it the tests of one binary run one at a
# time, so no other test ever sees the switch on.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast -- --test-threads=1
fi

step "Build the app binaries"
cargo build --locked -p ld-server -p local-diffusers-desktop

step "Browser tests: the real server's UI in Chromium, with the tiny test models"
mkdir -p tests/out
data=$(mktemp -d)
out=$(mktemp)
./target/debug/local-diffusers serve --port 0 --data-dir "$data" --models-dir models/tiny >"$out" 2>"$out.err" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
url=""
for _ in $(seq 1 100); do
  url=$(sed -n 's/^Local Diffusers is running at //p' "$out")
  [ -n "$url" ] && break
  sleep 0.2
done
[ -n "$url" ] || { echo "server did not start:"; cat "$out.err"; exit 1; }
LD_URL="${url%/}" node --test --test-concurrency=1 tests/browser/*.test.mjs
kill $server; trap - EXIT

step "Desktop smoke test under Xvfb"
xvfb-run -a -s "-screen 0 1280x800x24" bash tests/desktop/smoke.sh target/debug/local-diffusers-desktop

step "All checks passed in $(($(date +%s) - start))s"
