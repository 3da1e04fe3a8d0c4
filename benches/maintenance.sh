#!/usr/bin/env bash
# End-to-end maintenance bench (issue 12): the Linux tree × 10 snapshots, then
#  1. a maintenance run with nothing to collect (the mark of 10 snapshots),
#  2. a run after deleting the 5 snapshots of `linux-mod` (collects what only they held),
#  3. a backup of fresh data timed alone and while maintenance runs in a loop (the slowdown a
#     backup sees from a concurrent collection; the loop runs with grace 0 so every run works).
# Data: /var/tmp/bench-data/{linux,linux-mod} (../shared/bench/run.sh prepare). Build first:
#   cargo build --release --bins && bash benches/maintenance.sh
# Prints one `figure: value` per line; nothing here is a pass/fail check.
set -euo pipefail
BIN=${COFFER_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
DATA=${BENCH_DATA:-/var/tmp/bench-data}
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/coffer-maint.XXXXXX")
trap 'kill "${PID:-}" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
export COFFER_REPO_PASSWORD=bench-password COFFER_USER_PASSWORD=bench-password COFFER_PASSWORD=bench-password
export COFFER_CONFIG="$WORK/client.json" XDG_CACHE_HOME="$WORK/xdg"
REPO=$WORK/repo
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc; }

"$BIN/coffer-appliance" init --repo "$REPO" > /dev/null 2>&1
"$BIN/coffer-appliance" user add bench@bench --repo "$REPO" > /dev/null 2>&1
COFFER_LOG=warn "$BIN/coffer-appliance" serve --repo "$REPO" --listen 127.0.0.1:0 --tls-generate-cert \
    --tls-cert-file "$WORK/cert.pem" --tls-key-file "$WORK/key.pem" --gc-grace 0 --maintenance-at off \
    > "$WORK/serve.out" 2> "$WORK/serve.log" &
PID=$!
for _ in $(seq 100); do grep -q '^LISTENING ON:' "$WORK/serve.out" 2>/dev/null && break; sleep 0.1; done
"$BIN/coffer" connect server --url "https://$(sed -n 's/^LISTENING ON: //p' "$WORK/serve.out")" \
    --server-cert-fingerprint "$(sed -n 's/^SERVER CERT SHA256: //p' "$WORK/serve.out")" \
    --override-username bench --override-hostname bench > /dev/null

# Ten snapshots: linux and linux-mod alternately, each path its own history.
for i in 1 2 3 4 5; do
    "$BIN/coffer" snapshot create "$DATA/linux" > /dev/null
    "$BIN/coffer" snapshot create "$DATA/linux-mod" > /dev/null
done
echo "snapshots: $("$BIN/coffer" snapshot list | grep -c .)"
echo "packs before: $(du -s --block-size=1M "$REPO/packs" | cut -f1) MiB"

maint() { "$BIN/coffer-appliance" maintenance run --repo "$REPO" 2>/dev/null | tail -1; }
t0=$(now); out=$(maint); t1=$(now)
echo "maintenance, nothing to collect (mark of 10 snapshots): $(secs "$t0" "$t1") s: $out"

for id in $("$BIN/coffer" snapshot list --json "$DATA/linux-mod" | sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p'); do
    "$BIN/coffer" snapshot delete "$id" > /dev/null
done
t0=$(now); out=$(maint); t1=$(now)
echo "maintenance after deleting linux-mod's 5 snapshots: $(secs "$t0" "$t1") s: $out"
echo "packs after: $(du -s --block-size=1M "$REPO/packs" | cut -f1) MiB"

# Backups of fresh data (256 MiB, made untimed), alone and beside a maintenance loop.
fresh() { mkdir -p "$WORK/fresh"; head -c $((256 << 20)) /dev/urandom > "$WORK/fresh/blob"; cp -r "$DATA/linux/include" "$WORK/fresh/"; }
timed_backup() { rm -rf "$WORK/fresh"; fresh; local a b; a=$(now); "$BIN/coffer" snapshot create --no-parent "$WORK/fresh" > /dev/null; b=$(now); secs "$a" "$b"; }
alone=(); busy=()
for r in 1 2 3; do alone+=("$(timed_backup)"); done
( while [ ! -e "$WORK/stop" ]; do maint > /dev/null || true; echo run >> "$WORK/runs"; done ) &
LOOP=$!
for r in 1 2 3; do busy+=("$(timed_backup)"); done
touch "$WORK/stop"; wait "$LOOP"
median() { printf '%s\n' "$@" | sort -n | sed -n 2p; }
a=$(median "${alone[@]}"); b=$(median "${busy[@]}")
echo "backup of 256 MiB + include/ alone (median of 3): $a s  [${alone[*]}]"
echo "same beside a maintenance loop ($(wc -l < "$WORK/runs") runs): $b s  [${busy[*]}]"
echo "slowdown: $(echo "scale=1; ($b / $a - 1) * 100" | bc) %"
