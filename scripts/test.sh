#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what it needs, then checks style, lints and
# runs every test: unit, property, corpus, CLI, process-level (Chromium with the Millicast SDK,
# aiortc over WHIP, QUIC between processes), and one pass of each benchmark as a smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust (rustup) first" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
        log "installing $component"
        rustup component add "$component"
    fi
done

log "test dependencies: chromium, the SDK harness (node), aiortc (python venv)"
scripts/setup-test-deps.sh

log "cargo fmt --check"
cargo fmt --all -- --check

log "no two modules import each other (scripts/import-cycles.py)"
python3 scripts/import-cycles.py

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

# The server without the tools (loadgen, replay, probe, in-memory peers) must build on its own.
log "cargo clippy --no-default-features (the server alone)"
cargo clippy --no-default-features --all-targets --quiet -- -D warnings

# The fuzz targets (fuzz/, a crate of its own, run by scripts/fuzz.sh) call the crate through
# `chorus::fuzzing`: they must keep compiling, or they rot unnoticed.
log "cargo check --manifest-path fuzz/Cargo.toml (the fuzz targets)"
cargo check --manifest-path fuzz/Cargo.toml --quiet

# --all-targets also runs each criterion benchmark once, as a smoke test (figures: cargo bench).
log "cargo test --all-targets (unit, property, corpus, CLI, benchmark smoke)"
df -h . | tail -n 1 | awk '{print "disk before the test build: " $4 " free of " $2}'
cargo test --all-targets --quiet

log "doc tests"
cargo test --doc --quiet
df -h . | tail -n 1 | awk '{print "disk at the end: " $4 " free of " $2 "; target/ holds " t}' t="$(du -sh target | cut -f1)"
