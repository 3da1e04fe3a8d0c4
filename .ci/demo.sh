#!/usr/bin/env bash
# The README's first command: set everything up on a fresh machine, start an appliance, back up
# a directory with the client, restore it, and check the restore is bit-exact.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v clang >/dev/null || need+=(clang)
ls /usr/lib/llvm-*/lib/libclang*.so >/dev/null 2>&1 || need+=(libclang-dev)
command -v protoc >/dev/null || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
echo "== building (the first build compiles RocksDB: about 10 minutes on 2 cores)"
cargo build --release --bins
BIN=${CARGO_TARGET_DIR:-target}/release

WORK=$(mktemp -d /tmp/coffer-demo.XXXXXX)
export COFFER_REPO_PASSWORD=demo-repository-password
export COFFER_USER_PASSWORD=demo-user-password
export COFFER_PASSWORD=$COFFER_USER_PASSWORD
export COFFER_CONFIG=$WORK/client.json
cleanup() { [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; true; }
trap cleanup EXIT

echo "== init a repository and add a user"
"$BIN/coffer-appliance" init --repo "$WORK/repo"
"$BIN/coffer-appliance" user add demo@laptop --repo "$WORK/repo"

echo "== serve on 127.0.0.1 with a generated certificate"
"$BIN/coffer-appliance" serve --repo "$WORK/repo" --listen 127.0.0.1:0 --tls-generate-cert \
    --tls-cert-file "$WORK/cert.pem" --tls-key-file "$WORK/key.pem" > "$WORK/serve.out" 2> "$WORK/serve.log" &
PID=$!
for _ in $(seq 1 100); do grep -q '^LISTENING ON:' "$WORK/serve.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^LISTENING ON:' "$WORK/serve.out" || { cat "$WORK/serve.log"; exit 1; }
cat "$WORK/serve.out"
ADDR=$(sed -n 's/^LISTENING ON: //p' "$WORK/serve.out")
FP=$(sed -n 's/^SERVER CERT SHA256: //p' "$WORK/serve.out")

echo "== connect the client, pinned to the fingerprint"
"$BIN/coffer" connect server --url "https://$ADDR" --server-cert-fingerprint "$FP" \
    --override-username demo --override-hostname laptop

SRC=$WORK/source
mkdir -p "$SRC"
cp -a proto appliance/src client/src "$SRC/"
head -c 20000000 /dev/urandom > "$SRC/random.bin"
ln -s random.bin "$SRC/link-to-random"
mkdir -p "$SRC/empty-dir"

echo "== back up $SRC"
"$BIN/coffer" snapshot create "$SRC"
echo "== back up again: nothing new is uploaded"
"$BIN/coffer" snapshot create "$SRC"
"$BIN/coffer" snapshot list
SNAP=$("$BIN/coffer" snapshot list --json | tail -1 | sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p')
"$BIN/coffer" ls "$SNAP"

echo "== restore and compare"
"$BIN/coffer" restore "$SNAP" "$WORK/restored"
diff -r --no-dereference "$SRC" "$WORK/restored"
echo "== restore is bit-exact"

kill "$PID"; wait "$PID"; PID=""
"$BIN/coffer-appliance" verify --repo "$WORK/repo" --read-data
echo "demo finished; files are in $WORK"
