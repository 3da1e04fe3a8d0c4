#!/usr/bin/env bash
# `coffer mount` against `restic mount` on the same data, same machine, same run (issue 18):
#   - sequential read of a large file through the mount (dd bs=1M), page cache dropped first;
#   - `find | wc -l` over a mounted source tree (metadata only).
# Usage: benches/peers/mount.sh [LARGE_FILE_DIR] [TREE_DIR]   (defaults: the bench datasets)
# Prints CSV lines: tool,measure,seconds,value. Needs restic, fuse3, and a release build.
set -euo pipefail
BIN=${COFFER_BIN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target/release}
BIG=${1:-/var/tmp/bench-data/image-dir}
TREE=${2:-/var/tmp/bench-data/linux}
if [ ! -d "$BIG" ]; then
    # The dataset's image is a file: mount benchmarks back up a directory holding it.
    mkdir -p /var/tmp/bench-data/image-dir
    ln -f /var/tmp/bench-data/image /var/tmp/bench-data/image-dir/image 2>/dev/null ||
        cp /var/tmp/bench-data/image /var/tmp/bench-data/image-dir/image
fi
W=$(mktemp -d /var/tmp/coffer-mount-bench.XXXXXX)
cleanup() {
    fusermount3 -u "$W/cm" 2>/dev/null || true
    fusermount3 -u "$W/rm" 2>/dev/null || true
    [ -n "${APP:-}" ] && kill "$APP" 2>/dev/null
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
export COFFER_REPO_PASSWORD=bench-password COFFER_USER_PASSWORD=bench-password COFFER_PASSWORD=bench-password
export COFFER_CONFIG=$W/client.json XDG_CACHE_HOME=$W/xdg RESTIC_PASSWORD=bench-password
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
timed() { local t0 t1; t0=$(date +%s.%N); "$@" > "$W/out" 2>&1; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
wait_mount() { local i; for i in $(seq 200); do mountpoint -q "$1" && return 0; sleep 0.1; done; echo "no mount at $1" >&2; return 1; }

# coffer: appliance on loopback, 2 shards, a backup of each directory.
"$BIN/coffer-appliance" init --repo "$W/repo" > /dev/null
"$BIN/coffer-appliance" user add bench@bench --repo "$W/repo" > /dev/null
COFFER_LOG=warn "$BIN/coffer-appliance" serve --repo "$W/repo" --listen 127.0.0.1:0 --tls-generate-cert \
    --tls-cert-file "$W/cert.pem" --tls-key-file "$W/key.pem" > "$W/serve.out" 2> "$W/serve.log" &
APP=$!
for _ in $(seq 100); do grep -q '^LISTENING ON:' "$W/serve.out" 2>/dev/null && break; sleep 0.1; done
"$BIN/coffer" connect server --url "https://$(sed -n 's/^LISTENING ON: //p' "$W/serve.out")" \
    --server-cert-fingerprint "$(sed -n 's/^SERVER CERT SHA256: //p' "$W/serve.out")" \
    --override-username bench --override-hostname bench > /dev/null
"$BIN/coffer" snapshot create "$BIG" > /dev/null
"$BIN/coffer" snapshot create "$TREE" > /dev/null
restic init -r "$W/restic" > /dev/null
restic -r "$W/restic" backup "$BIG" > /dev/null
restic -r "$W/restic" backup "$TREE" > /dev/null

mkdir -p "$W/cm" "$W/rm"
"$BIN/coffer" mount "$W/cm" --cache-size 256M 2> "$W/cmount.log" &
wait_mount "$W/cm"
restic -r "$W/restic" mount "$W/rm" > "$W/rmount.log" 2>&1 &
wait_mount "$W/rm"

size=$(stat -c %s "$BIG/image")
cbig=$(ls -d "$W/cm/paths/"*"$(basename "$BIG")"/latest)/image
ctree=$(ls -d "$W/cm/paths/"*"$(basename "$TREE")"/latest)
rbig=$(ls -d "$W/rm/snapshots/latest")$BIG/image
rtree=$(ls -d "$W/rm/snapshots/latest")$TREE
# `latest` in restic is the newest snapshot (the tree); the large file's snapshot is the other.
rbig=$(ls -d "$W/rm/ids/"*"$BIG" | head -1)/image
[ -f "$rbig" ] || rbig=$(find "$W/rm/ids" -maxdepth 12 -path "*$BIG/image" | head -1)
for tool in coffer restic; do
    if [ $tool = coffer ]; then f=$cbig; t=$ctree; else f=$rbig; t=$rtree; fi
    drop
    s=$(timed dd if="$f" of=/dev/null bs=1M)
    echo "$tool,sequential_read_MBps,$s,$(echo "scale=1; $size / 1048576 / $s" | bc)"
    drop
    s=$(timed sh -c "find '$t/' | wc -l")
    echo "$tool,find_entries,$s,$(cat "$W/out")"
done
