#!/usr/bin/env bash
# The test command of the README: lints, then every test in the release profile (one profile for
# everything, so RocksDB's C++ is compiled once).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo build --release --bins
# The fuzz targets (coffer_proto::fuzz, tests/fuzz_rpc.rs) mutate for 60 s each here.
COFFER_FUZZ_SECS="${COFFER_FUZZ_SECS:-60}" cargo test --release --workspace
