#!/usr/bin/env bash
# The test command of the README: lints, then every test in the release profile (one profile for
# everything, so RocksDB's C++ is compiled once).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo build --release --bins
cargo test --release --workspace
